"""structlog configuration; called only by the entry point (``sidegate serve``), never on import."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from sidegate.middlewares.redact import redact_secrets, redacting_json_renderer

__all__ = ["TurnBufferedStream", "configure_logging", "flush_logs"]


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    secrets: Callable[[], Collection[str]] = tuple,
    stream: TextIO | None = None,
    cache: bool = True,
) -> None:
    """JSON lines (one per event) when not on a TTY or when asked; readable console otherwise.

    Every event passes :func:`~sidegate.middlewares.redact.redact_secrets` (with ``secrets``, the
    values sidegate holds) after tracebacks are rendered, so no credential reaches the output;
    JSON lines get it fused with rendering
    (:func:`~sidegate.middlewares.redact.redacting_json_renderer`), which is cheaper per line.
    Timestamps are UTC, ISO 8601 with microseconds (``2026-11-22T23:59:00.123456Z``).
    Tracebacks never include local variables. ``cache=False`` keeps loggers reconfigurable
    (tests); a server caches each logger on first use. Lines are written whole, those of one
    event-loop turn together (:class:`TurnBufferedStream`).
    """
    out = stream if stream is not None else sys.stderr
    turns = TurnBufferedStream(out)
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    tracebacks = ExceptionDictTransformer(show_locals=False)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
        (
            structlog.processors.format_exc_info
            if console
            else structlog.processors.ExceptionRenderer(tracebacks)
        ),
    ]
    renderer: structlog.typing.Processor
    if console:
        processors.append(redact_secrets(secrets))
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = redacting_json_renderer(secrets)
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(turns),  # type: ignore[arg-type]
        cache_logger_on_first_use=cache,
    )
    # Lines from the standard library's logging (aiohttp's own) take the same way out.
    handler = logging.StreamHandler(turns)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))


class TurnBufferedStream:
    """A text stream for log lines: what is written during an event loop's turn goes out at the
    end of the turn (``loop.call_soon``), in one ``write()`` and flush of ``out``.

    structlog's ``WriteLogger`` writes and flushes each line: a system call a request for the
    access line alone. Here the lines of a turn share one. ``flush()`` is a no-op for the
    loggers' per-line flushes (:meth:`flush_now` writes). Written without a running loop (at
    start-up, from another thread), or once ``limit`` characters wait, everything waiting goes
    out at once, in order. Lines are never split (workers sharing stderr write whole lines) and
    never reordered; what waits is written at exit and before a fork. A line waits at most for
    the turn to end, never for a timer.
    """

    def __init__(self, out: TextIO, *, limit: int = 65_536) -> None:
        self._out = out
        self._limit = limit
        self._waiting: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on
        _open_streams.add(self)
        _flush_at_exit()

    def write(self, text: str) -> int:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._waiting.append(text)
            self._size += len(text)
            now = loop is None or self._size >= self._limit
            schedule = not now and self._on is not loop
            if schedule:
                self._on = loop
        if now:
            self.flush_now()
        elif schedule:
            assert loop is not None
            loop.call_soon(self.flush_now)
        return len(text)

    def flush(self) -> None:
        """Nothing: what waits goes out at the end of the turn (:meth:`flush_now`: at once)."""

    def flush_now(self) -> None:
        """Write (and flush) everything waiting, in one write."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
            self._size = 0
            self._on = None
            if not waiting:
                return
            try:  # under the lock: another thread's lines cannot overtake these
                self._out.write("".join(waiting))
                self._out.flush()
            except (OSError, ValueError):  # the output is gone (closed, a broken pipe): so are
                pass  # the lines; raising here would only log the failure to the same output


_open_streams: weakref.WeakSet[TurnBufferedStream] = weakref.WeakSet()
_hooked = False


def _flush_at_exit() -> None:
    """Flush every stream at interpreter exit and before a fork (hooks set once a process)."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    atexit.register(flush_logs)
    os.register_at_fork(before=flush_logs)


def flush_logs() -> None:
    """Write every line still waiting for the end of its turn (:class:`TurnBufferedStream`)."""
    for stream in list(_open_streams):
        stream.flush_now()


_second: tuple[int, str] = (-1, "")


def _timestamp(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """``timestamp``: now, UTC, ISO 8601 with microseconds (the date part is made once a second)."""
    global _second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    made, prefix = _second
    if made != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, prefix)
    event["timestamp"] = f"{prefix}.{nanos // 1000:06d}Z"
    return event
