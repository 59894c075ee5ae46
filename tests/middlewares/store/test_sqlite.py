"""The sqlite backend: durable across restarts, WAL, and unavailable as one error type."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidegate.middlewares.store import (
    BudgetStatus,
    LedgerEntry,
    Scope,
    SqliteStores,
    StoreUnavailable,
)
from tests.middlewares.store.conftest import FakeClock

TEAM = Scope("search")
AT = datetime(2025, 6, 15, tzinfo=UTC)


async def test_a_restart_keeps_spend_ledger_and_commit_ids(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = str(tmp_path / "sidegate.db")
    first = await SqliteStores.open(path, clock=clock)
    await first.budgets.reserve(TEAM, "total", 100, 40, "done", 60)
    await first.budgets.reserve(TEAM, "total", 100, 30, "in-flight", 60)
    entry = LedgerEntry(
        timestamp=AT,
        team="search",
        key_id="k",
        upstream="meridian",
        model="meridian-1",
        kind="chat",
        prompt_tokens=3,
        completion_tokens=4,
        cost_nano=40,
        request_id="req",
    )
    await first.budgets.commit(TEAM, "total", "done", 40, entry)
    await first.close()

    second = await SqliteStores.open(path, clock=clock)
    try:
        assert await second.budgets.status(TEAM, "total") == BudgetStatus(40, 30)
        assert await second.budgets.commit(TEAM, "total", "done", 40, entry) is False
        assert await second.ledger.query("search", AT, AT) == [entry]
    finally:
        await second.close()


async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sidegate.db"
    stores = await SqliteStores.open(str(path))
    await stores.close()

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


async def test_an_unopenable_file_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await SqliteStores.open(str(tmp_path / "missing" / "sidegate.db"))

    assert caught.value.status == 503
    assert str(tmp_path) not in caught.value.message


async def test_a_write_lock_held_too_long_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "sidegate.db"
    stores = await SqliteStores.open(str(path), busy_timeout_s=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            await stores.budgets.reserve(TEAM, "total", 100, 1, "r", 60)
        other.execute("ROLLBACK")
        assert (await stores.budgets.reserve(TEAM, "total", 100, 1, "r", 60)).admitted
    finally:
        other.close()
        await stores.close()
