"""Key rotation on the upstream ``ClientSession``: the pools registry and the client middleware.

:class:`KeyPools` holds a :class:`~.keypool.KeyPool` per upstream and is rebuilt whole on reload;
:func:`key_rotation_middleware` takes a key from the request's pool for every attempt. The pool
types are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.client_middlewares import ClientMiddlewareType

from .keypool import (
    KeyPool,
    KeysCoolingDown,
    KeySpec,
    KeyState,
    KeyStatus,
    KeyStrategy,
    NoUsableKey,
    PoolKey,
    PoolSpec,
)
from .outbound import OUTBOUND, Outbound, current_outbound
from .ratelimits import response_retry_hint

__all__ = [
    "KeyPool",
    "KeyPools",
    "KeySpec",
    "KeyState",
    "KeyStatus",
    "KeyStrategy",
    "KeysCoolingDown",
    "NoUsableKey",
    "PoolKey",
    "PoolSpec",
    "key_rotation_middleware",
    "learn",
    "take_key",
]


class KeyPools:
    """The key pools of every upstream, rebuilt on reload; the registry the gateway keeps.

    Pools and keys that survive a reload keep their state; in-flight attempts keep the key
    they hold even when it was removed.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.time, default_cooldown_s: float = 1.0
    ) -> None:
        self.clock = clock
        self.default_cooldown_s = default_cooldown_s
        self._pools: dict[str, KeyPool] = {}

    def rebuild(self, specs: Mapping[str, PoolSpec]) -> None:
        """Make the pools match ``specs``: rebuild kept upstreams, add new ones, drop the rest."""
        pools: dict[str, KeyPool] = {}
        for name, spec in specs.items():
            pool = self._pools.get(name)
            if pool is None:
                pool = KeyPool(
                    spec, name=name, clock=self.clock, default_cooldown_s=self.default_cooldown_s
                )
            else:
                pool.rebuild(spec)
            pools[name] = pool
        self._pools = pools

    def get(self, upstream: str | None) -> KeyPool | None:
        return None if upstream is None else self._pools.get(upstream)

    def resolve(self, request: ClientRequest) -> KeyPool | None:
        """The pool of the current :class:`~sidegate.middlewares.outbound.Outbound`'s upstream."""
        outbound = current_outbound()
        return None if outbound is None else self.get(outbound.upstream)

    def snapshot(self) -> dict[str, list[KeyStatus]]:
        return {name: pool.snapshot() for name, pool in self._pools.items()}


def key_rotation_middleware(
    resolve: Callable[[ClientRequest], KeyPool | None],
) -> ClientMiddlewareType:
    """A client middleware that sends each attempt with a key of ``resolve(request)``'s pool.

    No pool → the request goes out untouched. The key replaces ``pool.spec.header``. A request
    carrying an ``Idempotency-Key`` keeps its first key for every attempt. A 429 cools the key
    down and comes back as is (the retry middleware, outside, decides; ``other_key_ready`` on the
    :class:`~sidegate.middlewares.outbound.Outbound` says whether another key is ready now);
    401/403 quarantine it. Raises :class:`KeysCoolingDown` or :class:`NoUsableKey` instead of
    sending when no key is usable.
    """

    async def key_rotation(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        pool = resolve(request)
        if pool is None:
            return await handler(request)
        outbound = OUTBOUND.get()
        token = None
        if outbound is None:  # no caller's Outbound: one of our own for this request
            outbound = Outbound()
            token = OUTBOUND.set(outbound)
        try:
            key = take_key(pool, request, outbound)
            response = await handler(request)
            learning = learn(pool, key, response, outbound)
            if learning is not None:
                await learning
            return response
        finally:
            if token is not None:
                OUTBOUND.reset(token)

    return key_rotation


def take_key(pool: KeyPool, request: ClientRequest, outbound: Outbound) -> PoolKey:
    """Before an attempt: the key it goes with, set on ``request`` and noted on ``outbound``
    (a request carrying an ``Idempotency-Key`` keeps its first key). Raises
    :class:`KeysCoolingDown` or :class:`NoUsableKey` when no key is usable."""
    outbound.other_key_ready = False
    key = pool.acquire(outbound.pinned_key)
    if "Idempotency-Key" in request.headers:
        outbound.pinned_key = key
    header, value = key.auth
    request.headers[header] = value
    outbound.key_id = key.id
    outbound.key_ids.append(key.id)
    return key


def learn(
    pool: KeyPool, key: PoolKey, response: ClientResponse, outbound: Outbound
) -> Coroutine[Any, Any, None] | None:
    """After an attempt's answer: what ``pool`` learns from it (readings; 429 cools ``key``
    down, 401/403 quarantine it). Done at once, except after a 429, whose retry hint may need
    the body read: then the coroutine to await."""
    if response.status == 429:
        return _cool_down(pool, key, response, outbound)
    pool.observe(key, response.status, response.headers)
    return None


async def _cool_down(
    pool: KeyPool, key: PoolKey, response: ClientResponse, outbound: Outbound
) -> None:
    hint = await response_retry_hint(response, pool.clock())
    pool.observe(key, 429, response.headers, hint)
    outbound.other_key_ready = outbound.pinned_key is None and pool.has_available()
