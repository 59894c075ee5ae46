"""The app factory and its lifecycle: standalone, or mounted into an existing aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidegate.config import load_config
from sidegate.config.models import MemoryStore, RedisStore, SidegateConfig, SqliteStore
from sidegate.middlewares.access_log import access_log_middleware
from sidegate.middlewares.errors import SidegateError
from sidegate.middlewares.store import Stores, open_stores
from sidegate.middlewares.store.leases import LeasedStores

from . import handlers
from .dialects import ENDPOINTS
from .forward import forward_handler
from .headers import UpstreamRequest, stamp_response
from .observability import Metrics
from .reload import activate, watch_config_file
from .routing import PASSTHROUGH
from .state import ACTIVE_KEY, STATE_KEY, GatewayState

__all__ = ["create_app", "held_secrets", "open_store", "setup"]

_UPSTREAM_CONNECTIONS = 1024


def create_app(config: SidegateConfig | str | os.PathLike[str]) -> web.Application:
    """The sidegate aiohttp app for ``config`` (a loaded config, or the path of a YAML file).

    Created from a path, the app reloads when the file changes (``server.watch_config``) and
    from :func:`sidegate.proxy.reload.reload_config` (which ``sidegate serve`` calls on SIGHUP).
    The upstream ``ClientSession`` and the built-in mocks live in ``cleanup_ctx``.
    """
    path = None if isinstance(config, SidegateConfig) else Path(config)
    loaded = load_config(path) if path is not None else config
    assert isinstance(loaded, SidegateConfig)
    metrics = Metrics()
    app = web.Application(
        middlewares=[
            access_log_middleware(observer=metrics, envelope_errors=True, stamp=stamp_response)
        ],
        handler_args={"max_field_size": 65536},
    )
    router = app.router
    endpoints = {router.add_route(e.method, e.path, forward_handler): e for e in ENDPOINTS}
    endpoints[router.add_route("*", PASSTHROUGH.path, forward_handler)] = PASSTHROUGH
    router.add_get("/v1/models", handlers.list_models, allow_head=False)
    router.add_get("/v1/services", handlers.list_services, allow_head=False)
    router.add_get("/v1/usage", handlers.local_usage, allow_head=False)
    router.add_get("/admin/budgets", handlers.admin_budgets, allow_head=False)
    open_resources = frozenset(
        {
            router.add_get("/healthz", handlers.healthz).resource,
            router.add_get("/readyz", handlers.readyz).resource,
        }
    )
    state = GatewayState(
        metrics=metrics,
        endpoints=endpoints,
        open_resources=open_resources,
        metrics_resource=router.add_get("/metrics", handlers.metrics).resource,
        config_path=path,
    )
    metrics.watch_keys(state.key_pools)
    app[STATE_KEY] = state
    app.middlewares.append(_dispatch(state))
    app.cleanup_ctx.append(_lifecycle(loaded))
    return app


def setup(
    app: web.Application,
    config: SidegateConfig | str | os.PathLike[str],
    *,
    prefix: str = "/llm",
) -> web.Application:
    """Mount sidegate into ``app`` under ``prefix``; returns the sidegate sub-application."""
    gateway = create_app(config)
    app.add_subapp(prefix, gateway)
    return gateway


def held_secrets(app: web.Application) -> frozenset[str]:
    """The secret values the app's current config holds (for the log redactor)."""
    active = app[STATE_KEY].active
    return active.runtime.secrets if active is not None else frozenset()


def _dispatch(state: GatewayState) -> Middleware:
    """Run the current runtime's policy chain.

    Health, router errors (404/405) and an open ``/metrics`` bypass it: they need no caller.
    The middleware only chooses what runs, so it returns that awaitable rather than awaiting it
    in a coroutine of its own: one frame fewer on every request's stack.
    """

    @web.middleware
    def dispatch(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        match = request.match_info
        resource = match.route.resource
        if match.http_exception is not None or resource in state.open_resources:
            return handler(request)
        active = state.active
        if active is None:
            raise SidegateError("sidegate is not ready.", status=503, code="not_ready")
        if resource is state.metrics_resource and active.runtime.config.auth.metrics_role is None:
            return handler(request)
        request[ACTIVE_KEY] = active
        return active.chain(handler)(request)

    return dispatch


async def open_store(store: MemoryStore | SqliteStore | RedisStore) -> Stores:
    """The store named by config; it stays open across reloads (a new ``store`` needs a restart).

    With ``batch_s`` the meter admits from leases and settles in batches
    (:mod:`sidegate.middlewares.store.leases`)."""
    if isinstance(store, SqliteStore):
        stores = await open_stores("sqlite", path=store.path)
    elif isinstance(store, RedisStore):
        stores = await open_stores("redis", url=store.url)
    else:
        return await open_stores("memory")
    return LeasedStores(stores, batch_s=store.batch_s) if store.batch_s > 0 else stores


def _lifecycle(
    config: SidegateConfig,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE_KEY]
        connector = aiohttp.TCPConnector(limit=_UPSTREAM_CONNECTIONS, ttl_dns_cache=300)
        # No cookie jar: one session serves every caller, so a cookie an upstream sets must not
        # ride along on the next caller's request (it still reaches the client it was sent to).
        state._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            request_class=UpstreamRequest,  # the client's User-Agent or none, never aiohttp's
        )
        watcher: asyncio.Task[None] | None = None
        try:
            state._stores = await open_store(config.store)
            await activate(app, config)
            if state.config_path is not None and config.server.watch_config:
                watcher = asyncio.create_task(watch_config_file(app))
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await state._session.close()
            if state.pending_commits:
                await asyncio.wait(state.pending_commits, timeout=config.server.shutdown_grace_s)
            if state._stores is not None:
                await state._stores.close()
            if state.vector_cache is not None:
                await state.vector_cache.close()
            for runner in state.mock_runners:
                await runner.cleanup()

    return lifecycle
