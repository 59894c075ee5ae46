"""HTTP control endpoints for driving a mock from another process.

``POST /_mock/script`` queues faults: ``{"path": "/v1/..." | null, "faults": [{Fault fields}]}``
(``body`` is given as text and sent UTF-8 encoded). ``GET /_mock/received`` reports
``{"count", "by_path", "disconnects", "open_streams"}``. ``POST /_mock/reset`` calls
:meth:`MockState.reset`. None of them is recorded or authenticated.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from aiohttp import web

from .errors import ApiError
from .pipeline import CONTROL_PREFIX, MOCK_STATE, json_response, read_object
from .state import Fault

__all__ = ["add_control_routes", "fault_from_json"]

_FAULT_FIELDS = frozenset(f.name for f in fields(Fault))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ApiError(400, f"Fault field '{name}' must be {expected}.", param=name)


def fault_from_json(obj: Any) -> Fault:
    """A :class:`Fault` from its JSON form; unknown or ill-typed fields are a 400."""
    if not isinstance(obj, dict):
        raise ApiError(400, "Each fault must be an object.", param="faults")
    unknown = sorted(obj.keys() - _FAULT_FIELDS)
    if unknown:
        raise ApiError(400, f"Unknown fault fields: {', '.join(unknown)}.", param="faults")
    status = obj.get("status")
    _check(status is None or (_count(status) and 100 <= status <= 599), "status", "100..599")
    retry_after = obj.get("retry_after")
    _check(retry_after is None or _number(retry_after), "retry_after", "a number >= 0")
    headers = obj.get("headers", {})
    _check(
        isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values()),
        "headers",
        "an object of strings",
    )
    for name in ("delay_s", "pace_s"):
        _check(_number(obj.get(name, 0.0)), name, "a number >= 0")
    reset = obj.get("reset_after_events")
    _check(reset is None or _count(reset), "reset_after_events", "an integer >= 0")
    body = obj.get("body")
    _check(body is None or isinstance(body, str), "body", "a string")
    return Fault(
        status=status,
        retry_after=retry_after,
        headers=dict(headers),
        delay_s=float(obj.get("delay_s", 0.0)),
        pace_s=float(obj.get("pace_s", 0.0)),
        reset_after_events=reset,
        body=None if body is None else body.encode(),
    )


async def _script(request: web.Request) -> web.StreamResponse:
    payload = await read_object(request)
    path = payload.get("path")
    faults = payload.get("faults")
    if path is not None and not isinstance(path, str):
        raise ApiError(400, "'path' must be a string or null.", param="path")
    if not isinstance(faults, list):
        raise ApiError(400, "'faults' must be an array.", param="faults")
    parsed = [fault_from_json(f) for f in faults]
    request.config_dict[MOCK_STATE].script(*parsed, path=path)
    return json_response({"queued": len(parsed)})


async def _received(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[MOCK_STATE]
    return json_response(
        {
            "count": state.count(),
            "by_path": state.by_path(),
            "disconnects": state.disconnects,
            "open_streams": state.open_streams,
        }
    )


async def _reset(request: web.Request) -> web.StreamResponse:
    request.config_dict[MOCK_STATE].reset()
    return json_response({"reset": True})


def add_control_routes(app: web.Application) -> None:
    """Mount the control endpoints under ``/_mock/`` on ``app``."""
    app.router.add_post(CONTROL_PREFIX + "script", _script)
    app.router.add_get(CONTROL_PREFIX + "received", _received)
    app.router.add_post(CONTROL_PREFIX + "reset", _reset)
