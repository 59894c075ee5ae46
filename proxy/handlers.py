"""Endpoints sidegate answers itself: listings from config, health, metrics."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidegate.middlewares.contract import PRINCIPAL_KEY, Vendor
from sidegate.middlewares.errors import Forbidden

from .dialects import meivan, meridian
from .dialects.meivan import services_page
from .routing import ADMIN_ROLE
from .state import ACTIVE_KEY, STATE_KEY
from .usage import budget_report, parse_usage_query, usage_body

__all__ = [
    "admin_budgets",
    "healthz",
    "list_models",
    "list_services",
    "local_usage",
    "metrics",
    "readyz",
]

_JSON = "application/json"


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the Meridian models and aliases the caller may use (OpenAI list)."""
    runtime = request[ACTIVE_KEY].runtime
    targets = runtime.listing(Vendor.MERIDIAN, request.get(PRINCIPAL_KEY))
    body = meridian.models_list((t.public for t in targets), created=int(runtime.loaded_at))
    return web.Response(body=body, content_type=_JSON)


async def list_services(request: web.Request) -> web.Response:
    """``GET /v1/services``: the Meivan services and aliases the caller may use, paginated."""
    targets = request[ACTIVE_KEY].runtime.listing(Vendor.MEIVAN, request.get(PRINCIPAL_KEY))
    page = services_page(
        [meivan.service(t.public, t.upstream.name, t.entry) for t in targets], request.query
    )
    return web.Response(body=orjson.dumps(page), content_type=_JSON)


async def local_usage(request: web.Request) -> web.Response:
    """``GET /v1/usage``: the caller's team's usage from sidegate's ledger (Meridian's shape)."""
    principal = request.get(PRINCIPAL_KEY)
    if principal is None:
        raise Forbidden("usage needs a caller.")
    since, until, granularity = parse_usage_query(request.query)
    stores = request.config_dict[STATE_KEY].stores
    report = await stores.ledger.aggregate(principal.team, since, until, granularity)
    return web.Response(body=orjson.dumps(usage_body(report)), content_type=_JSON)


async def admin_budgets(request: web.Request) -> web.Response:
    """``GET /admin/budgets`` (admin role): every team's spend, reservations and limit."""
    principal = request.get(PRINCIPAL_KEY)
    if principal is None or ADMIN_ROLE not in principal.roles:
        raise Forbidden("/admin/budgets needs the admin role.", code="admin_required")
    state = request.config_dict[STATE_KEY]
    rows = await budget_report(request[ACTIVE_KEY].runtime.config, state.stores)
    return web.Response(body=orjson.dumps({"object": "list", "data": rows}), content_type=_JSON)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """Ready: a config is loaded and the upstream session is open; 503 otherwise."""
    state = request.config_dict[STATE_KEY]
    active = state.active
    session_open = state._session is not None and not state._session.closed
    ready = active is not None and session_open
    detail = {
        "status": "ready" if ready else "not_ready",
        "config_loaded_at": active.runtime.loaded_at if active else None,
        "upstream_session_open": session_open,
        "upstreams": sorted(active.runtime.upstreams) if active else [],
        "keys": {
            upstream: [{"id": key.id, "state": key.state, "until": key.until} for key in keys]
            for upstream, keys in sorted(state.key_pools.snapshot().items())
        },
    }
    return web.Response(status=200 if ready else 503, body=orjson.dumps(detail), content_type=_JSON)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry (``auth.metrics_role`` if set)."""
    state = request.config_dict[STATE_KEY]
    role = state.active.runtime.config.auth.metrics_role if state.active else None
    if role is not None:
        principal = request.get(PRINCIPAL_KEY)
        if principal is None or role not in principal.roles:
            raise Forbidden(f"/metrics needs the {role!r} role.", code="role_required")
    body = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})
