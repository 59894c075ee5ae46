"""The redis backend: per-team hash tags, script reloading, and one error when Redis is gone."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from sidegate.middlewares.store import BudgetStatus, Scope, StoreUnavailable, open_stores
from sidegate.middlewares.store.redis import RedisStores
from tests.middlewares.store.conftest import REDIS_URL, fresh_redis, ledger_entry

pytestmark = pytest.mark.redis


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    client = await fresh_redis()
    yield client
    await client.aclose()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_every_key_of_a_team_shares_one_cluster_slot(client: Redis) -> None:
    stores = RedisStores(client)
    for team in ("search", "we{ird}:team%"):
        scope, key = Scope(team), Scope(team, "k:1")
        await stores.budgets.reserve(scope, "m2025-06", 100, 10, "r1", 60)
        await stores.budgets.reserve(key, "m2025-06", 100, 10, "r1", 60)
        await stores.budgets.commit(scope, "m2025-06", "r1", 5)
        await stores.budgets.commit(key, "m2025-06", "r1", 5)
        await stores.rates.hit(scope, "requests", 10)
        await stores.rates.hit(key, "tokens", 10)

    keys = [k if isinstance(k, str) else k.decode() for k in await client.keys("*")]
    slots: dict[str, set[int]] = {}
    for k in keys:
        slots.setdefault(k.split(":", 2)[1], set()).add(key_slot(k.encode()))

    assert set(slots) == {"{search}", "{we%7Bird%7D%3Ateam%25}"}
    assert all(len(found) == 1 for found in slots.values())
    assert len(keys) == 2 * 6  # spent, done and rate keys; emptied reservation keys are gone


async def test_works_with_decoded_responses_and_after_a_script_flush(client: Redis) -> None:
    decoded = Redis.from_url(REDIS_URL, decode_responses=True)
    stores = RedisStores(decoded, owns_client=True)
    try:
        await stores.budgets.reserve(Scope("search"), "total", 100, 10, "r1", 60)
        await client.script_flush()
        entry = ledger_entry(datetime(2025, 1, 1, tzinfo=UTC))
        await stores.ledger.record(entry)

        assert await stores.budgets.status(Scope("search"), "total") == BudgetStatus(0, 10)
        assert await stores.ledger.query("search", entry.timestamp, entry.timestamp) == [entry]
    finally:
        await stores.close()


async def test_a_closed_port_is_store_unavailable() -> None:
    dead = Redis(host="127.0.0.1", port=closed_port(), retry=Retry(NoBackoff(), 0))
    stores = RedisStores(dead, owns_client=True)
    scope = Scope("search")
    try:
        for attempt in (
            stores.budgets.reserve(scope, "total", 100, 1, "r", 60),
            stores.budgets.commit(scope, "total", "r", 1),
            stores.budgets.release(scope, "total", "r"),
            stores.budgets.status(scope, "total"),
            stores.rates.hit(scope, "requests", 1),
            stores.ledger.query("search", datetime.now(UTC), datetime.now(UTC)),
            stores.ping(),
        ):
            with pytest.raises(StoreUnavailable) as caught:
                await attempt
            assert caught.value.status == 503
    finally:
        await stores.close()


async def test_open_stores_by_url_fails_closed_without_leaking_the_url() -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    stores = await open_stores("redis", url=url)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await stores.budgets.reserve(Scope("search"), "total", 100, 1, "r", 60)
        assert "hunter2" not in caught.value.message
    finally:
        await stores.close()
