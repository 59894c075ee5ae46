"""A zero-latency Meridian-style upstream that is never the bottleneck.

A raw :class:`asyncio.Protocol` speaking just enough HTTP/1.1 (keep-alive, ``Content-Length``
bodies) to answer with precomputed bytes, so a request costs the mock a few tens of microseconds:

* ``POST /v1/chat/completions`` — one chat completion (JSON), or with ``"stream": true`` an SSE
  stream of ``events`` content deltas framed like Meridian's (role delta, deltas, finish chunk,
  the usage chunk when ``stream_options.include_usage`` is set, ``data: [DONE]``), each event its
  own HTTP chunk. ``x-bench-events: N`` overrides the event count for one request and
  ``x-bench-pace-ms: P`` sends the events ``P`` ms apart (the first one at once);
* ``POST /v1/embeddings`` — one 1536-float vector per input text (deterministic per text);
* ``GET /healthz`` — 200.

Every answer carries Meridian's six ``x-ratelimit-*`` headers (resets as Unix seconds, refreshed
each second). A request without ``Authorization`` is a 401, as at Meridian.

Run it alone with ``python -m bench.upstream --port 9300 [--events 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from .workloads import CHAT_MODEL, EMBED_DIMENSIONS, EMBED_MODEL

__all__ = ["Answers", "UpstreamSettings", "main", "serve_upstream", "start_upstream"]

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_RATE_LIMIT_REQUESTS = 100_000
_RATE_LIMIT_TOKENS = 100_000_000
_CREATED = 1_717_000_000
_REPLY = (
    "Quantum computers use qubits, which can be zero and one at once, so they can try many "
    "answers together and solve some puzzles much faster than ordinary computers can."
)
_WORDS = _REPLY.split(" ")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How the mock answers: SSE events per stream (content deltas) and their default pace."""

    events: int = 20
    pace_ms: float = 0.0


def _vector(text: str) -> bytes:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return orjson.dumps([round(rng.uniform(-0.08, 0.08), 8) for _ in range(EMBED_DIMENSIONS)])


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass
class Answers:
    """Every answer's bytes, rebuilt (with fresh rate-limit resets) by :meth:`refresh`."""

    settings: UpstreamSettings
    chat: bytes = b""
    unauthorized: bytes = b""
    not_found: bytes = b""
    bad_request: bytes = b""
    healthz: bytes = b""
    _rate_headers: bytes = b""
    _streams: dict[tuple[int, bool], tuple[bytes, list[bytes]]] = field(default_factory=dict)
    _vectors: dict[str, bytes] = field(default_factory=dict)
    _embeddings: dict[bytes, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self, now: float | None = None) -> None:
        """Recompute every cached answer with rate-limit resets at the next minute."""
        now = time.time() if now is None else now
        reset = int(now // 60 * 60 + 60)
        self._rate_headers = (
            f"x-ratelimit-limit-requests: {_RATE_LIMIT_REQUESTS}\r\n"
            f"x-ratelimit-remaining-requests: {_RATE_LIMIT_REQUESTS - 1}\r\n"
            f"x-ratelimit-reset-requests: {reset}\r\n"
            f"x-ratelimit-limit-tokens: {_RATE_LIMIT_TOKENS}\r\n"
            f"x-ratelimit-remaining-tokens: {_RATE_LIMIT_TOKENS - 64}\r\n"
            f"x-ratelimit-reset-tokens: {reset}\r\n"
        ).encode()
        self._streams.clear()
        self._embeddings.clear()
        self.chat = self.json(200, _chat_body())
        self.healthz = self.json(200, b'{"status":"ok"}')
        self.unauthorized = self.json(401, _error("invalid_api_key", "Missing API key."))
        self.not_found = self.json(404, _error("not_found", "No such route."))
        self.bad_request = self.json(400, _error("invalid_request", "Unreadable request."))

    def json(self, status: int, body: bytes) -> bytes:
        """A complete response with a JSON ``body``."""
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}[status]
        return (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, reason.encode(), len(body), self._rate_headers, body)
        )

    def stream(self, events: int, usage: bool) -> tuple[bytes, list[bytes]]:
        """The response head and the chunk-framed events of a stream (the last one ends it)."""
        key = (events, usage)
        cached = self._streams.get(key)
        if cached is None:
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache"
                b"\r\ntransfer-encoding: chunked\r\n%s\r\n" % self._rate_headers
            )
            chunks = [_chunk(event) for event in _stream_events(events, usage)]
            chunks[-1] += b"0\r\n\r\n"
            cached = self._streams[key] = (head, chunks)
        return cached

    def embeddings(self, body: bytes) -> bytes:
        """The answer to an embeddings request body: a vector per input, in order."""
        cached = self._embeddings.get(body)
        if cached is not None:
            return cached
        try:
            request = orjson.loads(body)
            texts = request["input"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return self.bad_request
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            return self.bad_request
        items = []
        for index, text in enumerate(texts):
            vector = self._vectors.get(text)
            if vector is None:
                vector = self._vectors[text] = _vector(text)
            items.append(b'{"object":"embedding","index":%d,"embedding":%s}' % (index, vector))
        tokens = sum(len(text.split()) for text in texts)
        answer = self.json(
            200,
            b'{"object":"list","data":[%s],"model":"%s","usage":{"prompt_tokens":%d,'
            b'"total_tokens":%d}}' % (b",".join(items), EMBED_MODEL.encode(), tokens, tokens),
        )
        if len(self._embeddings) < 64:
            self._embeddings[bytes(body)] = answer
        return answer


def _error(code: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "type": "invalid_request_error",
                "message": message,
                "param": None,
                "code": code,
            }
        }
    )


