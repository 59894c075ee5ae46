"""Keys change on reload without a restart; a request keeps the key it started with."""

from __future__ import annotations

import aiohttp
import pytest

from sidegate.config.resilience import RetryConfig
from sidegate.middlewares.keys import KeyPools, KeySpec, PoolSpec, key_rotation_middleware
from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.retry import mutating_request, retry_middleware
from sidegate.proxy.mock import Fault
from tests.conftest import Upstream
from tests.middlewares import test_outbound_support as support
from tests.middlewares.test_outbound_support import CHAT, FakeClock

pytestmark = pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry

COMPLETE = {"service_id": "llm.general.v1", "messages": [{"role": "user", "content": "hi"}]}


class ReloadingClock(FakeClock):
    """Runs ``on_sleep`` (a reload) while a retry waits."""

    def __init__(self) -> None:
        super().__init__()
        self.on_sleep: list[object] = []

    async def sleep(self, seconds: float) -> None:
        for action in self.on_sleep:
            action()  # type: ignore[operator]
        await super().sleep(seconds)


def session(clock: FakeClock, pools: KeyPools) -> aiohttp.ClientSession:
    """Retry and key rotation over ``pools``, key rotation as the ``rotation`` fixture says."""
    fused = support.ROTATION == "in_retry"
    retry = retry_middleware(
        RetryConfig(),
        generate_idempotency_key=mutating_request,
        clock=clock,
        wall_clock=clock,
        sleep=clock.sleep,
        rng=lambda: 0.0,
        keys=pools.resolve if fused else None,
    )
    if fused:
        return aiohttp.ClientSession(middlewares=(retry,))
    return aiohttp.ClientSession(middlewares=(retry, key_rotation_middleware(pools.resolve)))


async def test_a_key_added_by_reload_is_used_at_once(meridian: Upstream) -> None:
    clock = FakeClock()
    pools = KeyPools(clock=clock)
    pools.rebuild({"meridian": PoolSpec([KeySpec("a", "secret-a")])})
    meridian.state.script(Fault(status=429, retry_after=30))
    async with session(clock, pools) as client:
        with outbound_scope(Outbound(upstream="meridian", deadline=clock.now + 5)) as first:
            async with client.post(meridian.url + "/v1/chat/completions", json=CHAT) as response:
                assert response.status == 429

        pools.rebuild({"meridian": PoolSpec([KeySpec("a", "secret-a"), KeySpec("b", "secret-b")])})
        with outbound_scope(Outbound(upstream="meridian")) as second:
            async with client.post(meridian.url + "/v1/chat/completions", json=CHAT) as response:
                assert response.status == 200

    assert first.key_ids == ["a"]
    assert second.key_ids == ["b"]
    assert [(s.id, s.state) for s in pools.snapshot()["meridian"]] == [
        ("a", "cooling"),
        ("b", "active"),
    ]


async def test_a_pinned_request_keeps_its_key_across_a_reload(meivan: Upstream) -> None:
    clock = ReloadingClock()
    pools = KeyPools(clock=clock)
    pools.rebuild({"meivan": PoolSpec([KeySpec("a", "secret-a")])})
    clock.on_sleep.append(lambda: pools.rebuild({"meivan": PoolSpec([KeySpec("b", "secret-b")])}))
    meivan.state.script(Fault(status=503))
    async with session(clock, pools) as client:
        with outbound_scope(Outbound(upstream="meivan")) as outbound:
            async with client.post(meivan.url + "/v1/complete", json=COMPLETE) as response:
                assert response.status == 200
        with outbound_scope(Outbound(upstream="meivan")) as after:
            async with client.post(meivan.url + "/v1/complete", json=COMPLETE) as response:
                assert response.status == 200

    assert outbound.key_ids == ["a", "a"]
    assert after.key_ids == ["b"]
    auth = [r.headers["Authorization"] for r in meivan.state.received]
    assert auth == ["Bearer secret-a", "Bearer secret-a", "Bearer secret-b"]


async def test_an_upstream_without_a_pool_is_sent_as_is(meivan: Upstream) -> None:
    clock = FakeClock()
    pools = KeyPools(clock=clock)
    async with session(clock, pools) as client:
        with outbound_scope(Outbound(upstream="unknown")):
            async with client.get(
                meivan.url + "/v1/services", headers={"Authorization": "Bearer own"}
            ) as response:
                assert response.status == 200
