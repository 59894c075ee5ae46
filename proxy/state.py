"""App and request state: typed keys, and the holder of the runtime that reloads swap."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.client_middlewares import ClientMiddlewareType
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import AbstractRoute

from sidegate.config.auth import JwtConfig

if TYPE_CHECKING:
    from sidegate.middlewares.jwt_verify import JwtVerifier
from sidegate.middlewares.embeddings_cache import VectorCache
from sidegate.middlewares.keys import KeyPools
from sidegate.middlewares.retry import RetryBudget
from sidegate.middlewares.steps import compose
from sidegate.middlewares.store import Stores

from .dialects import Endpoint
from .observability import Metrics
from .runtime import Runtime

__all__ = ["ACTIVE_KEY", "STATE_KEY", "Active", "GatewayState"]


@dataclass(frozen=True, slots=True)
class Active:
    """A runtime, the policies and the upstream client middlewares built for it, and the
    gateway they run in."""

    runtime: Runtime
    policies: tuple[Middleware, ...]
    client_middlewares: tuple[ClientMiddlewareType, ...]
    """What the upstream session runs: one middleware (retry running key rotation's part), or
    none (:func:`~sidegate.proxy.reload.client_middlewares`); aiohttp wraps a single one once."""
    state: GatewayState
    names: tuple[str, ...] = ()
    """The policies then the parts the client middlewares run (retry, key rotation), outermost
    first (for tests and diagnostics); the two parts run in one middleware."""
    _chains: dict[Handler, Handler] = field(default_factory=dict)

    def chain(self, handler: Handler) -> Handler:
        """The policies around ``handler`` (a route's handler), composed on its first request
        (:func:`~sidegate.middlewares.steps.compose`: steps share one coroutine)."""
        chain = self._chains.get(handler)
        if chain is None:
            chain = compose(self.policies, handler)
            if len(self._chains) < _REMEMBERED_CHAINS:  # one per route handler
                self._chains[handler] = chain
        return chain


_REMEMBERED_CHAINS = 64


@dataclass(frozen=True, slots=True)
class HeldCache:
    """The embeddings cache backend, what it was built from, and how to close it."""

    identity: tuple[object, ...]
    cache: VectorCache
    close: Callable[[], Awaitable[None]]


@dataclass(eq=False)
class GatewayState:
    """Everything one sidegate app owns; state that must outlive a reload lives here."""

    metrics: Metrics
    endpoints: Mapping[AbstractRoute, Endpoint]
    config_path: Path | None = None
    active: Active | None = None
    mock_urls: dict[str, str] = field(default_factory=dict)
    mock_runners: list[web.AppRunner] = field(default_factory=list)
    jwt: tuple[JwtConfig, JwtVerifier] | None = None
    key_pools: KeyPools = field(default_factory=KeyPools)
    retry_budget: RetryBudget | None = None
    _stores: Stores | None = None
    pending_commits: set[asyncio.Task[None]] = field(default_factory=set)
    vector_cache: HeldCache | None = None

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            raise RuntimeError("sidegate's store is not open (app not started)")
        return self._stores

    _session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("sidegate's upstream session is not open (app not started)")
        return self._session


STATE_KEY = web.AppKey("sidegate_state", GatewayState)
ACTIVE_KEY = web.RequestKey("sidegate_active", Active)
