"""structlog configuration; called only by the entry point (``sidegate serve``), never on import."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Collection
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

from sidegate.middlewares.redact import redact_secrets

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
    values sidegate holds) after tracebacks are rendered, so no credential reaches the output.
    Tracebacks never include local variables. ``cache=False`` keeps loggers reconfigurable
    (tests); a server caches each logger on first use.
    """
    out = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    tracebacks = ExceptionDictTransformer(show_locals=False)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        (
            structlog.processors.format_exc_info
            if console
            else structlog.processors.ExceptionRenderer(tracebacks)
        ),
        redact_secrets(secrets),
    ]
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
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


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()