def _chat_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0001",
            "object": "chat.completion",
            "created": _CREATED,
            "model": CHAT_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _REPLY},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 28,
                "completion_tokens": len(_WORDS),
                "total_tokens": 28 + len(_WORDS),
            },
        }
    )


def _stream_events(events: int, usage: bool) -> list[bytes]:
    base: dict[str, object] = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": CHAT_MODEL,
    }
    if usage:
        base["usage"] = None

    def delta(content: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": content, "finish_reason": finish}
        return _event({**base, "choices": [choice]})

    out = [delta({"role": "assistant", "content": ""})]
    out.extend(delta({"content": " " + _WORDS[i % len(_WORDS)]}) for i in range(events))
    out.append(delta({}, "stop"))
    if usage:
        counts = {"prompt_tokens": 28, "completion_tokens": events, "total_tokens": 28 + events}
        out.append(_event({**base, "choices": [], "usage": counts}))
    out.append(b"data: [DONE]\n\n")
    return out


class _Http(asyncio.Protocol):
    """One connection: parse requests one after another, answer each from :class:`Answers`."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: tuple[bytes, bytes, dict[bytes, bytes]] | None = None
        self.length = 0
        self.pacing: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.pacing is not None:
            self.pacing.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _process(self) -> None:
        buffer = self.buffer
        while self.transport is not None and self.pacing is None:
            if self.head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buffer[:end]).split(b"\r\n")
                del buffer[: end + 4]
                method, _, rest = lines[0].partition(b" ")
                path = rest.partition(b" ")[0]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if b"transfer-encoding" in headers:
                    self._finish(self.answers.bad_request, close=True)
                    return
                self.head = (method, path, headers)
                self.length = int(headers.get(b"content-length", b"0"))
            if len(buffer) < self.length:
                return
            body = bytes(buffer[: self.length])
            del buffer[: self.length]
            method, path, headers = self.head
            self.head = None
            self._answer(method, path, headers, body)

    def _answer(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        answers = self.answers
        close = headers.get(b"connection", b"").lower() == b"close"
        if path == b"/healthz":
            self._finish(answers.healthz, close)
        elif method != b"POST" or path not in (b"/v1/chat/completions", b"/v1/embeddings"):
            self._finish(answers.not_found, close)
        elif b"authorization" not in headers:
            self._finish(answers.unauthorized, close)
        elif path == b"/v1/embeddings":
            self._finish(answers.embeddings(body), close)
        elif _STREAM.search(body) is None:
            self._finish(answers.chat, close)
        else:
            events = int(headers.get(b"x-bench-events", answers.settings.events))
            pace = float(headers.get(b"x-bench-pace-ms", answers.settings.pace_ms))
            head, chunks = answers.stream(events, _INCLUDE_USAGE.search(body) is not None)
            if pace <= 0:
                self._finish(head + b"".join(chunks), close)
            else:
                self.pacing = asyncio.get_running_loop().create_task(
                    self._paced(head, chunks, pace / 1000.0, close)
                )

    async def _paced(self, head: bytes, chunks: list[bytes], pace_s: float, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(head + chunks[0])
        for chunk in chunks[1:]:
            await asyncio.sleep(pace_s)
            if transport.is_closing():
                return
            transport.write(chunk)
        self.pacing = None
        if close:
            transport.close()
        else:
            self._process()

    def _finish(self, answer: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(answer)
        if close:
            self.transport.close()
            self.transport = None


async def start_upstream(
    host: str = "127.0.0.1", port: int = 0, settings: UpstreamSettings | None = None
) -> tuple[asyncio.Server, str]:
    """Serve the mock on ``host:port`` (0: a free port); returns the server and its base URL.

    The rate-limit headers are refreshed each second while the server runs; close the server
    (``server.close()``) to stop.
    """
    answers = Answers(settings or UpstreamSettings())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(answers), host, port, backlog=1024)

    def refresh() -> None:
        if server.is_serving():
            answers.refresh()
            loop.call_later(1.0, refresh)

    loop.call_later(1.0, refresh)
    bound = server.sockets[0].getsockname()[1]
    return server, f"http://{host}:{bound}"


async def serve_upstream(host: str, port: int, settings: UpstreamSettings) -> None:
    """Serve until cancelled."""
    server, url = await start_upstream(host, port, settings)
    print(f"bench upstream on {url}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--events", type=int, default=20, help="content deltas per stream")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="delay between stream events")
    args = parser.parse_args(argv)
    settings = UpstreamSettings(events=args.events, pace_ms=args.pace_ms)
    with contextlib.suppress(KeyboardInterrupt):
        _run(serve_upstream(args.host, args.port, settings))
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop when installed (as sidegate serve runs): the mock's CPU a request is the
    harness's, not what is measured, and where load and proxies share the CPUs (``--workers``)
    every microsecond of it is taken from them."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


if __name__ == "__main__":
    raise SystemExit(main())
