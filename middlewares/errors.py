"""The error tree sidegate raises, and the one place it becomes an HTTP response.

Every error sidegate itself produces is a :class:`SidegateError` (or an aiohttp ``HTTPException``
from the router) and leaves through :func:`error_response` as the envelope both vendors share::

    {"error": {"type": ..., "message": ..., "param": ..., "code": ...}}

Messages are written by sidegate, never copied from a request header or an upstream secret, so an
error cannot echo a credential.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "NotFound",
    "SidegateError",
    "UnsupportedMediaType",
    "UpstreamError",
    "envelope",
    "error_response",
]


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


class UpstreamError(SidegateError):
    """The upstream could not be reached or did not answer in time (502/504)."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


def envelope(
    type_: str, message: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps({"error": {"type": type_, "message": message, "param": param, "code": code}})


def error_response(exc: SidegateError) -> web.Response:
    """The single mapping from a :class:`SidegateError` to a response."""
    return web.Response(
        status=exc.status,
        body=envelope(exc.type, exc.message, param=exc.param, code=exc.code),
        content_type="application/json",
        headers=exc.headers,
    )
