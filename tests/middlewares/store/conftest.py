"""Fixtures running the store contract against every backend, on an injected clock.

Redis is the real server on 127.0.0.1:6379, database 13, flushed before each test. When it is
unreachable the redis cases skip — except with ``CI=true``, where they fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from sidegate.middlewares.store import LedgerEntry, MemoryStores, SqliteStores, Stores
from sidegate.middlewares.store.redis import RedisStores
from tests.conftest import fresh_redis as shared_fresh_redis
from tests.conftest import redis_client as shared_redis_client
from tests.conftest import redis_url

REDIS_URL = redis_url(13)
JAN = datetime(2025, 1, 1, tzinfo=UTC)
START = 1_750_000_000.0  # 2025-06-15T15:06:40Z, a Sunday


class FakeClock:
    """Unix seconds that move only when told."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ledger_entry(
    at: datetime,
    *,
    team: str = "search",
    model: str = "meridian-1",
    prompt: int = 10,
    completion: int = 5,
    cost: int = 100,
    images: int = 0,
) -> LedgerEntry:
    return LedgerEntry(
        timestamp=at,
        team=team,
        key_id=None,
        upstream="meridian",
        model=model,
        kind="images" if images else "chat",
        prompt_tokens=prompt,
        completion_tokens=completion,
        images=images,
        cost_nano=cost,
        request_id=f"req-{at.isoformat()}-{team}-{model}",
    )


def redis_client() -> Redis:
    return shared_redis_client(REDIS_URL)


async def fresh_redis() -> Redis:
    """A client of the flushed test database, or skip (fail under CI=true) without Redis."""
    return await shared_fresh_redis(REDIS_URL)


BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
SHARED_BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def _open(kind: str, clock: FakeClock, path: Path, **options: Any) -> Stores:
    if kind == "memory":
        return MemoryStores(clock=clock, **options)
    if kind == "sqlite":
        return await SqliteStores.open(str(path), clock=clock, **options)
    return RedisStores(await fresh_redis(), owns_client=True, clock=clock, **options)


@pytest.fixture(params=BACKENDS)
async def stores(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[Stores]:
    """One backend's stores on ``clock``."""
    opened = await _open(request.param, clock, tmp_path / "sidegate.db")
    yield opened
    await opened.close()


@pytest.fixture(params=SHARED_BACKENDS)
async def pair(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[tuple[Stores, Stores]]:
    """Two independent clients of one shared store (one sqlite file, or one Redis)."""
    path = tmp_path / "sidegate.db"
    first = await _open(request.param, clock, path)
    if request.param == "sqlite":
        second: Stores = await SqliteStores.open(str(path), clock=clock)
    else:
        second = RedisStores(redis_client(), owns_client=True, clock=clock)
    yield first, second
    await second.close()
    await first.close()
