"""The app factory and its lifecycle: standalone, or mounted into an existing aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import AbstractRoute

from sidegate.config import load_config
from sidegate.config.models import MemoryStore, RedisStore, SidegateConfig, SqliteStore
from sidegate.middlewares.access_log import UNMATCHED, AccessLogMiddleware, access_log_middleware
from sidegate.middlewares.errors import SidegateError
from sidegate.middlewares.store import Stores, open_stores
from sidegate.middlewares.store.leases import LeasedStores

from . import handlers
from .dialects import ENDPOINTS, Endpoint
from .forward import forward_handler
from .headers import UpstreamRequest, stamp_response
from .observability import Metrics
from .reload import activate, watch_config_file
from .routing import PASSTHROUGH
from .state import ACTIVE_KEY, STATE_KEY, GatewayState

__all__ = ["create_app", "held_secrets", "open_store", "setup"]

_UPSTREAM_CONNECTIONS = 1024


def create_app(
    config: SidegateConfig | str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
) -> web.Application:
    """The sidegate aiohttp app for ``config`` (a loaded config, or the path of a YAML file).

    Created from a path, the app reloads when the file changes (``server.watch_config``) and
    from :func:`sidegate.proxy.reload.reload_config` (which ``sidegate serve`` calls on SIGHUP).
    ``source`` is the file a loaded ``config`` was read from: the app reloads from it as if it
    had been created from that path, without reading it again now (``sidegate serve`` loads the
    file once, to refuse a bad one before anything starts, and builds the app from what it read).
    The upstream ``ClientSession`` and the built-in mocks live in ``cleanup_ctx``.
    """
    if isinstance(config, SidegateConfig):
        loaded = config
        path = Path(source) if source is not None else None
    else:
        if source is not None:
            raise TypeError("source names the file of a loaded config; config is a path here")
        path = Path(config)
        loaded = load_config(path)
    if isinstance(loaded.store, SqliteStore):
        # The backend is imported only for a store that needs it (a memory-store gateway is about
        # 1 MB smaller without sqlite3), and then now, with the rest of start-up: imported when the
        # store opens, inside the running loop, it left the process 0.2–0.3 MB larger (VM R in
        # bench/HISTORY.md).
        importlib.import_module("sidegate.middlewares.store.sqlite")
    metrics = Metrics()
    app = web.Application(handler_args={"max_field_size": 65536})
    endpoints: dict[AbstractRoute, Endpoint] = {}
    state = GatewayState(metrics=metrics, endpoints=endpoints, config_path=path)
    entries = _Entries(
        state,
        access_log_middleware(
            observer=metrics, envelope_errors=True, stamp=stamp_response, send=True
        ),
    )
    policed = entries.policed
    router = app.router
    for e in ENDPOINTS:
        endpoints[router.add_route(e.method, e.path, policed(forward_handler))] = e
    endpoints[router.add_route("*", PASSTHROUGH.path, policed(forward_handler))] = PASSTHROUGH
    router.add_get("/v1/models", policed(handlers.list_models), allow_head=False)
    router.add_get("/v1/services", policed(handlers.list_services), allow_head=False)
    router.add_get("/v1/usage", policed(handlers.local_usage), allow_head=False)
    router.add_get("/admin/budgets", policed(handlers.admin_budgets), allow_head=False)
    router.add_get("/healthz", entries.open(handlers.healthz))
    router.add_get("/readyz", entries.open(handlers.readyz))
    router.add_get("/metrics", policed(handlers.metrics, metrics=True))
    entries.refuse_the_rest(router)
    metrics.watch_keys(state.key_pools)
    app[STATE_KEY] = state
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


class _Entries:
    """The handlers aiohttp calls: the access log (answering errors with the envelope) bound
    around what each route runs, so the app has no middleware at all.

    An app middleware costs every request aiohttp's middleware machinery: the chain looked up in
    a cache, a ``partial`` called per middleware, and the coroutine aiohttp adds to set
    ``match_info.current_app``. Bound at registration, the access log is the handler itself.
    Then the router's own refusals (404, 405), which only a middleware could answer, are routes
    too (:meth:`refuse_the_rest`), answered in the envelope and logged as ``unmatched``, as before.
    """

    def __init__(self, state: GatewayState, logged: AccessLogMiddleware) -> None:
        self._state = state
        self._logged = logged

    def policed(self, handler: Handler, *, metrics: bool = False) -> Handler:
        """``handler`` behind the current runtime's policy chain (auth first); with ``metrics``,
        the chain only when ``auth.metrics_role`` asks for a caller. 503 before a config is
        active."""
        state = self._state

        def dispatch(request: web.Request) -> Awaitable[web.StreamResponse]:
            # Not a coroutine: it returns the chain's awaitable, one frame fewer on the stack.
            active = state.active
            if active is None:
                raise SidegateError("sidegate is not ready.", status=503, code="not_ready")
            if metrics and active.runtime.config.auth.metrics_role is None:
                return handler(request)
            request[ACTIVE_KEY] = active
            return active.chain(handler)(request)

        return functools.partial(self._logged, handler=dispatch)

    def open(self, handler: Handler, *, endpoint: str | None = None) -> Handler:
        """``handler`` for anyone (health): logged, no policy."""
        return functools.partial(self._logged, handler=handler, endpoint=endpoint)

    def refuse_the_rest(self, router: web.UrlDispatcher) -> None:
        """Call last. A method a resource does not take: 405 with ``Allow``; a path no resource
        takes: 404 (a catch-all resource, so it must come after every other)."""
        for resource in list(router.resources()):
            if not isinstance(resource, web.Resource):
                continue
            methods = {route.method for route in resource}
            if hdrs.METH_ANY not in methods:
                refuse = functools.partial(_not_allowed, allowed=frozenset(methods))
                resource.add_route(hdrs.METH_ANY, self.open(refuse, endpoint=UNMATCHED))
        router.add_route(hdrs.METH_ANY, "/{tail:.*}", self.open(_not_found, endpoint=UNMATCHED))


async def _not_allowed(request: web.Request, *, allowed: frozenset[str]) -> web.StreamResponse:
    raise web.HTTPMethodNotAllowed(request.method, allowed)


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


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
