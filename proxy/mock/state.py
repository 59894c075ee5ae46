"""What a mock upstream remembers: the requests it saw, the faults queued for it, its counters.

One :class:`MockState` belongs to one mock application (``app[MOCK_STATE]``). Tests and
benchmarks hold on to it to script faults before a request and to inspect what arrived after.
Everything here is plain data mutated from the event loop thread; nothing is locked.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDictProxy

__all__ = ["Fault", "MockState", "RateWindow", "Received"]


@dataclass
class Fault:
    """One scripted misbehaviour, consumed by exactly one request.

    ``status`` (or ``body`` alone, which implies 200) answers without running the endpoint.
    ``retry_after`` adds a ``Retry-After`` header (and Meridian's 429 body field ``retry-after``).
    ``headers`` are added to whatever response goes out. ``delay_s`` sleeps before the response
    starts. ``pace_s`` sleeps between SSE events (0 falls back to ``MockState.default_pace_s``).
    ``reset_after_events`` aborts the connection after that many SSE events, or before sending
    anything when the response is not a stream.
    """

    status: int | None = None
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    pace_s: float = 0.0
    reset_after_events: int | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived: the headers are a copy, ``body`` the exact bytes."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (raises ``orjson.JSONDecodeError`` if it is not JSON)."""
        return orjson.loads(self.body)


@dataclass
class RateWindow:
    """Fixed-window counters behind Meridian's ``x-ratelimit-*`` headers (reporting only)."""

    limit_requests: int = 10_000
    limit_tokens: int = 2_000_000
    window_s: int = 60
    used_requests: int = 0
    used_tokens: int = 0
    resets_at: int = 0

    def charge(self, tokens: int, now: float | None = None) -> None:
        """Count one request of ``tokens`` tokens, starting a new window when the old one ended."""
        now = time.time() if now is None else now
        if now >= self.resets_at:
            self.resets_at = (int(now) // self.window_s + 1) * self.window_s
            self.used_requests = self.used_tokens = 0
        self.used_requests += 1
        self.used_tokens += tokens

    def reset(self) -> None:
        """Forget the current window."""
        self.used_requests = self.used_tokens = self.resets_at = 0


_Predicate = Callable[["MockState"], bool]


@dataclass(eq=False)
class MockState:
    """Recorder, fault script and counters of one mock upstream.

    ``accepted_keys`` of ``None`` accepts any non-empty bearer key; a set rejects other keys with
    401. ``stream_chunks`` is the number of content words of every completion (and so of every
    SSE stream); ``default_pace_s`` paces SSE events when no fault says otherwise.
    """

    accepted_keys: set[str] | None = None
    stream_chunks: int = 8
    default_pace_s: float = 0.0
    received: list[Received] = field(default_factory=list, init=False)
    disconnects: int = field(default=0, init=False)
    open_streams: int = field(default=0, init=False)
    rate: RateWindow = field(default_factory=RateWindow, init=False)
    _by_path: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _script: list[tuple[str | None, Fault]] = field(default_factory=list, init=False, repr=False)
    _serial: int = field(default=0, init=False, repr=False)
    _watchers: list[tuple[_Predicate, asyncio.Future[None]]] = field(
        default_factory=list, init=False, repr=False
    )

    def count(self, path: str | None = None) -> int:
        """Requests received so far, all of them or those for ``path``."""
        return len(self.received) if path is None else self._by_path[path]

    def by_path(self) -> dict[str, int]:
        """Requests received so far per path."""
        return dict(self._by_path)

    def script(self, *faults: Fault, path: str | None = None) -> None:
        """Queue ``faults``; each later request for ``path`` (any path if None) takes the next."""
        self._script.extend((path, fault) for fault in faults)

    def reset(self) -> None:
        """Forget requests, queued faults, disconnects, ids and rate counters; keep settings."""
        self.received.clear()
        self._by_path.clear()
        self._script.clear()
        self._serial = 0
        self.disconnects = 0
        self.rate.reset()
        self.changed()

    def record(self, request: Received) -> Fault | None:
        """Remember ``request`` and hand back the first queued fault that applies to it."""
        self.received.append(request)
        self._by_path[request.path] += 1
        fault = None
        for i, (path, candidate) in enumerate(self._script):
            if path is None or path == request.path:
                del self._script[i]
                fault = candidate
                break
        self.changed()
        return fault

    def next_serial(self) -> int:
        """A number unique within this state until :meth:`reset`, for deterministic ids."""
        self._serial += 1
        return self._serial

    def stream_opened(self) -> None:
        """An SSE stream started."""
        self.open_streams += 1
        self.changed()

    def stream_closed(self, *, client_left: bool) -> None:
        """An SSE stream ended; ``client_left`` when the client went away before the end."""
        self.open_streams -= 1
        if client_left:
            self.disconnects += 1
        self.changed()

    async def wait_for(self, predicate: _Predicate) -> None:
        """Return once ``predicate(state)`` holds; re-checked after every change of the state.

        Wrap in ``asyncio.timeout`` to bound the wait.
        """
        if predicate(self):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.append((predicate, future))
        try:
            await future
        finally:
            self._watchers = [w for w in self._watchers if w[1] is not future]

    async def wait_disconnects(self, n: int = 1) -> None:
        """Return once at least ``n`` SSE clients went away mid-stream."""
        await self.wait_for(lambda state: state.disconnects >= n)

    def changed(self) -> None:
        """Wake the waiters whose condition now holds."""
        for predicate, future in self._watchers:
            if not future.done() and predicate(self):
                future.set_result(None)
