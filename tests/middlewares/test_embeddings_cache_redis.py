"""The Redis backend: shared by replicas, entries with a TTL, failing open when Redis is gone."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from sidegate.config.cache import EmbeddingsCacheConfig
from sidegate.middlewares.embeddings_cache import (
    CacheUnavailable,
    RedisVectorCache,
    embeddings_cache_middleware,
)
from tests.conftest import Upstream
from tests.middlewares.test_embeddings_cache_support import (
    REDIS_URL,
    Client,
    FakeClock,
    embed,
    expected,
    expected_base64,
    fresh_redis,
    gateway_app,
    redis_client,
)

pytestmark = pytest.mark.redis

AiohttpClient = Callable[..., Awaitable[Client]]
Replica = Callable[..., Awaitable[Client]]
CONFIG = EmbeddingsCacheConfig(backend="redis", redis_url=REDIS_URL, ttl_s=600)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = await fresh_redis()
    yield client
    await client.aclose()


@pytest.fixture
def urls(meridian: Upstream, meivan: Upstream) -> dict[str, str]:
    return {"meridian": meridian.url, "meivan": meivan.url}


@pytest.fixture
def replica(aiohttp_client: AiohttpClient, urls: Mapping[str, str]) -> Replica:
    """A gateway (bare app) whose cache lives in Redis behind ``client``."""

    async def make(client: Redis, clock: FakeClock | None = None) -> Client:
        middleware = embeddings_cache_middleware(
            CONFIG, RedisVectorCache(client), clock=clock or FakeClock()
        )
        return await aiohttp_client(gateway_app(urls, middleware))

    return make


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_two_replicas_share_one_cache(
    redis: Redis, replica: Replica, meridian: Upstream
) -> None:
    other = redis_client()
    try:
        first, second = await replica(redis), await replica(other)
        await embed(first, ["alpha", "beta"])

        hit = await embed(second, ["beta", "alpha"], encoding_format="base64")
        partial = await embed(second, ["alpha", "gamma"])
    finally:
        await other.aclose()

    assert hit.cache == ("hit", "2")
    assert hit.vectors() == [expected_base64("beta"), expected_base64("alpha")]
    assert partial.cache == ("partial", "1")
    assert partial.vectors() == [expected("alpha"), expected("gamma")]
    assert [r.json()["input"] for r in meridian.state.received] == [["alpha", "beta"], ["gamma"]]


async def test_entries_are_tagged_vectors_with_the_configured_ttl(
    redis: Redis, replica: Replica
) -> None:
    client = await replica(redis)
    await embed(client, ["alpha"], dimensions=8)
    await embed(client, ["beta"], dimensions=8, encoding_format="base64")

    keys = await redis.keys("sg:emb:*")
    assert len(keys) == 2
    kept = sorted([await redis.get(key) for key in keys], key=len)
    assert kept[0] == b"f" + base64.b64decode(expected_base64("beta", 8))  # float32
    assert kept[1] == b"t" + orjson.dumps(expected("alpha", 8))  # the JSON text
    assert all([590 <= await redis.ttl(key) <= 600 for key in keys])


async def test_a_value_that_is_no_stored_vector_is_a_miss(
    redis: Redis, replica: Replica, meridian: Upstream
) -> None:
    client = await replica(redis)
    await embed(client, ["alpha", "beta"], dimensions=8)
    keys = sorted(await redis.keys("sg:emb:*"))
    await redis.set(keys[0], b"f\x00\x00\x00")  # not whole float32s
    await redis.set(keys[1], b"\x00\x00\x00\x00")  # no tag (as sidegate-embeddings/1 kept them)

    reply = await embed(client, ["alpha", "beta"], dimensions=8)

    assert reply.cache == ("miss", "0")
    assert reply.vectors() == [expected("alpha", 8), expected("beta", 8)]


async def test_teams_are_isolated_in_redis_too(redis: Redis, replica: Replica) -> None:
    client = await replica(redis)
    await embed(client, ["alpha"], team="search")

    assert (await embed(client, ["alpha"], team="ads")).cache == ("miss", "0")
    assert (await embed(client, ["alpha"], team="search")).cache == ("hit", "1")


async def test_redis_down_still_answers_and_logs_the_outage_once(
    replica: Replica, meridian: Upstream
) -> None:
    clock = FakeClock()
    gone = redis_client(f"redis://127.0.0.1:{closed_port()}/0")
    try:
        client = await replica(gone, clock)
        with capture_logs() as logs:
            replies = []
            for _ in range(4):
                replies.append(await embed(client, ["alpha", "beta"]))
                clock.advance(2)  # past the probe interval: every request tries Redis again
    finally:
        await gone.aclose()

    assert [(r.status, r.cache) for r in replies] == [(200, ("miss", "0"))] * 4
    assert replies[-1].vectors() == [expected("alpha"), expected("beta")]
    assert len(meridian.state.received) == 4
    assert [entry["event"] for entry in logs] == ["embeddings_cache_unavailable"]


async def test_the_backend_maps_redis_errors() -> None:
    gone = redis_client(f"redis://127.0.0.1:{closed_port()}/0")
    cache = RedisVectorCache(gone)
    try:
        with pytest.raises(CacheUnavailable):
            await cache.get_many([b"k" * 32])
        with pytest.raises(CacheUnavailable):
            await cache.set_many({b"k" * 32: b"\0" * 4}, 60)
    finally:
        await gone.aclose()


async def test_a_client_that_decodes_responses_is_refused() -> None:
    decoding = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisVectorCache(decoding)
    finally:
        await decoding.aclose()
