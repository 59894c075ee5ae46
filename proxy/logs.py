"""structlog configuration; called only by the entry point (``sidegate serve``), never on import."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from sidegate.middlewares.redact import redact_secrets, redacting_json_renderer

__all__ = ["configure_logging"]


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
    (tests); a server caches each logger on first use.
    """
    out = stream if stream is not None else sys.stderr
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
        logger_factory=structlog.WriteLoggerFactory(
            out
        ),  # one write() per line: workers share stderr
        cache_logger_on_first_use=cache,
    )
    # Lines from the standard library's logging (aiohttp's own) take the same way out.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))


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
