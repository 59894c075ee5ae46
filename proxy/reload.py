"""Activating a config: at start, on SIGHUP, and when the file changes.

A new config is validated whole before anything changes; a valid one is swapped in atomically
(requests in flight keep the runtime they started with), an invalid one is logged with every
problem and the running config stays.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection

import structlog
from aiohttp import web
from aiohttp.client_middlewares import ClientMiddlewareType
from aiohttp.typedefs import Middleware

from sidegate.config import ConfigError, load_config
from sidegate.config.models import SidegateConfig
from sidegate.middlewares.auth import TokenVerifier, auth_middleware
from sidegate.middlewares.contract import CALL_KEY
from sidegate.middlewares.embeddings_cache import (
    MemoryVectorCache,
    RedisVectorCache,
    embeddings_cache_middleware,
)
from sidegate.middlewares.keys import KeyPool, KeySpec, PoolSpec, key_rotation_middleware
from sidegate.middlewares.limits import TEAM_LIMITS_KEY, limits_middleware
from sidegate.middlewares.ratelimit_headers import ratelimit_headers_middleware
from sidegate.middlewares.retry import RetryBudget, retry_middleware
from sidegate.middlewares.store import REDIS_DEFAULTS

from .routing import route_middleware
from .runtime import Runtime, build_runtime
from .state import STATE_KEY, Active, GatewayState, HeldCache

__all__ = [
    "activate",
    "client_middlewares",
    "policy_middlewares",
    "reload_config",
    "watch_config_file",
]

log = structlog.get_logger(__name__)


def policy_middlewares(runtime: Runtime, state: GatewayState) -> dict[str, Middleware]:
    """The policies ``runtime``'s config needs, by name, outermost first.

    A policy that can do nothing for any request under this config is left out: the embeddings
    cache when none is configured; limits when no team or key has a budget or rate limit and no
    model has a price (it would pass every request straight through, and the ledger it writes
    needs a price).
    """
    pools = state.key_pools

    def upstream_pool(request: web.Request) -> KeyPool | None:
        call = request.get(CALL_KEY)
        return pools.get(call.route.upstream) if call is not None else None

    cache = runtime.config.cache.embeddings
    limits = runtime.limits
    middlewares: dict[str, Middleware] = {
        "auth": auth_middleware(
            api_keys=runtime.api_keys, jwt=runtime.jwt, teams=runtime.team_models
        ),
        "routing": route_middleware(
            runtime, state.endpoints, max_body_bytes=runtime.config.server.max_body_bytes
        ),
    }
    if cache is not None and state.vector_cache is not None:
        # Before limits: a hit is neither reserved nor charged; a partial hit only for its misses.
        middlewares["embeddings_cache"] = embeddings_cache_middleware(
            cache, state.vector_cache.cache, observer=state.metrics
        )
    if limits.enforces_anything:
        middlewares["limits"] = limits_middleware(
            limits, state.stores, pending=state.pending_commits
        )
    middlewares["ratelimit_headers"] = ratelimit_headers_middleware(
        runtime.config.rate_limit_headers.mode,
        team_limits=lambda request: request.get(TEAM_LIMITS_KEY),
        pools=upstream_pool,
        on_prepare=True,  # the access log and the stream apply them (headers.stamp_response)
    )
    return middlewares


def client_middlewares(
    config: SidegateConfig, state: GatewayState, *, leave_out: Collection[str] = ()
) -> tuple[tuple[str, ...], tuple[ClientMiddlewareType, ...]]:
    """The upstream session's middlewares for ``config``: the parts' names and the middlewares,
    outermost first; ``leave_out`` names parts not to run (the knock-out tool).

    Retry is always there (it also validates and generates Idempotency-Keys and counts attempts,
    even with ``max_attempts: 1``); key rotation only when some upstream has keys to rotate.
    With both, retry runs key rotation's part itself (``retry_middleware(keys=...)``): one
    middleware, one coroutine, where key rotation would send each attempt just inside it.
    """
    retry = config.retry
    budget = state.retry_budget
    if budget is None or (budget.ratio, budget.minimum) != (retry.budget_ratio, retry.budget_min):
        budget = state.retry_budget = RetryBudget(retry.budget_ratio, retry.budget_min)
    names = ["retry"]
    if any(upstream.keys for upstream in config.upstreams.values()):
        names.append("key_rotation")
    names = [name for name in names if name not in leave_out]
    rotate = state.key_pools.resolve if "key_rotation" in names else None
    if "retry" in names:
        middleware = retry_middleware(retry, budget=budget, observer=state.metrics, keys=rotate)
    elif rotate is not None:
        middleware = key_rotation_middleware(rotate)
    else:
        return (), ()
    return tuple(names), (middleware,)


async def activate(app: web.Application, config: SidegateConfig) -> None:
    """Build everything ``config`` needs and make it current in one assignment."""
    state = app[STATE_KEY]
    for name, upstream in config.upstreams.items():
        if upstream.mock and name not in state.mock_urls:
            from .mock import start_mock  # only for `mock: true` upstreams: ~15 MB not held

            runner, url, _ = await start_mock(upstream.kind)
            state.mock_runners.append(runner)
            state.mock_urls[name] = url
    runtime = build_runtime(config, state.mock_urls, jwt=_verifier(state, config))
    await _vector_cache(state, config)
    state.key_pools.rebuild(_pool_specs(config))
    policies = policy_middlewares(runtime, state)
    client_names, client = client_middlewares(config, state)
    state.active = Active(
        runtime, tuple(policies.values()), client, state, names=(*policies, *client_names)
    )


async def _vector_cache(state: GatewayState, config: SidegateConfig) -> None:
    """The embeddings cache backend: kept across reloads unless where it lives changes."""
    settings = config.cache.embeddings
    held = state.vector_cache
    identity: tuple[object, ...] = ()
    if settings is not None:
        identity = (settings.backend, settings.max_bytes, settings.redis_url, settings.redis_prefix)
    if held is not None and settings is not None and held.identity == identity:
        return
    if held is not None:
        await held.close()
        state.vector_cache = None
    if settings is None:
        return
    if settings.backend == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(str(settings.redis_url), **REDIS_DEFAULTS)
        cache = RedisVectorCache(client, prefix=settings.redis_prefix)
        state.vector_cache = HeldCache(identity, cache, lambda: client.aclose())
    else:
        memory = MemoryVectorCache(settings.max_bytes, observer=state.metrics)
        state.vector_cache = HeldCache(identity, memory, _nothing)


async def _nothing() -> None:
    return None


def _pool_specs(config: SidegateConfig) -> dict[str, PoolSpec]:
    """The key pools; each keeps its keys' rate-limit readings only if something reads them
    (``least_limited``, or ``team`` rate-limit headers, whose fallback sums them)."""
    team_headers = config.rate_limit_headers.mode == "team"
    return {
        name: PoolSpec(
            [KeySpec(k.id, k.secret.get_secret_value(), k.weight, k.not_after) for k in up.keys],
            strategy=up.key_strategy,
            header=up.auth_header,
            scheme=up.auth_scheme,
            expiry_warning_days=up.key_expiry_warning_days,
            readings=team_headers or up.key_strategy == "least_limited",
        )
        for name, up in config.upstreams.items()
        if up.keys
    }


def _verifier(state: GatewayState, config: SidegateConfig) -> TokenVerifier | None:
    """The JWT verifier for ``config``: kept across reloads (with its JWKS cache) if unchanged."""
    settings = config.auth.jwt
    if settings is None:
        state.jwt = None
        return None
    if state.jwt is None or state.jwt[0] != settings:
        from sidegate.middlewares.jwt_verify import JwtVerifier  # pyjwt only when configured

        state.jwt = (settings, JwtVerifier(settings, session_factory=lambda: state.session))
    return state.jwt[1]


async def reload_config(app: web.Application) -> bool:
    """Reload from the file the app was created from; ``False`` (old config kept) if invalid."""
    state = app[STATE_KEY]
    if state.config_path is None:
        raise RuntimeError("this sidegate app was not created from a config file")
    try:
        config = load_config(state.config_path)
    except ConfigError as exc:
        state.metrics.config_reloads.labels("rejected").inc()
        log.error("config_reload_rejected", path=str(state.config_path), problems=str(exc))
        return False
    await activate(app, config)
    state.metrics.config_reloads.labels("applied").inc()
    log.info("config_reloaded", path=str(state.config_path))
    return True


def _signature(path: os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


async def watch_config_file(app: web.Application) -> None:
    """Poll the config file and reload when it changes (runs until cancelled)."""
    state = app[STATE_KEY]
    assert state.config_path is not None
    seen = _signature(state.config_path)
    while True:
        interval = state.active.runtime.config.server.watch_interval_s if state.active else 1.0
        await asyncio.sleep(interval)
        current = _signature(state.config_path)
        if current is not None and current != seen:
            seen = current
            await reload_config(app)
