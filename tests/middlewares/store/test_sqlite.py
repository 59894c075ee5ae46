"""The sqlite backend: durable across restarts, WAL, and unavailable as one error type."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidegate.middlewares.store import (
    BudgetHold,
    BudgetStatus,
    LedgerEntry,
    Scope,
    Settlement,
    SqliteStores,
    StoreUnavailable,
)
from sidegate.middlewares.store.sqlite_db import SqliteDatabase
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


async def test_writes_queued_meanwhile_share_one_transaction_and_fail_alone(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "batch.db")
    db = await SqliteDatabase.open(path)
    await db.write(lambda conn: conn.execute("CREATE TABLE t (name TEXT PRIMARY KEY)"))
    started, release = threading.Event(), threading.Event()

    def blocker(conn: sqlite3.Connection) -> str:
        started.set()
        release.wait(timeout=10)
        return "first"

    def insert(name: str) -> Callable[[sqlite3.Connection], str]:
        def run(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT INTO t VALUES (?)", (name,))
            return name

        return run

    def sees_a_without_a_commit(conn: sqlite3.Connection) -> tuple[bool, bool]:
        other = sqlite3.connect(path)
        try:
            outside = other.execute("SELECT 1 FROM t WHERE name = 'a'").fetchone() is not None
        finally:
            other.close()
        inside = conn.execute("SELECT 1 FROM t WHERE name = 'a'").fetchone() is not None
        return inside, outside

    def half_then_error(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('half')")
        conn.execute("INSERT INTO t VALUES ('a')")  # a duplicate: IntegrityError

    def bug(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('bug')")
        raise ValueError("a bug in the write")

    try:
        first = asyncio.ensure_future(db.write(blocker))
        assert await asyncio.to_thread(started.wait, 10)  # its batch holds the worker thread
        rest = asyncio.gather(
            db.write(insert("a")),
            db.write(sees_a_without_a_commit),
            db.write(half_then_error),
            db.write(bug),
            db.write(insert("b")),
            return_exceptions=True,
        )
        release.set()
        assert await first == "first"
        a, seen, failed, buggy, b = await rest
        assert (a, b) == ("a", "b")
        assert seen == (True, False)  # same transaction as 'a', which was not yet committed
        assert isinstance(failed, StoreUnavailable)
        assert isinstance(failed.__cause__, sqlite3.IntegrityError)
        assert isinstance(buggy, ValueError)
        rows = await db.read(lambda conn: conn.execute("SELECT name FROM t").fetchall())
        assert sorted(name for (name,) in rows) == ["a", "b"]
    finally:
        release.set()
        await db.close()


async def test_only_durable_writes_wait_for_the_disk(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(str(tmp_path / "sync.db"))

    def synchronous(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    try:
        full, normal = 2, 1
        assert await db.write(synchronous) == full
        assert await db.write(synchronous, durable=False) == normal
        assert await db.write(synchronous) == full
    finally:
        await db.close()


async def test_admissions_skip_the_fsync_and_settlements_do_not(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = await SqliteStores.open(str(tmp_path / "sidegate.db"), clock=clock)
    seen: list[bool] = []
    write = SqliteDatabase.write

    async def spy(db: SqliteDatabase, fn: Any, *, durable: bool = True) -> Any:
        seen.append(durable)
        return await write(db, fn, durable=durable)

    monkeypatch.setattr(SqliteDatabase, "write", spy)
    try:
        hold = BudgetHold(TEAM, "total", 100, 10)
        assert (await stores.meter.admit((), (hold,), "r", 60)).admitted
        assert await stores.meter.settle(
            Settlement(reservation_id="r", budgets=((TEAM, "total"),), cost_nano=10)
        )
        assert seen == [False, True]
    finally:
        await stores.close()
