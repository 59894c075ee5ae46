"""The vendors' error envelope, and the one place a mock error becomes an HTTP response.

Both vendors answer errors as ``{"error": {"type", "message", "param", "code"}}``. They differ
only in the wording of a 429 and in Meridian's extra top-level ``retry-after`` body field; a
:class:`Dialect` carries those differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from .state import Fault

__all__ = ["MEIVAN", "MERIDIAN", "ApiError", "Dialect", "error_response", "fault_response"]

_JSON = "application/json"

_BY_STATUS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "The request is invalid."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", "permission_denied", "This key may not use this resource."),
    404: ("invalid_request_error", "not_found", "Unknown request URL."),
    405: ("invalid_request_error", "method_not_allowed", "Method not allowed for this URL."),
    409: ("invalid_request_error", "conflict", "The request conflicts with another one."),
    413: ("invalid_request_error", "request_too_large", "The request body is too large."),
    429: ("rate_limit_exceeded", "rate_limit", "Rate limit reached for requests."),
    500: ("server_error", "internal_error", "The server had an error processing the request."),
    502: ("server_error", "bad_gateway", "The server received a bad upstream response."),
    503: ("server_error", "service_unavailable", "The server is overloaded or not ready yet."),
    504: ("server_error", "gateway_timeout", "The server timed out waiting upstream."),
}


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one vendor words its errors."""

    name: str
    rate_limit_message: str
    retry_after_in_body: bool


MERIDIAN = Dialect("meridian", "Rate limit reached for requests.", retry_after_in_body=True)
MEIVAN = Dialect("meivan", "Too many requests for this workspace.", retry_after_in_body=False)


class ApiError(Exception):
    """An error answer: raised by endpoint code, rendered by :func:`error_response`."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        kind, default_code, default_message = _describe(status)
        super().__init__(message or default_message)
        self.status = status
        self.type = kind
        self.message = message or default_message
        self.param = param
        self.code = code or default_code


def _describe(status: int) -> tuple[str, str, str]:
    known = _BY_STATUS.get(status)
    if known is not None:
        return known
    if status >= 500:
        return ("server_error", "server_error", "The server had an error.")
    return ("invalid_request_error", "invalid_request", "The request failed.")


def _seconds(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def error_response(
    dialect: Dialect, error: ApiError, *, retry_after: float | None = None
) -> web.Response:
    """The enveloped JSON response for ``error``, with ``Retry-After`` when given."""
    message = dialect.rate_limit_message if error.status == 429 else error.message
    body: dict[str, object] = {
        "error": {"type": error.type, "message": message, "param": error.param, "code": error.code}
    }
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = str(_seconds(retry_after))
        if error.status == 429 and dialect.retry_after_in_body:
            body["retry-after"] = _seconds(retry_after)
    return web.Response(
        status=error.status, body=orjson.dumps(body), content_type=_JSON, headers=headers
    )


def fault_response(dialect: Dialect, fault: Fault) -> web.Response:
    """The answer a fault with a ``status`` (or a ``body``) gives instead of the endpoint's."""
    status = 200 if fault.status is None else fault.status
    if fault.body is None:
        return error_response(dialect, ApiError(status), retry_after=fault.retry_after)
    headers = {} if fault.retry_after is None else {"Retry-After": str(_seconds(fault.retry_after))}
    return web.Response(status=status, body=fault.body, content_type=_JSON, headers=headers)
