"""The error tree sidegate raises, and the one place it becomes an HTTP response.

Every error sidegate itself produces is a :class:`SidegateError` (or an aiohttp ``HTTPException``
from the router) and leaves through :func:`error_response` as the envelope both vendors share::

    {"error": {"type": ..., "message": ..., "param": ..., "code": ...}}

Messages are written by sidegate, never copied from a request header or an upstream secret, so an
error cannot echo a credential.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Self

import orjson
import structlog
from aiohttp import web

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "Forbidden",
    "NotFound",
    "SidegateError",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamError",
    "envelope",
    "error_middleware",
    "error_response",
    "response_for",
]

log = structlog.get_logger(__name__)


class SidegateError(Exception):
    """Base of every error sidegate produces; carries what the envelope needs."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def with_type(self, type_: str) -> Self:
        self.type = type_
        return self


class BadRequest(SidegateError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(SidegateError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UnsupportedMediaType(SidegateError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class BodyTooLarge(SidegateError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unauthorized(SidegateError):
    """No credential, or one sidegate does not accept (401, with ``WWW-Authenticate``)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(
            message, code=code, headers={"WWW-Authenticate": 'Bearer realm="sidegate"'}
        )


class Forbidden(SidegateError):
    """An authenticated caller asked for something it may not use (403)."""

    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class UpstreamError(SidegateError):
    """The upstream could not be reached or did not answer in time (502/504)."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


def envelope(
    type_: str, message: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"type": type_, "message": message, "param": param, "code": code}}
    )


def error_response(exc: SidegateError) -> web.Response:
    """The single mapping from a :class:`SidegateError` to a response."""
    return web.Response(
        status=exc.status,
        body=envelope(exc.type, exc.message, param=exc.param, code=exc.code),
        content_type="application/json",
        headers=exc.headers,
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def error_middleware(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    endpoint: str | None = None,
) -> web.StreamResponse:
    """Turn every error raised below into the envelope; an unexpected one is logged as a 500.

    ``endpoint`` is taken and not used: the middleware can then stand where an access log
    middleware is bound to a route with its endpoint (the knock-out tool puts it there)."""
    try:
        return await handler(request)
    except Exception as exc:
        response = response_for(request, exc)
        if response is None:
            raise
        return response


def response_for(request: web.Request, exc: Exception) -> web.Response | None:
    """What :func:`error_middleware` answers for ``exc``, raised while handling ``request``;
    ``None`` for an HTTP exception under 400 (a redirect), which goes on up as it is.

    Call it from an ``except`` clause: an unexpected error is logged with its traceback.
    """
    if isinstance(exc, SidegateError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        return _http_error(request, exc) if exc.status >= 400 else None
    log.exception("unhandled_error", path=request.path)
    return error_response(SidegateError("sidegate failed to handle the request."))


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = f"There is no endpoint {request.path}."
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {request.path}."
    else:
        message = exc.reason
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return error_response(
        SidegateError(
            message,
            status=exc.status,
            code=_HTTP_CODES.get(exc.status, f"http_{exc.status}"),
            headers=headers,
        ).with_type("invalid_request_error")
    )
