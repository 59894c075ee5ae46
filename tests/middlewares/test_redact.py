"""The log redactor: ``redact_secrets`` and the fused ``redacting_json_renderer``."""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
import structlog

from sidegate.middlewares.redact import REDACTED, redact_secrets, redacting_json_renderer
from sidegate.proxy.logs import configure_logging

SECRET = "sk-upstream-0123456789abcdef"
ODD_SECRET = 'pa"ss\\wo\nrd-\x01-42'  # needs JSON escapes
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
SG_KEY = "sg-live-0123456789abcdefghij"
HELD = (SECRET, ODD_SECRET, "short")  # under 8 characters: not redacted verbatim


# The redactor as it was before the fused renderer: the reference for equivalence (held secrets
# now go longest first, so a secret inside another never leaves the rest of the longer one).
_NAMES = {
    "authorization",
    "proxy-authorization",
    "api-key",
    "api_key",
    "x-api-key",
    "cookie",
    "set-cookie",
    "secret",
    "password",
    "token",
    "jwt",
    "pepper",
}
_SHAPES = re.compile(
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|sg-[A-Za-z0-9_-]{16,}"
    r"|(?i:bearer)\s+[^\s\"',;]+"
)


def reference(name: object, value: Any, known: list[str]) -> Any:
    if isinstance(name, str) and name.lower() in _NAMES and value is not None:
        return REDACTED
    if isinstance(value, str):
        return reference_text(value, known)
    if isinstance(value, Mapping):
        return {key: reference(key, item, known) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [reference(None, item, known) for item in value]
    if isinstance(value, bytes | bytearray):
        return reference_text(bytes(value).decode("utf-8", "replace"), known)
    return value


def reference_text(text: str, known: list[str]) -> str:
    text = _SHAPES.sub(REDACTED, text)
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def reference_line(event: dict[str, Any], held: tuple[str, ...] = HELD) -> Any:
    known = [value for value in held if len(value) >= 8]
    cleaned = {name: reference(name, value, known) for name, value in event.items()}
    return orjson.loads(orjson.dumps(cleaned, default=str))


def render(event: dict[str, Any], held: tuple[str, ...] = HELD) -> str:
    line = redacting_json_renderer(lambda: held)(None, "info", dict(event))
    assert "\n" not in line
    return line


EVENTS: list[dict[str, Any]] = [
    {"event": "request", "status": 200, "latency_ms": 1.5, "cache": None, "stream": False},
    {"event": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 2}, "tags": ("a", "b")},
    {"event": "x", "Authorization": f"Bearer {SG_KEY}", "X-Api-Key": 12345, "token": None},
    {"event": "x", "headers": {"authorization": "anything", "accept": "*/*", "Cookie": "c=1"}},
    {"event": "x", "nested": [{"api_key": "v"}, {"ok": [{"Set-Cookie": ["a", "b"]}]}]},
    {"event": "x", "message": f"upstream said: Incorrect key Bearer {SECRET}"},
    {"event": "x", "message": f"key {SECRET} and {SECRET}!", "raw": SECRET.encode()},
    {"event": "x", "message": f"jwt={JWT}; sg={SG_KEY}", "set": frozenset({SG_KEY})},
    {"event": "x", "message": f"odd {ODD_SECRET} odd", "list": [ODD_SECRET, 1, None]},
    {"event": "x", "message": "Bearer\ttab-separated-credential", "n": 'BEARER a"b'},
    {"event": "x", "message": "bearer ab\\cd-with-a-backslash", "m": "Bearer x\x01y"},
    {"event": "x", "message": "\x1eyJab.cd.ef after an escape", "m": "\\eyJab.cd.ef"},
    {"event": "x", "message": "mentions bearer alone, and sg- alone, and eyJ alone"},
    {"event": "x", "bytes": bytearray(b"\xff\xfe Bearer zzz"), "short": "short"},
]


@pytest.mark.parametrize("event", EVENTS)
def test_the_fused_renderer_writes_what_redaction_then_rendering_wrote(
    event: dict[str, Any],
) -> None:
    assert orjson.loads(render(event)) == reference_line(event)


@pytest.mark.parametrize("event", EVENTS)
def test_redact_secrets_is_unchanged(event: dict[str, Any]) -> None:
    processed = redact_secrets(lambda: HELD)(None, "info", dict(event))
    assert orjson.loads(orjson.dumps(processed, default=str)) == reference_line(event)


