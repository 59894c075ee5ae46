"""SseUsage reads every stream exactly as its first, plain implementation did (kept here)."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

import orjson

from sidegate.middlewares import pricing
from sidegate.middlewares.pricing import SseUsage, Usage

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")


def _text_bound(value: Any) -> int:
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, dict):
        return sum(map(_text_bound, map(str, value))) + sum(map(_text_bound, value.values()))
    if isinstance(value, list):
        return sum(map(_text_bound, value))
    if isinstance(value, Mapping):
        return sum(map(_text_bound, map(str, value))) + sum(map(_text_bound, value.values()))
    if isinstance(value, tuple):
        return sum(map(_text_bound, value))
    return len(str(value))


def _whole(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _token_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, Mapping):
        return None
    prompt = _whole(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _whole(usage.get("completion_tokens", usage.get("output_tokens")))
    if prompt is None and completion is None:
        return None
    return Usage(prompt or 0, completion or 0)


def _event_json(event: bytes) -> Any:
    if event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2:
        data = event[6:-2]
    else:
        lines = [line for line in event.splitlines() if line.startswith(b"data:")]
        data = b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)
    if not data or data.strip() == b"[DONE]":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class Reference:
    """SseUsage as it was first written: every event parsed as it passes."""

    def __init__(self) -> None:
        self._tail = b""
        self.usage: Usage | None = None
        self.text_bytes = 0
        self.text_deltas = 0

    def feed(self, chunk: bytes) -> Usage | None:
        for event in self._events(chunk):
            self._read(event)
        return self.usage

    def strip(self, chunk: bytes) -> bytes:
        events = self._events(chunk)
        if len(events) == 1:
            return b"" if self._read(events[0]) else events[0]
        return b"".join([e for e in events if not self._read(e)])

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail

    def _events(self, chunk: bytes) -> list[bytes]:
        # As first written, less one bug: a chunk ending in "\n\n" with a "\r\n\r\n" event end
        # before it was taken for one event.
        if (
            not self._tail
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n\n") == len(chunk) - 2
            and b"\r\n\r\n" not in chunk
        ):
            return [chunk]
        data, start, events = self._tail + chunk, 0, []
        for end in _EVENT_END.finditer(data):
            events.append(data[start : end.end()])
            start = end.end()
        self._tail = data[start:]
        if len(self._tail) > pricing._MAX_EVENT:
            events.append(self._tail)
            self._tail = b""
        return events

    def _read(self, event: bytes) -> bool:
        parsed = _event_json(event)
        if not isinstance(parsed, dict):
            return False
        choices = parsed.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            text = _text_bound(delta.get("content") or "")
            if delta.get("tool_calls"):
                text += _text_bound(delta["tool_calls"])
            self.text_bytes += text
            self.text_deltas += int(text > 0)
        usage = parsed.get("usage")
        if usage is None:
            return False
        found = _token_usage(usage)
        if found is not None:
            self.usage = found
        return choices == [] and isinstance(usage, dict)


_HEAD = b'{"id":"c1","object":"chat.completion.chunk","model":"m","usage":null,'
_CONTENTS = [
    "",
    " plain",
    "caf\u00e9 \U0001f600",
    'quote " and \\ backslash',
    "line\nbreak\r\n",
    '"usage":{"prompt_tokens":9}',
    "\u2028\x00\x1f",
    "usage",
]
_DATA = [
    *(
        _HEAD
        + b'"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}'
        % orjson.dumps(text)
        for text in _CONTENTS
    ),
    *(
        b'{"choices":[{"delta":{"content":%s}}],"usage":null}'
        % orjson.dumps(text)
        .decode("utf-8")
        .encode("ascii", "backslashreplace")
        .replace(b"\\x", b"\\u00")
        for text in _CONTENTS
        if text.isascii()
    ),
    b'{"choices":[{"delta":{"content":"caf\\u00e9 \\n"}}],"usage":null}',
    b'{"choices":[{"delta":{"content":"x"}}]}',
    b'{"choices":[{"delta":{"content":"x"}}],"usage" : null}',
    b'{"choices":[{"delta":{"content":"x"}}],"us\\u0061ge":{"prompt_tokens":5}}',
    b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}',
    b'{"choices":[],"usage":{"input_tokens":4,"output_tokens":1,"total_tokens":5}}',
    b'{"choices":[{"delta":{}}],"usage":{"prompt_tokens":7,"completion_tokens":1}}',
    b'{"choices":[],"usage":{"prompt_tokens":-1}}',
    b'{"choices":[],"usage":null}',
    b'{"choices":[],"usage":[]}',
    b'{"choices":[],"usage":{}}',
    b'{"choices":[],"x":{"usage":null},"usage":{"completion_tokens":6}}',
    b'{"choices":[],"usage":null,"usage":{"prompt_tokens":2}}',
    b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":1}"}}]}}'
    b'],"usage":null}',
    b'{"choices":[{"delta":{"tool_calls":[{"id":"t","function":{"name":"f"}}],"content":"y"}}],'
    b'"usage":null}',
    b'{"choices":[{"delta":{"tool_calls":true,"content":7}}],"usage":null}',
    b'{"choices":[{"delta":{"content":null,"tool_calls":[]}},{"delta":{"content":"two"}}],'
    b'"usage":null}',
    b'{"choices":[{"delta":"not a dict"},3,{"delta":{"content":["a",1]}}],"usage":null}',
    b'{"choices":{"delta":{"content":"not a list"}},"usage":null}',
    b'{"choices":[{"delta":{"content":"\xff bad utf-8"}}],"usage":null}',
    b'{"choices":[{"delta":{"content":"x"}}],"usage":null,"n":123456789012345678901234567890}',
    b'{"choices":[{"delta":{"content":"usage\\"usage\\":null"}}],"usage":null}',
    b'{"choices":[{"delta":{"content":"not closed"}}],"usage":null',
    b' {"choices":[{"delta":{"content":"leading space"}}],"usage":null}',
    b"[DONE]",
    b" [DONE] ",
    b"",
    b"[1,2]",
    b"null",
]


def _event(data: bytes, rng: random.Random) -> bytes:
    """One SSE event of ``data``, framed one of the ways a stream may frame it."""
    shape = rng.randrange(9)
    if shape == 0:
        return b"data: " + data + b"\r\n\r\n"
    if shape == 1:
        return b"data:" + data + b"\n\n"
    if shape == 2 and len(data) > 2:
        cut = rng.randrange(1, len(data))
        return b"data: " + data[:cut] + b"\ndata: " + data[cut:] + b"\n\n"
    if shape == 3:
        return b": keep-alive\nevent: message\ndata: " + data + b"\n\n"
    if shape == 4:
        return b"data: " + data + b"\r\n\r\n" + b": ping\n\n"
    if shape == 5:  # a blank line first: three or four newlines in a row
        return b"\n" * rng.randrange(1, 3) + b"data: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def _stream(rng: random.Random, events: int) -> bytes:
    return b"".join(_event(rng.choice(_DATA), rng) for _ in range(events))


def _chunks(raw: bytes, rng: random.Random) -> list[bytes]:
    """``raw`` cut at random places, or event by event, or whole."""
    how = rng.randrange(3)
    if how == 0:
        return [raw]
    if how == 1:
        return [event for event in re.split(rb"(?<=\n\n)", raw) if event]
    cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randrange(1, 40))))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]


def _same(chunks: list[bytes], *, peek: int | None = None) -> None:
    for hide in (False, True):
        new, old = SseUsage(), Reference()
        shown_new, shown_old = [], []
        for index, chunk in enumerate(chunks):
            if hide:
                shown_new.append(new.strip(chunk))
                shown_old.append(old.strip(chunk))
            else:
                assert new.feed(chunk) == old.feed(chunk)
            if index == peek:  # the counts read mid-stream, then the stream goes on
                assert (new.text_bytes, new.text_deltas) == (old.text_bytes, old.text_deltas)
        assert shown_new == shown_old
        assert new.flush() == old.flush()
        assert new.usage == old.usage
        assert (new.text_bytes, new.text_deltas) == (old.text_bytes, old.text_deltas)
        assert new.partial_usage(5) == (
            old.usage or Usage(5, max(old.text_deltas, -(-old.text_bytes // 4)))
        )


def test_every_data_alone_framed_every_way() -> None:
    rng = random.Random(0)
    for data in _DATA:
        for _ in range(12):
            raw = _event(data, rng)
            _same([raw])
            _same([raw[:i] for i in range(0, len(raw) + 1, len(raw))][1:])


def test_random_streams_read_as_the_reference_does() -> None:
    rng = random.Random(1)
    for _ in range(1500):
        raw = _stream(rng, rng.randrange(1, 12))
        chunks = _chunks(raw, rng)
        _same(chunks, peek=rng.randrange(len(chunks)))


def test_streams_split_at_every_byte() -> None:
    rng = random.Random(2)
    for _ in range(6):
        raw = _stream(rng, 5)
        for cut in range(1, len(raw)):
            _same([raw[:cut], raw[cut:]])


def test_long_streams_past_the_unread_bound() -> None:
    rng = random.Random(3)
    data = _DATA[1]
    raw = b"".join(b"data: " + data + b"\n\n" for _ in range(500))
    _same([raw[i : i + 211] for i in range(0, len(raw), 211)])
    _same([b"data: " + data + b"\n\n"] * 500, peek=rng.randrange(500))
    reader = SseUsage()
    for _ in range(500):
        reader.feed(b"data: " + data + b"\n\n")
        assert reader._unread_size <= pricing._UNREAD_MAX
    assert reader.text_deltas == 500
