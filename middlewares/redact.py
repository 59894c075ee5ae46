"""Structlog processors that remove credentials from every event before it is written.

They redact, wherever they appear in an event (nested mappings and sequences included):
values under credential-bearing names (``Authorization``, ``api-key``, ``x-api-key``, cookies,
``secret``, ``token`` …); anything shaped like a JWT, a sidegate key (``sg-…``) or a bearer
credential inside a string; and the exact values of the secrets sidegate holds (upstream keys,
HMAC secrets), supplied by a callable so that a reload's new keys are covered at once.
Put them after exception rendering, so tracebacks are redacted too.

:func:`redact_secrets` cleans the event dict (for any renderer). :func:`redacting_json_renderer`
is the same redaction fused with JSON rendering, and much cheaper per line: it redacts names
structurally, renders with orjson, and searches the rendered line for anything string
redaction could touch; only a line with a hit (rare: a credential was about to be logged) is
cleaned string by string, exactly as :func:`redact_secrets` does, and re-rendered.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from typing import Any

import orjson

__all__ = ["REDACTED", "redact_secrets", "redacting_json_renderer"]

REDACTED = "[redacted]"

_NAMES = frozenset(
    {
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
)
_JWT = r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
_SG_KEY = r"sg-[A-Za-z0-9_-]{16,}"
_SHAPES = re.compile(rf"{_JWT}|{_SG_KEY}|(?i:bearer)\s+[^\s\"',;]+")
_MIN_SECRET = 8
# Values that are never walked into: strings are cleaned as text, the rest pass as they are.
_SCALARS = frozenset({int, float, bool, type(None)})
_PLAIN = _SCALARS | {str}
# Names already known not to be credential names (a bounded cache: the check is pure).
_SAFE_NAMES: set[object] = set()
_SAFE_NAMES_MAX = 4096
# A JSON string in rendered text, and its content.
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)


def redact_secrets(
    secrets: Callable[[], Collection[str]] = tuple,
) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """The processor; ``secrets()`` returns the secret values to remove verbatim."""
    current = _known(secrets)

    def processor(
        logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        known = current()
        for name, value in event.items():
            event[name] = _clean(name, value, known)
        return event

    return processor


def redacting_json_renderer(
    secrets: Callable[[], Collection[str]] = tuple,
    *,
    default: Callable[[Any], Any] = str,
) -> Callable[[Any, str, MutableMapping[str, Any]], str]:
    """A final processor: :func:`redact_secrets`, then one line of JSON (orjson, ``default``).

    The output is what :func:`redact_secrets` followed by ``orjson.dumps`` gives, and more: a
    credential in a mapping key or in an object rendered through ``default`` is redacted too.

    How: names are redacted (and bytes, sets, tuples normalised) by walking only into mappings
    and sequences; the line is rendered; then a few literal searches over it look for what any
    string redaction needs: ``eyJ``, ``sg-`` or ``bearer`` in any case, or a held secret in its
    JSON-escaped form (a string holding it renders it so). None found (the usual case): the
    line is final. Otherwise every string is cleaned as
    :func:`redact_secrets` cleans it, the event is rendered again, and the strings of the line
    are swept for the same shapes and secrets once more, never inside a JSON escape, so the line
    stays valid JSON.
    """
    current = _known(secrets)
    dumps = orjson.dumps

    def renderer(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if not _SAFE_NAMES.issuperset(event):
            for name, value in event.items():
                if _sensitive(name) and value is not None:
                    event[name] = REDACTED
        for name, value in event.items():
            if type(value) not in _PLAIN and value is not REDACTED:
                event[name] = _normalise(value)
        line = dumps(event, default=default).decode()
        known = current()
        if not known.suspect(line):
            return line
        for name, value in event.items():
            event[name] = _clean(name, value, known)
        line = dumps(event, default=default).decode()
        return _JSON_STRING.sub(known.sweep_string, line)

    return renderer


class _Known:
    """The held secrets (longest first) and the patterns built from them."""

    __slots__ = ("in_json", "in_text", "sweep", "values")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.in_json = tuple(sorted({_json_escaped(value) for value in values}, key=_longest_first))
        secrets = "".join(f"|{re.escape(value)}" for value in values)
        json_secrets = "".join(f"|{re.escape(value)}" for value in self.in_json)
        # Anything _clean_text would change (a shape or a held secret) makes this match.
        self.in_text = re.compile(_SHAPES.pattern + secrets)
        # What the sweep replaces in a rendered string: no match may take a backslash.
        self.sweep = re.compile(rf"{_JWT}|{_SG_KEY}|(?i:bearer)\s+[^\s\"',;\\]+{json_secrets}")

    def suspect(self, line: str) -> bool:
        """Whether :func:`_clean_text` could change a string that ``line`` renders.

        The shapes' characters need no JSON escape, so a shape in a string is in the line as it
        is; a bearer credential has ``bearer`` (any case) in the line; a held secret in a string
        is in the line as the secret rendered alone. (Literal searches: one regular expression
        alternating them would cost several times as much.)
        """
        lowered = line.lower()
        return (
            "eyj" in lowered
            or "sg-" in lowered
            or "bearer" in lowered
            or any(secret in line for secret in self.in_json)
        )

    def sweep_string(self, match: re.Match[str]) -> str:
        """The rendered JSON string ``match`` with every shape and secret in it replaced."""
        content = match.group(1)
        parts: list[str] = []
        done = start = 0
        while (found := self.sweep.search(content, start)) is not None:
            begin, end = found.span()
            if _inside_escape(content, begin):
                start = begin + 1
                continue
            parts += (content[done:begin], REDACTED)
            done = start = end
        if not parts:
            return match.group(0)
        return '"' + "".join(parts) + content[done:] + '"'


def _known(secrets: Callable[[], Collection[str]]) -> Callable[[], _Known]:
    """``secrets()`` as a :class:`_Known`, rebuilt only when the values change."""
    cached = _Known(())
    last: object = None

    def current() -> _Known:
        nonlocal cached, last
        held = secrets()
        # An immutable collection seen last time holds the same values: skip the comparison.
        if held is last and type(held) in (frozenset, tuple):
            return cached
        values = tuple(
            sorted({value for value in held if len(value) >= _MIN_SECRET}, key=_longest_first)
        )
        if values != cached.values:
            cached = _Known(values)
        last = held
        return cached

    return current


def _longest_first(value: str) -> tuple[int, str]:
    return -len(value), value


def _json_escaped(value: str) -> str:
    try:
        return orjson.dumps(value).decode()[1:-1]
    except orjson.JSONEncodeError:  # not encodable (a lone surrogate): nor is a line holding it
        return value


def _inside_escape(text: str, index: int) -> bool:
    """Whether ``text[index]`` is part of a JSON escape sequence (not its backslash)."""
    if index > 0 and _escape_starts(text, index - 1):
        return True
    return any(
        index - back >= 0 and text[index - back + 1] == "u" and _escape_starts(text, index - back)
        for back in range(2, 6)
    )


def _escape_starts(text: str, index: int) -> bool:
    """Whether ``text[index]`` is a backslash that begins an escape (an even run precedes it)."""
    if text[index] != "\\":
        return False
    run = 0
    while index - run - 1 >= 0 and text[index - run - 1] == "\\":
        run += 1
    return run % 2 == 0


def _sensitive(name: object) -> bool:
    if name in _SAFE_NAMES:
        return False
    if isinstance(name, str) and name.lower() in _NAMES:
        return True
    if len(_SAFE_NAMES) < _SAFE_NAMES_MAX:
        _SAFE_NAMES.add(name)
    return False


def _normalise(value: Any) -> Any:
    """``value`` as :func:`_clean` shapes it, strings left as they are."""
    if type(value) in _PLAIN:
        return value
    if type(value) is dict and _SAFE_NAMES.issuperset(value) and _all_plain(value.values()):
        return value  # the usual nested mapping (usage, say): nothing to change
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _sensitive(key) and item is not None else _normalise(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_normalise(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value


def _all_plain(values: Iterable[Any]) -> bool:
    return _PLAIN.issuperset(map(type, values))


def _clean(name: object, value: Any, known: _Known) -> Any:
    if _sensitive(name) and value is not None:
        return REDACTED
    kind = type(value)
    if kind is str:
        return _clean_text(value, known)
    if kind in _SCALARS:
        return value
    if isinstance(value, str):
        return _clean_text(value, known)
    if isinstance(value, Mapping):
        return {key: _clean(key, item, known) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(None, item, known) for item in value]
    if isinstance(value, bytes | bytearray):
        return _clean_text(bytes(value).decode("utf-8", "replace"), known)
    return value


def _clean_text(text: str, known: _Known) -> str:
    if known.in_text.search(text) is None:
        return text
    text = _SHAPES.sub(REDACTED, text)
    for secret in known.values:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
