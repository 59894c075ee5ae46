"""The ``sqlite`` backend: one machine, the default. Durable, and safe for several worker
processes on one file (see :mod:`.sqlite_db` for how).

Open it with ``await SqliteStores.open("sidegate.db")``; ``clock`` (unix seconds) is injectable.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from .sqlite_db import SqliteDatabase
from .sqlite_ledger import SqliteLedger, append_entry
from .types import (
    COMMIT_RETENTION_S,
    BudgetStatus,
    LedgerEntry,
    RateDecision,
    Reservation,
    Scope,
    nonnegative,
    window_index,
)

__all__ = ["SqliteBudgets", "SqliteLedger", "SqliteRates", "SqliteStores"]

Clock = Callable[[], float]


def _key(scope: Scope) -> tuple[str, str]:
    return scope.team, scope.key_id or ""


def _totals(conn: sqlite3.Connection, scope: Scope, period: str, now: float) -> tuple[int, int]:
    where = (*_key(scope), period)
    row = conn.execute(
        "SELECT spent FROM spend WHERE team = ? AND key = ? AND period = ?", where
    ).fetchone()
    held = conn.execute(
        "SELECT COALESCE(SUM(amount), 0) FROM reservations"
        " WHERE team = ? AND key = ? AND period = ? AND expires_at > ?",
        (*where, now),
    ).fetchone()
    return (0 if row is None else int(row[0])), int(held[0])


class SqliteBudgets:
    """:class:`~.protocols.BudgetStore` in the ``spend``, ``reservations`` and ``commits``
    tables; a commit writes the ledger row in the same transaction."""

    def __init__(self, db: SqliteDatabase, clock: Clock, retention_s: float) -> None:
        self._db = db
        self._clock = clock
        self._retention_s = retention_s

    async def reserve(
        self,
        scope: Scope,
        period: str,
        limit_nano: int,
        amount_nano: int,
        reservation_id: str,
        ttl_s: float,
    ) -> Reservation:
        nonnegative(limit_nano=limit_nano, amount_nano=amount_nano, ttl_s=ttl_s)
        amount, now = max(1, amount_nano), self._clock()
        where = (*_key(scope), period)

        def run(conn: sqlite3.Connection) -> Reservation:
            conn.execute(
                "DELETE FROM reservations"
                " WHERE team = ? AND key = ? AND period = ? AND expires_at <= ?",
                (*where, now),
            )
            spent, reserved = _totals(conn, scope, period, now)
            live = conn.execute(
                "SELECT 1 FROM reservations WHERE team = ? AND key = ? AND period = ? AND id = ?",
                (*where, reservation_id),
            ).fetchone()
            if live is not None:
                return Reservation(True, spent, reserved, limit_nano)
            if spent + reserved + amount > limit_nano:
                return Reservation(False, spent, reserved, limit_nano)
            conn.execute(
                "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?)",
                (*where, reservation_id, amount, now + ttl_s),
            )
            return Reservation(True, spent, reserved + amount, limit_nano)

        return await self._db.write(run)

    async def commit(
        self,
        scope: Scope,
        period: str,
        reservation_id: str,
        actual_nano: int,
        entry: LedgerEntry | None = None,
    ) -> bool:
        nonnegative(actual_nano=actual_nano)
        now = self._clock()
        team, key = _key(scope)

        def run(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM commits WHERE forget_at <= ?", (now,))
            done = conn.execute(
                "INSERT OR IGNORE INTO commits VALUES (?, ?, ?, ?)",
                (team, key, reservation_id, now + self._retention_s),
            )
            if done.rowcount == 0:
                return False
            conn.execute(
                "DELETE FROM reservations WHERE team = ? AND key = ? AND period = ? AND id = ?",
                (team, key, period, reservation_id),
            )
            conn.execute(
                "INSERT INTO spend VALUES (?, ?, ?, ?) ON CONFLICT (team, key, period)"
                " DO UPDATE SET spent = spent + excluded.spent",
                (team, key, period, actual_nano),
            )
            if entry is not None:
                append_entry(conn, entry)
            return True

        return await self._db.write(run)

    async def release(self, scope: Scope, period: str, reservation_id: str) -> bool:
        now = self._clock()

        def run(conn: sqlite3.Connection) -> bool:
            gone = conn.execute(
                "DELETE FROM reservations WHERE team = ? AND key = ? AND period = ? AND id = ?"
                " AND expires_at > ?",
                (*_key(scope), period, reservation_id, now),
            )
            return gone.rowcount > 0

        return await self._db.write(run)

    async def status(self, scope: Scope, period: str) -> BudgetStatus:
        now = self._clock()
        spent, reserved = await self._db.read(lambda conn: _totals(conn, scope, period, now))
        return BudgetStatus(spent, reserved)


class SqliteRates:
    """:class:`~.protocols.RateWindows` as one row per key holding its current window."""

    def __init__(self, db: SqliteDatabase, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def hit(
        self,
        scope: Scope,
        name: str,
        limit: int,
        amount: int = 1,
        *,
        window_s: int = 60,
        now: float | None = None,
    ) -> RateDecision:
        nonnegative(limit=limit, amount=amount)
        index = window_index(self._clock() if now is None else now, window_s)
        where = (*_key(scope), name, window_s)

        def run(conn: sqlite3.Connection) -> tuple[bool, int]:
            row = conn.execute(
                "SELECT window, count FROM rate_windows"
                " WHERE team = ? AND key = ? AND name = ? AND window_s = ?",
                where,
            ).fetchone()
            count = int(row[1]) if row is not None and row[0] == index else 0
            if count + amount > limit:
                return False, count
            conn.execute(
                "INSERT OR REPLACE INTO rate_windows VALUES (?, ?, ?, ?, ?, ?)",
                (*where, index, count + amount),
            )
            return True, count + amount

        allowed, count = await self._db.write(run)
        start = float(index * window_s)
        return RateDecision(allowed, count, limit, start, start + window_s)

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        index = window_index(window_start, window_s)
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE rate_windows SET count = MAX(0, count + ?)"
                " WHERE team = ? AND key = ? AND name = ? AND window_s = ? AND window = ?",
                (delta, *_key(scope), name, window_s, index),
            )
        )


class SqliteStores:
    """The sqlite backend's three stores on one database file."""

    def __init__(
        self,
        db: SqliteDatabase,
        *,
        clock: Clock = time.time,
        commit_retention_s: float = COMMIT_RETENTION_S,
    ) -> None:
        self._db = db
        self._budgets = SqliteBudgets(db, clock, commit_retention_s)
        self._ledger = SqliteLedger(db)
        self._rates = SqliteRates(db, clock)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        clock: Clock = time.time,
        commit_retention_s: float = COMMIT_RETENTION_S,
        busy_timeout_s: float = 10.0,
    ) -> SqliteStores:
        """Open (creating if needed) the file at ``path``; raises StoreUnavailable if it cannot."""
        db = await SqliteDatabase.open(path, busy_timeout_s=busy_timeout_s)
        return cls(db, clock=clock, commit_retention_s=commit_retention_s)

    @property
    def budgets(self) -> SqliteBudgets:
        return self._budgets

    @property
    def ledger(self) -> SqliteLedger:
        return self._ledger

    @property
    def rates(self) -> SqliteRates:
        return self._rates

    async def ping(self) -> None:
        await self._db.read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._db.close()
