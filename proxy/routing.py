"""Routing: each request resolved once, early, into a :class:`Call`.

A JSON or multipart request goes to the upstream that serves the model its body names (``model``
for Meridian, ``service_id`` for Meivan; ``/v1/embeddings`` takes either). An alias is renamed in
the forwarded bytes and nowhere else. ``/upstreams/{name}/v1/...`` goes to one named upstream as is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_urldispatcher import AbstractRoute

from sidegate.middlewares.contract import (
    CALL_KEY,
    PRINCIPAL_KEY,
    REQUEST_ID_KEY,
    Call,
    EndpointKind,
    Principal,
    Route,
    Vendor,
    parse_object,
)
from sidegate.middlewares.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from sidegate.middlewares.ids import random_hex
from sidegate.middlewares.steps import StepMiddleware

from .body import (
    body_received,
    form_field_span,
    json_string_span,
    read_arriving,
    read_body,
    splice,
)
from .dialects import MODEL_FIELD, Endpoint
from .headers import media_type
from .paths import normalise_path
from .runtime import ModelTarget, Runtime

__all__ = ["ADMIN_ROLE", "PASSTHROUGH", "route_middleware"]

ADMIN_ROLE = "admin"

PASSTHROUGH = Endpoint(
    "*", "/upstreams/{name}/v1/{tail:.+}", EndpointKind.PASSTHROUGH, frozenset(), "json"
)


def route_middleware(
    runtime: Runtime, endpoints: Mapping[AbstractRoute, Endpoint], *, max_body_bytes: int
) -> Middleware:
    """Resolve every request to a routed endpoint into a :class:`Call` under ``CALL_KEY``.

    Requests to other routes (listings, health) pass through untouched. Bad input is refused
    here, before any upstream connection: 400 (path, JSON, missing field), 404 (unknown model or
    upstream), 413 (body over ``max_body_bytes``), 415 (content type). So is what the caller may
    not do: a model outside its allowlist (403 ``model_not_allowed``), ``/upstreams/...``
    without the admin role (403 ``admin_required``), no Principal at all (401). A step
    (:mod:`sidegate.middlewares.steps`): all of it happens before the handler, and without a
    coroutine when the body has all arrived with the request (the usual JSON request).
    """

    safe_paths: dict[str, str] = {}  # raw paths seen to pass normalise_path, and the result
    routes: dict[tuple[str, str], Route] = {}  # by endpoint path and public model

    def routing(request: web.Request) -> Awaitable[None] | None:
        endpoint = endpoints.get(request.match_info.route)
        if endpoint is None:
            return None
        raw_path = request.raw_path
        path = safe_paths.get(raw_path)
        if path is None:
            path = normalise_path(raw_path)
            if len(safe_paths) < _REMEMBERED_PATHS:
                safe_paths[raw_path] = path
        try:  # request.get() is Mapping's, in Python: two calls where this is one
            principal = request[PRINCIPAL_KEY]
        except KeyError:
            raise Unauthorized("No API key was provided.") from None
        try:
            request_id = request[REQUEST_ID_KEY] or random_hex(12)
        except KeyError:
            request_id = random_hex(12)
        if endpoint is PASSTHROUGH:
            if ADMIN_ROLE not in principal.roles:
                raise Forbidden("/upstreams/... needs the admin role.", code="admin_required")
            return _route_passthrough(request, path, principal, request_id)
        content_type = _content_type(request, endpoint)
        body = body_received(request, max_body_bytes)
        if body is None:  # still arriving: wait for it in a coroutine
            return _route_later(request, endpoint, principal, request_id, content_type)
        _route(request, endpoint, principal, request_id, content_type, body)
        return None

    async def _route_passthrough(
        request: web.Request, path: str, principal: Principal, request_id: str
    ) -> None:
        call = await _passthrough(request, runtime, path, request_id, max_body_bytes)
        call.principal = principal
        request[CALL_KEY] = call

    async def _route_later(
        request: web.Request,
        endpoint: Endpoint,
        principal: Principal,
        request_id: str,
        content_type: str,
    ) -> None:
        body = await read_arriving(request, max_body_bytes)
        _route(request, endpoint, principal, request_id, content_type, body)

    def _route(
        request: web.Request,
        endpoint: Endpoint,
        principal: Principal,
        request_id: str,
        content_type: str,
        body: bytes,
    ) -> None:
        call = _routed(runtime, endpoint, request_id, body, content_type, routes)
        route = call.route
        assert route.public_model is not None
        if not principal.may_use(route.public_model, route.upstream_model):
            raise Forbidden(
                f"This caller may not use {route.public_model!r}.",
                param=MODEL_FIELD[route.vendor],
                code="model_not_allowed",
            )
        call.principal = principal
        request[CALL_KEY] = call

    return StepMiddleware(routing)


_REMEMBERED_PATHS = 256


async def _passthrough(
    request: web.Request, runtime: Runtime, path: str, request_id: str, limit: int
) -> Call:
    name = request.match_info["name"]
    target = runtime.upstreams.get(name)
    if target is None:
        raise NotFound(f"There is no upstream named {name!r}.", code="upstream_not_found")
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else PASSTHROUGH.path
    mount = canonical[: canonical.index("/upstreams/")]
    if not path.startswith(mount + "/upstreams/"):
        raise BadRequest("The request path is not a valid API path.", code="invalid_path")
    rest = path[len(mount) + len("/upstreams/") :]
    upstream_path = rest[rest.index("/") :]
    body = await read_body(request, limit)
    route = Route(target.name, target.vendor, EndpointKind.PASSTHROUGH, upstream_path)
    return Call(request_id, route, body, request.headers.get("Content-Type", ""))


def _content_type(request: web.Request, endpoint: Endpoint) -> str:
    """The request's Content-Type header, once its media type is what ``endpoint`` takes (415).

    The media type is read by :func:`~.headers.media_type`, which reads it as aiohttp does;
    aiohttp's parser runs only for a refusal, for the type its message names.
    """
    expected = "application/json" if endpoint.body == "json" else "multipart/form-data"
    if media_type(request.headers) != expected:
        raise UnsupportedMediaType(
            f"{endpoint.path} takes {expected}, not {request.content_type or 'an empty type'}."
        )
    return request.headers.get("Content-Type", "")


def _routed(
    runtime: Runtime,
    endpoint: Endpoint,
    request_id: str,
    body: bytes,
    content_type: str,
    routes: dict[tuple[str, str], Route],
) -> Call:
    payload: dict[str, Any] | None = None
    if endpoint.body == "json":
        payload = parse_object(body)
        name, field = _json_model(payload, endpoint)
        target = _resolve(runtime, name, field, endpoint)
        if target.public != target.upstream_model:
            body = _rename_json(body, payload, field, target.upstream_model)
            payload[field] = target.upstream_model
    else:
        span = form_field_span(body, content_type, "model")
        if span is None:
            raise BadRequest("The form field 'model' is required.", param="model")
        name = body[span[0] : span[1]].decode("utf-8", "replace")
        target = _resolve(runtime, name, "model", endpoint)
        if target.public != target.upstream_model:
            body = splice(body, span, target.upstream_model.encode())
    route = routes.get((endpoint.path, target.public))
    if route is None:  # one per endpoint and model of this config: remembered
        upstream = target.upstream
        route = routes[(endpoint.path, target.public)] = Route(
            upstream.name,
            upstream.vendor,
            endpoint.kind,
            endpoint.path,
            target.public,
            target.upstream_model,
        )
    stream = payload is not None and payload.get("stream") is True
    return Call(request_id, route, body, content_type, stream=stream, _json=payload)


def _json_model(payload: Mapping[str, Any], endpoint: Endpoint) -> tuple[str, str]:
    fields = _FIELDS_FOR[endpoint.vendors]
    present = [field for field in fields if field in payload]
    if not present:
        raise BadRequest(f"The field '{fields[0]}' is required.", param=fields[0])
    if len(present) > 1:
        raise BadRequest(
            f"Give either '{present[0]}' or '{present[1]}', not both.", param=present[1]
        )
    value = payload[present[0]]
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{present[0]}' must be a non-empty string.", param=present[0])
    return value, present[0]


_FIELDS_FOR = {
    frozenset({Vendor.MERIDIAN}): (MODEL_FIELD[Vendor.MERIDIAN],),
    frozenset({Vendor.MEIVAN}): (MODEL_FIELD[Vendor.MEIVAN],),
    frozenset({Vendor.MERIDIAN, Vendor.MEIVAN}): (
        MODEL_FIELD[Vendor.MERIDIAN],
        MODEL_FIELD[Vendor.MEIVAN],
    ),
}


def _resolve(runtime: Runtime, name: str, field: str, endpoint: Endpoint) -> ModelTarget:
    target = runtime.models.get(name)
    if target is None:
        kind = "service" if field == "service_id" else "model"
        raise NotFound(f"The {kind} {name!r} does not exist.", param=field, code="model_not_found")
    vendor = target.upstream.vendor
    if vendor not in endpoint.vendors:
        raise BadRequest(
            f"{name!r} is served by {vendor.value}, which has no {endpoint.path}.",
            param=field,
            code="model_not_supported",
        )
    if MODEL_FIELD[vendor] != field:
        raise BadRequest(
            f"{name!r} is a {vendor.value} model: name it with '{MODEL_FIELD[vendor]}'.",
            param=field,
            code="model_not_supported",
        )
    return target


def _rename_json(body: bytes, payload: dict[str, Any], field: str, new: str) -> bytes:
    span = json_string_span(body, field)
    if span is not None:
        return splice(body, span, orjson.dumps(new))
    return orjson.dumps({**payload, field: new})
