"""The outbound context, and the fakes the client-middleware tests share (clock, sleep, session)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from sidegate.config.resilience import RetryConfig
from sidegate.middlewares.keys import KeyPool, KeySpec, PoolSpec, key_rotation_middleware
from sidegate.middlewares.outbound import (
    OUTBOUND,
    Outbound,
    current_outbound,
    joined_outbound,
    outbound_scope,
)
from sidegate.middlewares.retry import RetryBudget, RetryObserver, retry_middleware

START = 1_700_000_000.0
ROTATION = "apart"
"""How :func:`session` runs key rotation with retry (the ``rotation`` fixture sets it)."""
CHAT = {"model": "meridian-1", "messages": [{"role": "user", "content": "hello there"}]}


class FakeClock:
    """Wall and monotonic clock in one; ``sleep`` records the delay and moves the clock on."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def pool(
    *keys: str | KeySpec, clock: FakeClock, strategy: Any = "round_robin", name: str = "up"
) -> KeyPool:
    specs = [KeySpec(key, f"secret-{key}") if isinstance(key, str) else key for key in keys]
    return KeyPool(PoolSpec(specs, strategy=strategy), name=name, clock=clock)


@asynccontextmanager
async def session(
    clock: FakeClock,
    key_pool: KeyPool | None = None,
    *,
    rng: float | None = 0.5,
    budget: RetryBudget | None = None,
    observer: RetryObserver | None = None,
    **settings: Any,
) -> AsyncIterator[aiohttp.ClientSession]:
    """A real ClientSession with (retry, key rotation), key rotation as :data:`ROTATION` says;
    ``rng=None`` draws real jitter."""
    kwargs: dict[str, Any] = {} if rng is None else {"rng": lambda: rng}
    if key_pool is not None and ROTATION == "in_retry":
        kwargs["keys"] = lambda request: key_pool
    generate = settings.pop("generate", None)
    retry = retry_middleware(
        RetryConfig(**settings),
        generate_idempotency_key=generate,
        budget=budget,
        observer=observer,
        clock=clock,
        wall_clock=clock,
        sleep=clock.sleep,
        **kwargs,
    )
    middlewares: Sequence[aiohttp.ClientMiddlewareType] = (retry,)
    if key_pool is not None and ROTATION == "apart":
        middlewares = (retry, key_rotation_middleware(lambda request: key_pool))
    async with aiohttp.ClientSession(middlewares=middlewares) as client:
        yield client


def test_outbound_scope_sets_and_restores() -> None:
    assert current_outbound() is None
    with outbound_scope() as outer:
        assert current_outbound() is outer
        with outbound_scope(Outbound(upstream="meivan")) as inner:
            assert current_outbound() is inner
        assert OUTBOUND.get() is outer
    assert current_outbound() is None


def test_joined_outbound_uses_the_callers_or_a_scoped_fresh_one() -> None:
    with outbound_scope() as mine, joined_outbound() as joined:
        assert joined is mine
    with joined_outbound() as fresh:
        assert current_outbound() is fresh
    assert current_outbound() is None


def test_response_headers() -> None:
    assert Outbound(attempts=1).response_headers() == {"x-sidegate-attempts": "1"}
    gave_up = Outbound(attempts=4, gave_up=True)
    assert gave_up.response_headers() == {"x-sidegate-attempts": "4", "x-should-retry": "false"}
    assert gave_up.retried
    assert not Outbound(attempts=1).retried
