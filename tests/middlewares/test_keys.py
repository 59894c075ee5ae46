"""Key pools (strategies, cooldown, quarantine, expiry, rebuild) and the key-rotation middleware."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from sidegate.config.resilience import KeyRotationFields, UpstreamRotationFields
from sidegate.middlewares.errors import error_response
from sidegate.middlewares.keys import (
    KeyPool,
    KeyPools,
    KeysCoolingDown,
    KeySpec,
    NoUsableKey,
    PoolSpec,
    key_rotation_middleware,
)
from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.ratelimits import RateLimits
from sidegate.proxy.mock import Fault
from tests.conftest import Upstream
from tests.middlewares.test_outbound_support import CHAT, FakeClock, pool, session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def picks(key_pool: KeyPool, n: int) -> list[str]:
    return [key_pool.acquire().id for _ in range(n)]


def readings(remaining: int, limit: int = 100, reset: str = "60s") -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
    }


def test_round_robin_in_config_order_skipping_cooling_keys(clock: FakeClock) -> None:
    keys = pool("a", "b", "c", clock=clock)
    assert picks(keys, 4) == ["a", "b", "c", "a"]

    keys.observe(keys.keys[2], 429, {}, 10)
    assert picks(keys, 4) == ["b", "a", "b", "a"]


def test_weighted_is_proportional_and_interleaved(clock: FakeClock) -> None:
    keys = pool(KeySpec("a", "sa", weight=3), KeySpec("b", "sb"), clock=clock, strategy="weighted")
    chosen = picks(keys, 8)

    assert Counter(chosen) == {"a": 6, "b": 2}
    assert chosen[:4].count("b") == 1
    assert "aaaa" not in "".join(chosen)


def test_least_limited_prefers_headroom_and_unread_keys(clock: FakeClock) -> None:
    keys = pool("a", "b", "c", clock=clock, strategy="least_limited")
    a, b, c = keys.keys
    keys.observe(a, 200, readings(10))
    keys.observe(b, 200, readings(80))

    assert keys.acquire() is c
    keys.observe(c, 200, readings(5))
    assert keys.acquire() is b
    keys.observe(b, 200, readings(3))
    assert keys.acquire() is a

    clock.now += 61
    assert picks(keys, 3) == ["c", "b", "a"]


def test_a_pick_counts_against_the_remaining_estimate(clock: FakeClock) -> None:
    keys = pool("a", "b", clock=clock, strategy="least_limited")
    a, b = keys.keys
    keys.observe(a, 200, readings(5, limit=10))
    keys.observe(b, 200, readings(2, limit=10))

    assert picks(keys, 5) == ["a", "a", "a", "b", "a"]


def test_without_readings_a_pool_still_cools_down_and_quarantines(clock: FakeClock) -> None:
    keys = KeyPool(PoolSpec([KeySpec("a", "sa"), KeySpec("b", "sb")], readings=False), clock=clock)
    a, b = keys.keys
    keys.observe(a, 200, readings(5, limit=10))
    assert keys.acquire() is a  # round robin as ever; nothing read, nothing counted
    assert [status.limits for status in keys.snapshot()] == [RateLimits(), RateLimits()]
    assert keys.aggregate() is None

    keys.observe(b, 429, readings(0, limit=10), 30)
    keys.observe(a, 401, {})
    state = {status.id: (status.state, status.until) for status in keys.snapshot()}
    assert state == {"a": ("quarantined", None), "b": ("cooling", clock.now + 30)}
    with pytest.raises(KeysCoolingDown):
        keys.acquire()


def test_least_limited_keeps_readings_whatever_the_spec_says(clock: FakeClock) -> None:
    spec = PoolSpec([KeySpec("a", "sa"), KeySpec("b", "sb")], "least_limited", readings=False)
    keys = KeyPool(spec, clock=clock)
    a, b = keys.keys
    keys.observe(a, 200, readings(1, limit=10))
    assert keys.acquire() is b
    assert keys.snapshot()[0].limits.remaining_requests == 1


def test_a_rebuild_without_readings_forgets_them(clock: FakeClock) -> None:
    keys = pool("a", clock=clock)
    keys.observe(keys.keys[0], 200, readings(5))
    assert keys.aggregate() is not None
    keys.rebuild(PoolSpec([KeySpec("a", "secret-a")], readings=False))
    assert keys.aggregate() is None
    keys.rebuild(PoolSpec([KeySpec("a", "secret-a")]))
    keys.observe(keys.keys[0], 200, readings(7))
    aggregate = keys.aggregate()
    assert aggregate is not None
    assert aggregate.remaining_requests == 7


def test_expired_keys_are_skipped_and_expiring_ones_warned_once(clock: FakeClock) -> None:
    now = datetime.fromtimestamp(clock.now, UTC)
    with capture_logs() as logs:
        keys = pool(
            KeySpec("old", "s-old", not_after=now - timedelta(days=1)),
            KeySpec("soon", "s-soon", not_after=now + timedelta(days=2)),
            KeySpec("later", "s-later", not_after=now + timedelta(days=30)),
            clock=clock,
        )
        assert picks(keys, 4) == ["soon", "later", "soon", "later"]
        keys.snapshot()

    events = [(entry["event"], entry["key_id"]) for entry in logs]
    assert events == [("upstream_key_expired", "old"), ("upstream_key_expires_soon", "soon")]
    assert all("s-" not in str(entry) for entry in logs)
    status = {s.id: s for s in keys.snapshot()}
    assert status["old"].state == "expired"
    assert (status["soon"].state, status["soon"].expires_soon) == ("active", True)
    assert not status["later"].expires_soon


def test_naive_not_after_is_utc() -> None:
    key = KeySpec("k", "s", not_after=datetime(2030, 1, 1))
    assert key.expires_at() == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    fields = KeyRotationFields.model_validate({"not_after": "2030-01-01T00:00:00"})
    assert fields.not_after == datetime(2030, 1, 1, tzinfo=UTC)
    assert UpstreamRotationFields().key_strategy == "round_robin"


def test_quarantine_on_401_and_403_is_logged_by_id_only(clock: FakeClock) -> None:
    keys = pool("a", "b", "c", clock=clock)
    a, b, _ = keys.keys
    with capture_logs() as logs:
        keys.observe(a, 401, {})
        keys.observe(b, 403, {})

    assert picks(keys, 2) == ["c", "c"]
    assert [(e["key_id"], e["status"]) for e in logs] == [("a", 401), ("b", 403)]
    assert "secret" not in repr(logs) + repr(keys.snapshot()) + repr(keys.keys)
    states = [(s.id, s.state, s.quarantined_by) for s in keys.snapshot()]
    assert states == [("a", "quarantined", 401), ("b", "quarantined", 403), ("c", "active", None)]


def test_all_cooling_raises_with_the_earliest_end(clock: FakeClock) -> None:
    keys = pool("a", "b", clock=clock)
    a, b = keys.keys
    keys.observe(a, 429, {}, 30)
    keys.observe(b, 429, {}, 12.5)

    with pytest.raises(KeysCoolingDown) as caught:
        keys.acquire()
    assert caught.value.retry_after == 12.5
    response = error_response(caught.value)
    assert (response.status, response.headers["Retry-After"]) == (429, "13")
    assert [(s.id, s.state, s.until) for s in keys.snapshot()] == [
        ("a", "cooling", clock.now + 30),
        ("b", "cooling", clock.now + 12.5),
    ]

    clock.now += 12.5
    assert keys.acquire() is b


def test_no_usable_key(clock: FakeClock) -> None:
    keys = pool("a", clock=clock)
    keys.observe(keys.keys[0], 401, {})
    with pytest.raises(NoUsableKey) as caught:
        keys.acquire()
    assert caught.value.status == 503


def test_a_429_without_hint_cools_for_the_default(clock: FakeClock) -> None:
    keys = pool("a", clock=clock)
    keys.observe(keys.keys[0], 429, {})
    assert keys.snapshot()[0].until == clock.now + 1.0


def test_rebuild_keeps_unchanged_keys_and_lifts_quarantine(clock: FakeClock) -> None:
    keys = pool("a", "b", "c", clock=clock)
    a, b, c = keys.keys
    keys.observe(a, 429, readings(7), 30)
    keys.observe(b, 401, {})

    keys.rebuild(
        PoolSpec(
            [
                KeySpec("a", "secret-a", weight=2),
                KeySpec("b", "secret-b"),
                KeySpec("c", "rotated"),
                KeySpec("d", "secret-d"),
            ]
        )
    )

    new_a, new_b, new_c, d = keys.keys
    assert (new_a, new_b) == (a, b)
    assert new_a.spec.weight == 2
    assert new_a.state(clock.now) == "cooling"
    assert new_a.limits.remaining_requests == 7
    assert new_b.state(clock.now) == "active"
    assert new_c is not c
    assert d.id == "d"
    assert picks(keys, 3) == ["b", "c", "d"]

    keys.rebuild(PoolSpec([KeySpec("d", "secret-d")]))
    assert [key.id for key in keys.keys] == ["d"]


def test_rebuild_refuses_bad_specs(clock: FakeClock) -> None:
    keys = pool("a", clock=clock)
    with pytest.raises(ValueError, match="duplicate"):
        keys.rebuild(PoolSpec([KeySpec("a", "1"), KeySpec("a", "2")]))
    with pytest.raises(ValueError, match="strategy"):
        keys.rebuild(PoolSpec([KeySpec("a", "1")], strategy="random"))  # type: ignore[arg-type]


def test_registry_rebuild_adds_keeps_and_drops_pools(clock: FakeClock) -> None:
    pools = KeyPools(clock=clock)
    pools.rebuild({"m": PoolSpec([KeySpec("a", "1")]), "v": PoolSpec([KeySpec("x", "2")])})
    meridian = pools.get("m")
    assert meridian is not None
    meridian.observe(meridian.keys[0], 429, {}, 5)

    pools.rebuild({"m": PoolSpec([KeySpec("a", "1"), KeySpec("b", "3")]), "n": PoolSpec([])})

    assert pools.get("m") is meridian
    assert pools.get("v") is None
    assert [(s.id, s.state) for s in pools.snapshot()["m"]] == [("a", "cooling"), ("b", "active")]
    with outbound_scope(Outbound(upstream="m")):
        assert pools.resolve(None) is meridian  # type: ignore[arg-type]
    assert pools.resolve(None) is None  # type: ignore[arg-type]


def test_aggregate_sums_healthy_keys(clock: FakeClock) -> None:
    keys = pool("a", "b", "c", clock=clock)
    a, b, c = keys.keys
    assert keys.aggregate() is None
    keys.observe(a, 200, readings(10, reset="30s"))
    keys.observe(b, 200, readings(40, reset="10s"))
    keys.observe(c, 429, readings(0), 60)

    total = keys.aggregate()
    assert total is not None
    assert (total.limit_requests, total.remaining_requests) == (200, 50)
    assert total.reset_requests == clock.now + 10


async def chat(client: aiohttp.ClientSession, upstream: Upstream) -> tuple[int, Outbound]:
    with outbound_scope() as outbound:
        async with client.post(upstream.url + "/v1/chat/completions", json=CHAT) as response:
            await response.read()
            return response.status, outbound


def auth_of(upstream: Upstream) -> list[str]:
    return [received.headers["Authorization"] for received in upstream.state.received]


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_429_on_one_key_retries_on_the_next_at_once(
    meridian: Upstream, clock: FakeClock
) -> None:
    keys = pool("a", "b", clock=clock)
    meridian.state.script(Fault(status=429, retry_after=30))
    async with session(clock, keys) as client:
        status, outbound = await chat(client, meridian)

    assert status == 200
    assert outbound.key_ids == ["a", "b"]
    assert (outbound.key_id, outbound.attempts, outbound.waits) == ("b", 2, [0.0])
    assert clock.sleeps == [0.0]
    assert auth_of(meridian) == ["Bearer secret-a", "Bearer secret-b"]
    first_key = keys.snapshot()[0]
    assert (first_key.id, first_key.state, first_key.until) == (
        "a",
        "cooling",
        clock.now + 30,
    )
    assert keys.snapshot()[1].limits.limit_requests == 10_000


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_401_quarantines_the_key_and_is_not_retried(
    meridian: Upstream, clock: FakeClock
) -> None:
    keys = pool("a", "b", clock=clock)
    meridian.state.accepted_keys = {"secret-b"}
    async with session(clock, keys) as client:
        first, _ = await chat(client, meridian)
        later = [await chat(client, meridian) for _ in range(3)]

    assert first == 401
    assert [status for status, _ in later] == [200, 200, 200]
    assert auth_of(meridian) == ["Bearer secret-a"] + ["Bearer secret-b"] * 3
    assert [s.state for s in keys.snapshot()] == ["quarantined", "active"]


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_all_keys_cooling_is_a_429_with_the_earliest_retry_after(
    meridian: Upstream, clock: FakeClock
) -> None:
    keys = pool("a", "b", clock=clock)
    meridian.state.script(Fault(status=429, retry_after=30), Fault(status=429, retry_after=20))
    async with session(clock, keys, deadline_s=10) as client:
        status, outbound = await chat(client, meridian)
        assert (status, outbound.key_ids, outbound.stop_reason) == (429, ["a", "b"], "deadline")

        clock.now += 4
        with outbound_scope() as second, pytest.raises(KeysCoolingDown) as caught:
            await client.post(meridian.url + "/v1/chat/completions", json=CHAT)

    assert caught.value.retry_after == 16
    assert caught.value.headers["Retry-After"] == "16"
    assert second.attempts == 0
    assert meridian.state.count() == 2


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_all_keys_cooling_within_the_deadline_waits_for_the_earliest(
    meridian: Upstream, clock: FakeClock
) -> None:
    keys = pool("a", "b", clock=clock)
    keys.observe(keys.keys[0], 429, {}, 9)
    keys.observe(keys.keys[1], 429, {}, 5)
    async with session(clock, keys, rng=0.0) as client:
        status, outbound = await chat(client, meridian)

    assert status == 200
    assert clock.sleeps == [5.0]
    assert (outbound.attempts, outbound.key_ids) == (1, ["b"])


async def test_without_a_pool_the_request_is_untouched(meridian: Upstream) -> None:
    middleware = key_rotation_middleware(lambda request: None)
    async with (
        aiohttp.ClientSession(middlewares=(middleware,)) as client,
        client.get(
            meridian.url + "/v1/models", headers={"Authorization": "Bearer mine"}
        ) as response,
    ):
        assert orjson.loads(await response.read())["object"] == "list"

    assert auth_of(meridian) == ["Bearer mine"]


async def test_custom_header_and_bare_scheme(meivan: Upstream, clock: FakeClock) -> None:
    keys = KeyPool(PoolSpec([KeySpec("k", "raw")], header="x-api-key", scheme=""), clock=clock)
    middleware = key_rotation_middleware(lambda request: keys)
    async with (
        aiohttp.ClientSession(middlewares=(middleware,)) as client,
        client.get(meivan.url + "/v1/services") as response,
    ):
        assert response.status == 401

    assert meivan.state.received[0].headers["x-api-key"] == "raw"
    assert keys.snapshot()[0].state == "quarantined"