def test_random_strings_render_as_valid_json_with_nothing_left_to_redact() -> None:
    """Strings of escapes, shapes and secrets: the line is valid JSON and equals the reference."""
    pieces = [
        "Bearer ",
        "bearer\t",
        "BEARER\n",
        "eyJ",
        "ab.",
        ".cd",
        "sg-",
        "0123456789abcdefgh",
        SECRET,
        ODD_SECRET,
        SECRET[:10],
        '"',
        "\\",
        "\\u001e",
        "\x1e",
        "\x0b",
        "\u2028",
        "é",
        " ",
        ",",
        ";",
        "x",
    ]
    rng = random.Random(20261122)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        event = {"event": "x", "message": text, "nested": {"list": [text, 7]}}
        line = render(event)
        parsed = orjson.loads(line)  # valid JSON
        assert parsed == reference_line(event), text
        assert SECRET not in line
        assert orjson.dumps(ODD_SECRET).decode()[1:-1] not in line


def test_a_credential_in_a_key_or_in_an_object_rendered_by_str_is_redacted_too() -> None:
    class Opaque:
        def __str__(self) -> str:
            return f"<Opaque holding {SECRET}, Bearer abcdef>"

    line = render({"event": "x", f"by {SECRET}": 1, "obj": Opaque()})
    assert SECRET not in line
    assert "abcdef" not in line
    assert orjson.loads(line) == {
        "event": "x",
        f"by {REDACTED}": 1,
        "obj": f"<Opaque holding {REDACTED}, {REDACTED}",
    }


def test_only_strings_are_redacted_so_the_line_stays_valid_json() -> None:
    line = render({"event": "12345678", "number": 12345678, "f": 0.12345678}, held=("12345678",))
    assert orjson.loads(line) == {"event": REDACTED, "number": 12345678, "f": 0.12345678}


def test_a_new_secret_counts_at_once() -> None:
    held: list[str] = [SECRET]
    renderer = redacting_json_renderer(lambda: tuple(held))
    processor = redact_secrets(lambda: frozenset(held))
    new = "sk-after-the-reload-987654321"
    assert new in renderer(None, "info", {"event": new})
    held.append(new)
    assert renderer(None, "info", {"event": new}) == f'{{"event":"{REDACTED}"}}'
    assert processor(None, "info", {"event": new}) == {"event": REDACTED}
    held.remove(new)
    assert new in renderer(None, "info", {"event": new})


def test_the_same_mutable_collection_changed_in_place_counts_at_once() -> None:
    held: set[str] = set()
    renderer = redacting_json_renderer(lambda: held)
    assert SECRET in renderer(None, "info", {"event": SECRET})
    held.add(SECRET)
    assert SECRET not in renderer(None, "info", {"event": SECRET})


def lines(output: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.getvalue().splitlines()]


def test_json_lines_structlog_and_stdlib_alike_are_redacted(log_output: io.StringIO) -> None:
    configure_logging(
        "info", "json", secrets=lambda: frozenset({SECRET}), stream=log_output, cache=False
    )
    structlog.get_logger("t").info("hello", note=f"Bearer {SG_KEY}", key=SECRET, status=200)
    logging.getLogger("aiohttp.server").error("echo %s and %s", SECRET, JWT)
    try:
        raise RuntimeError(f"failed with {SECRET}")
    except RuntimeError:
        structlog.get_logger("t").exception("boom")
    output = log_output.getvalue()
    assert SECRET not in output
    assert JWT not in output
    assert SG_KEY not in output
    first, second, third = lines(log_output)
    assert first["note"] == first["key"] == REDACTED
    assert first["status"] == 200
    assert first["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    assert second["event"] == f"echo {REDACTED} and {REDACTED}"
    assert second["logger"] == "aiohttp.server"
    assert third["exception"][0]["exc_value"] == f"failed with {REDACTED}"


def test_console_lines_are_redacted(log_output: io.StringIO) -> None:
    configure_logging(
        "info", "console", secrets=lambda: frozenset({SECRET}), stream=log_output, cache=False
    )
    structlog.get_logger("t").info("hello", note=f"Bearer {SG_KEY}", key=SECRET)
    logging.getLogger("aiohttp.server").error("echo %s", SECRET)
    output = log_output.getvalue()
    assert SECRET not in output
    assert SG_KEY not in output
    assert output.count(REDACTED) == 3


def test_the_timestamp_is_utc_now(log_output: io.StringIO) -> None:
    import datetime

    configure_logging("info", "json", stream=log_output, cache=False)
    before = datetime.datetime.now(datetime.UTC)
    structlog.get_logger("t").info("tick")
    after = datetime.datetime.now(datetime.UTC)
    (line,) = lines(log_output)
    stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert before - datetime.timedelta(milliseconds=1) <= stamp <= after
