"""The request path shared by both mocks: record, apply the scripted fault, authenticate, answer.

:func:`mock_middleware` wraps every vendor endpoint. Endpoints stay oblivious of faults except
for streams, which go out through :func:`send_events` so pacing and mid-stream resets apply.
Paths under ``/_mock/`` are the control endpoints: not recorded, not authenticated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import ApiError, Dialect, error_response, fault_response
from .state import Fault, MockState, Received

__all__ = [
    "CONTROL_PREFIX",
    "FAULT",
    "MAX_BODY",
    "MOCK_STATE",
    "TOKENS",
    "json_response",
    "mock_middleware",
    "read_object",
    "send_events",
]

CONTROL_PREFIX = "/_mock/"
MAX_BODY = 256 * 1024 * 1024
MOCK_STATE: web.AppKey[MockState] = web.AppKey("sidegate.mock.state", MockState)
FAULT: web.RequestKey[Fault] = web.RequestKey("sidegate.mock.fault", Fault)
TOKENS: web.RequestKey[int] = web.RequestKey("sidegate.mock.tokens", int)

_POLL_S = 0.05
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def mock_middleware(dialect: Dialect) -> Middleware:
    """The middleware of a mock speaking ``dialect``; the state is ``app[MOCK_STATE]``."""

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            try:
                response: web.StreamResponse = await handler(request)
            except ApiError as exc:
                return error_response(dialect, exc)
            return response
        return await _serve(request, handler, dialect, request.config_dict[MOCK_STATE])

    return impl


async def _serve(
    request: web.Request, handler: Handler, dialect: Dialect, state: MockState
) -> web.StreamResponse:
    body = await request.read()
    fault = state.record(
        Received(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
        )
    )
    if fault is not None:
        request[FAULT] = fault
        if fault.delay_s > 0 and not await _linger(request, fault.delay_s):
            return web.Response()
    response: web.StreamResponse
    try:
        if fault is not None and (fault.status is not None or fault.body is not None):
            response = fault_response(dialect, fault)
        else:
            _authenticate(request, state)
            response = await handler(request)
    except ApiError as exc:
        response = error_response(dialect, exc)
    except web.HTTPException as exc:
        response = error_response(dialect, ApiError(exc.status))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    if fault is not None and not response.prepared:
        response.headers.update(fault.headers)
        if fault.reset_after_events is not None:
            _abort(request)
    return response


def _authenticate(request: web.Request, state: MockState) -> None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "You didn't provide an API key in an Authorization: Bearer header.")
    if state.accepted_keys is not None and key not in state.accepted_keys:
        raise ApiError(401)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _linger(request: web.Request, seconds: float) -> bool:
    """Sleep ``seconds``, waking early when the client goes away; False if it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not _gone(request):
        left = deadline - loop.time()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, _POLL_S))
    return False


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 in the envelope."""
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "The body of the request is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "The body of the request must be a JSON object.")
    return payload


def json_response(payload: Any, *, status: int = 200) -> web.Response:
    """``payload`` serialised with orjson as ``application/json``."""
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


async def send_events(request: web.Request, events: Sequence[bytes]) -> web.StreamResponse:
    """Stream ``events`` (each a complete SSE frame) as ``text/event-stream``, one write each.

    Honours the request's fault (extra headers, pace, reset after N events) and counts the
    stream in ``open_streams``; a client that goes away mid-stream counts in ``disconnects``,
    whether the server notices on the next write or cancels the handler when the peer closes.
    """
    state = request.config_dict[MOCK_STATE]
    fault = request.get(FAULT)
    pace = state.default_pace_s
    cut: int | None = None
    response = web.StreamResponse(headers=_SSE_HEADERS)
    if fault is not None:
        response.headers.update(fault.headers)
        pace = fault.pace_s or pace
        cut = fault.reset_after_events
    await response.prepare(request)
    state.stream_opened()
    client_left = False
    try:
        client_left = not await _write_events(request, response, events, pace, cut)
    except ConnectionError:
        client_left = True
    except asyncio.CancelledError:
        client_left = _gone(request)
        raise
    finally:
        state.stream_closed(client_left=client_left)
    return response


async def _write_events(
    request: web.Request,
    response: web.StreamResponse,
    events: Sequence[bytes],
    pace: float,
    cut: int | None,
) -> bool:
    """Write ``events`` paced and cut as told; False when the client left during a pause."""
    for i, event in enumerate(events):
        if i == cut:
            _abort(request)
            return True
        if i and pace > 0 and not await _linger(request, pace):
            return False
        await response.write(event)
    if cut is None:
        await response.write_eof()
    else:
        _abort(request)
    return True
