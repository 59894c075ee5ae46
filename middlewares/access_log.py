"""Request ids and the access log: one structured line per request, written when it ends.

The request id is the client's ``x-request-id`` when it is a sane token (≤128 printable ASCII
characters), else a fresh random one; it is bound into structlog's contextvars for every line
logged during the request, sent upstream, and returned to the client on every response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.contextvars import bind_contextvars, reset_contextvars

from .contract import CALL_KEY, REQUEST_ID_KEY, Call
from .errors import response_for
from .ids import random_hex

__all__ = [
    "UNMATCHED",
    "AccessLogMiddleware",
    "RequestObserver",
    "access_log_middleware",
    "add_request_id",
    "stamp_request_id",
]

log = structlog.get_logger("sidegate.access")


UNMATCHED = "unmatched"
"""The endpoint a request no route took is counted under (a 404, a 405)."""


class RequestObserver(Protocol):
    """Told of every answered request (metrics)."""

    def record(self, endpoint: str, status: int, latency_s: float) -> None: ...


class AccessLogMiddleware(Protocol):
    """An aiohttp middleware that can also be told the endpoint a request is counted under
    (bound with the handler, as the gateway binds it to each route: see ``endpoint`` below)."""

    def __call__(
        self, request: web.Request, handler: Handler, endpoint: str | None = None
    ) -> Awaitable[web.StreamResponse]: ...


def _client_request_id(value: str | None) -> str | None:
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return None


def access_log_middleware(
    *,
    observer: RequestObserver | None = None,
    envelope_errors: bool = False,
    stamp: Callable[[web.Request, web.StreamResponse], None] | None = None,
    send: bool = False,
) -> AccessLogMiddleware:
    """Assign the request id, and log one line (and tell ``observer``) when the request ends.

    The line holds: request id, method, path, status, latency; and, when routing made a
    :class:`~sidegate.middlewares.contract.Call`, upstream, model, team, stream, attempts,
    upstream status and latency, bytes sent. Never a header value, so never a credential.
    When the configured level filters info lines out, the line costs one level check.

    ``envelope_errors=True`` makes it also what :func:`~.errors.error_middleware` just inside it
    would be (errors answered with the envelope, and logged with that status), in one coroutine.
    ``stamp(request, response)`` is called on each response it returns that is not prepared yet
    (in place of an ``on_response_prepare`` signal: a streamed response, prepared inside the
    handler, is the handler's to stamp).

    ``send=True`` sends each answer it returns unprepared before it writes the line and tells
    ``observer``, when no app middleware outside it could still change that answer (its app and
    every app above it have none: sidegate served alone, or mounted in an app without
    middlewares; with one, aiohttp sends the answer after the line, as without ``send``). The
    line's cost then falls after the client has its answer, while the client reads it and sends
    its next request, instead of before; a streamed answer, sent by its handler, always was. So
    the line's latency runs until the answer was handed to the connection. Measured on a VM whose
    idle CPU halts at once, at one request at a time: the full chain's process went to sleep
    about once a request instead of twice, and spent 5% less CPU a request (26 µs of about 500;
    *VM O* in bench/HISTORY.md).

    ``observer`` is told the request's endpoint: ``endpoint`` when the caller binds one with the
    handler, else the matched resource's canonical path (``unmatched`` for none).
    """

    bound = _bound_request_id()

    @web.middleware
    async def access_log(
        request: web.Request, handler: Handler, endpoint: str | None = None
    ) -> web.StreamResponse:
        request_id = _client_request_id(request.headers.get("x-request-id"))
        request[REQUEST_ID_KEY] = request_id = request_id or random_hex(12)
        started = time.perf_counter()
        status = 500
        token = bound.set(request_id)
        try:
            try:
                response = await handler(request)
            except Exception as exc:
                answer = response_for(request, exc) if envelope_errors else None
                if answer is None:
                    raise
                response = answer
            status = response.status
            if not response.prepared:
                if stamp is not None:
                    stamp(request, response)
                if send and _last_word(request):
                    try:  # what aiohttp does once the handler returns
                        await response.prepare(request)
                        await response.write_eof()
                    except ConnectionError:  # the client left: aiohttp meets it too, quietly
                        pass
            return response
        finally:
            try:
                latency = time.perf_counter() - started
                logger = log.bind()  # the configured logger (cached by structlog when asked)
                if _enabled(logger):
                    _log(logger, request, request_id, status, latency)
                if observer is not None:
                    if endpoint is None:
                        resource = request.match_info.route.resource
                        endpoint = resource.canonical if resource is not None else UNMATCHED
                    observer.record(endpoint, status, latency)
            finally:
                bound.reset(token)

    return access_log


def _bound_request_id() -> ContextVar[Any]:
    """The context variable behind structlog's ``bind_contextvars(request_id=...)``.

    Setting it is what ``bind_contextvars`` does, less its keyword packing and name formatting
    on every request: the variable is the one the documented Token it returns names.
    """
    tokens = bind_contextvars(request_id=None)
    reset_contextvars(**tokens)
    return tokens["request_id"].var


def _last_word(request: web.Request) -> bool:
    """Whether nothing outside the handler can change its answer: no app on the request's way
    (the app its route is in, and any app that one is mounted in) has a middleware. Asked of
    each answer it would send: 0.3 µs (remembered per app, as 8c49ee0 did: 0.15 µs)."""
    return not any(app.middlewares for app in request.match_info.apps)


def _enabled(logger: Any) -> bool:
    """Whether ``logger`` would emit an info line (a logger that cannot tell: yes)."""
    check = getattr(logger, "is_enabled_for", None)
    return check is None or bool(check(logging.INFO))


def _log(logger: Any, request: web.Request, request_id: str, status: int, latency: float) -> None:
    call = request.get(CALL_KEY)
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": request.method,
        "path": request.path,
        "status": status,
        "latency_ms": round(latency * 1000.0, 3),
    }
    if call is not None:
        fields.update(_routed_fields(call))
    if type(logger) not in _FILTERING:
        logger.info("request", **fields)
        return
    # structlog's own filtering loggers: what their ``info`` does (``_proxy_to_logger``, made of
    # ``_process_event``, the helper structlog documents for wrapper classes), less three
    # re-packings of some twenty keyword arguments on the way there (about 3 µs a line).
    try:
        args, kwargs = logger._process_event("info", "request", fields)
        logger._logger.info(*args, **kwargs)
    except structlog.DropEvent:
        return


_FILTERING = frozenset(
    structlog.make_filtering_bound_logger(level)
    for level in (logging.NOTSET, logging.DEBUG, logging.INFO)
)
"""The wrapper classes whose enabled ``info`` is ``_proxy_to_logger`` and nothing more."""


def _routed_fields(call: Call) -> dict[str, Any]:
    """What the access line adds for a request routing made a Call for."""
    route = call.route
    upstream_ms = call.upstream_latency_ms
    principal = call.principal
    return {
        "upstream": route.upstream,
        "model": route.public_model,
        "upstream_model": route.upstream_model,
        "team": principal.team if principal is not None else None,
        "stream": call.stream,
        "attempts": call.attempts,
        "upstream_key": call.upstream_key_id,
        "upstream_status": call.upstream_status,
        "upstream_latency_ms": round(upstream_ms, 3) if upstream_ms is not None else None,
        "cache": call.cache_status,
        "cost_nano_usd": call.cost_nano_usd,
        "usage": call.usage,
        "bytes_in": len(call.body),
        "bytes_out": call.bytes_out,
    }


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: every response, streamed ones too, carries x-request-id."""
    add_request_id(request, response)


def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """What :func:`stamp_request_id` does, for an app that runs one prepare hook of its own."""
    try:  # not request.get(): that is Mapping's, two Python calls where this is one
        request_id = request[REQUEST_ID_KEY]
    except KeyError:
        return
    if request_id is not None:
        response.headers["x-request-id"] = request_id
