"""The ``sqlite`` backend: one machine, the default. Durable, and safe for several worker
processes on one file (see :mod:`.sqlite_db` for how).

Open it with ``await SqliteStores.open("sidegate.db")``; ``clock`` (unix seconds) is injectable.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from .admission import decide
from .sqlite_db import SqliteDatabase
from .sqlite_ledger import SqliteLedger, append_entries
from .types import (
    COMMIT_RETENTION_S,
    Admission,
    BudgetHold,
    BudgetStatus,
    LedgerEntry,
    RateDecision,
    Reservation,
    Scope,
    Settlement,
    WindowAdjustment,
    WindowHit,
    nonnegative,
    window_index,
)

__all__ = ["SqliteBudgets", "SqliteLedger", "SqliteMeter", "SqliteRates", "SqliteStores"]

Clock = Callable[[], float]


def _key(scope: Scope) -> tuple[str, str]:
    return scope.team, scope.key_id or ""


def _totals(conn: sqlite3.Connection, scope: Scope, period: str, now: float) -> tuple[int, int]:
    spent, reserved, _ = _budget(conn, scope, period, "", now)
    return spent, reserved


def _budget(
    conn: sqlite3.Connection, scope: Scope, period: str, reservation_id: str, now: float
) -> tuple[int, int, bool]:
    """Spend, live reservations, and whether ``reservation_id`` is one of them: one query."""
    where = (*_key(scope), period)
    row = conn.execute(
        "SELECT (SELECT spent FROM spend WHERE team = ?1 AND key = ?2 AND period = ?3),"
        " (SELECT COALESCE(SUM(amount), 0) FROM reservations"
        "  WHERE team = ?1 AND key = ?2 AND period = ?3 AND expires_at > ?4),"
        " EXISTS (SELECT 1 FROM reservations"
        "  WHERE team = ?1 AND key = ?2 AND period = ?3 AND id = ?5 AND expires_at > ?4)",
        (*where, now, reservation_id),
    ).fetchone()
    return int(row[0] or 0), int(row[1]), bool(row[2])


def _hold(
    conn: sqlite3.Connection,
    scope: Scope,
    period: str,
    amount: int,
    reservation_id: str,
    expires_at: float,
) -> None:
    """Reserve (an expired reservation of the same id, not yet swept, is replaced)."""
    conn.execute(
        "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?, ?)",
        (*_key(scope), period, reservation_id, amount, expires_at),
    )


def _sweep(conn: sqlite3.Connection, now: float) -> None:
    """Drop expired reservations and forgotten commit ids (housekeeping: reads ignore them)."""
    conn.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM commits WHERE forget_at <= ?", (now,))


class _Sweeper:
    """When the next :func:`_sweep` is due: at most once a minute of the store's clock."""

    interval_s = 60.0

    def __init__(self) -> None:
        self._next = float("-inf")

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


def _commit(
    conn: sqlite3.Connection,
    scope: Scope,
    period: str,
    reservation_id: str,
    actual_nano: int,
    entry: LedgerEntry | None,
    now: float,
    retention_s: float,
) -> bool:
    if not _mark(conn, scope, reservation_id, now, retention_s):
        return False
    _charge(conn, scope, period, reservation_id, actual_nano)
    if entry is not None:
        append_entries(conn, (entry,))
    return True


def _mark(
    conn: sqlite3.Connection, scope: Scope, reservation_id: str, now: float, retention_s: float
) -> bool:
    """Remember that ``scope`` committed ``reservation_id``; False when it already had (within
    the retention: a forgotten id not yet swept is remembered afresh)."""
    done = conn.execute(
        "INSERT INTO commits VALUES (?1, ?2, ?3, ?4) ON CONFLICT (team, key, id)"
        " DO UPDATE SET forget_at = ?4 WHERE forget_at <= ?5",
        (*_key(scope), reservation_id, now + retention_s, now),
    )
    return done.rowcount > 0


def _charge(
    conn: sqlite3.Connection, scope: Scope, period: str, reservation_id: str, actual_nano: int
) -> None:
    """Turn the reservation into spend of ``actual_nano``."""
    team, key = _key(scope)
    conn.execute(
        "DELETE FROM reservations WHERE team = ? AND key = ? AND period = ? AND id = ?",
        (team, key, period, reservation_id),
    )
    conn.execute(
        "INSERT INTO spend VALUES (?, ?, ?, ?) ON CONFLICT (team, key, period)"
        " DO UPDATE SET spent = spent + excluded.spent",
        (team, key, period, actual_nano),
    )


def _admit(
    conn: sqlite3.Connection,
    hits: tuple[WindowHit, ...],
    holds: tuple[BudgetHold, ...],
    reservation_id: str,
    now: float,
    ttl_s: float,
) -> Admission:
    """:func:`~.admission.decide` on what the transaction reads, then its writes."""

    def count_of(hit: WindowHit, index: int) -> int:
        row = conn.execute(
            "SELECT window, count FROM rate_windows"
            " WHERE team = ? AND key = ? AND name = ? AND window_s = ?",
            (*_key(hit.scope), hit.name, hit.window_s),
        ).fetchone()
        return int(row[1]) if row is not None and row[0] == index else 0

    def budget_of(hold: BudgetHold) -> tuple[int, int, bool]:
        return _budget(conn, hold.scope, hold.period, reservation_id, now)

    decided = decide(hits, holds, now, count_of, budget_of)
    for (scope, name, window_s), (index, count) in decided.counts.items():
        conn.execute(
            "INSERT OR REPLACE INTO rate_windows VALUES (?, ?, ?, ?, ?, ?)",
            (*_key(scope), name, window_s, index, count),
        )
    for hold in decided.holds:
        amount = max(1, hold.amount_nano)
        _hold(conn, hold.scope, hold.period, amount, reservation_id, now + ttl_s)
    return decided.admission


def _release(
    conn: sqlite3.Connection, scope: Scope, period: str, reservation_id: str, now: float
) -> bool:
    gone = conn.execute(
        "DELETE FROM reservations WHERE team = ? AND key = ? AND period = ? AND id = ?"
        " AND expires_at > ?",
        (*_key(scope), period, reservation_id, now),
    )
    return gone.rowcount > 0


def _adjust(conn: sqlite3.Connection, change: WindowAdjustment) -> None:
    conn.execute(
        "UPDATE rate_windows SET count = MAX(0, count + ?)"
        " WHERE team = ? AND key = ? AND name = ? AND window_s = ? AND window = ?",
        (
            change.delta,
            *_key(change.scope),
            change.name,
            change.window_s,
            window_index(change.window_start, change.window_s),
        ),
    )


class SqliteBudgets:
    """:class:`~.protocols.BudgetStore` in the ``spend``, ``reservations`` and ``commits``
    tables; a commit writes the ledger row in the same transaction."""

    def __init__(
        self, db: SqliteDatabase, clock: Clock, retention_s: float, sweeper: _Sweeper
    ) -> None:
        self._db = db
        self._clock = clock
        self._retention_s = retention_s
        self._sweeper = sweeper

    async def reserve(
        self,
        scope: Scope,
        period: str,
        limit_nano: int,
        amount_nano: int,
        reservation_id: str,
        ttl_s: float,
    ) -> Reservation:
        nonnegative(ttl_s=ttl_s)
        hold, now = BudgetHold(scope, period, limit_nano, amount_nano), self._clock()
        sweep = self._sweeper.due(now)

        def run(conn: sqlite3.Connection) -> Reservation:
            if sweep:
                _sweep(conn, now)
            return _admit(conn, (), (hold,), reservation_id, now, ttl_s).reservations[0]

        return await self._db.write(run, durable=False)

    async def commit(
        self,
        scope: Scope,
        period: str,
        reservation_id: str,
        actual_nano: int,
        entry: LedgerEntry | None = None,
    ) -> bool:
        nonnegative(actual_nano=actual_nano)
        now, keep = self._clock(), self._retention_s

        def run(conn: sqlite3.Connection) -> bool:
            return _commit(conn, scope, period, reservation_id, actual_nano, entry, now, keep)

        return await self._db.write(run)

    async def release(self, scope: Scope, period: str, reservation_id: str) -> bool:
        now = self._clock()

        return await self._db.write(lambda conn: _release(conn, scope, period, reservation_id, now))

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
        hit, moment = WindowHit(scope, name, limit, amount, window_s), now
        if moment is None:
            moment = self._clock()

        def run(conn: sqlite3.Connection) -> RateDecision:
            return _admit(conn, (hit,), (), "", moment, 0).windows[0]

        return await self._db.write(run, durable=False)

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        change = WindowAdjustment(scope, name, delta, window_start, window_s)
        await self._db.write(lambda conn: _adjust(conn, change), durable=False)


class SqliteMeter:
    """:class:`~.protocols.Meter`: an admission or a settlement is one write transaction."""

    def __init__(
        self, db: SqliteDatabase, clock: Clock, retention_s: float, sweeper: _Sweeper
    ) -> None:
        self._db = db
        self._clock = clock
        self._retention_s = retention_s
        self._sweeper = sweeper

    async def admit(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        reservation_id: str,
        ttl_s: float,
    ) -> Admission:
        nonnegative(ttl_s=ttl_s)
        now = self._clock()

        sweep = self._sweeper.due(now)

        def run(conn: sqlite3.Connection) -> Admission:
            if sweep:
                _sweep(conn, now)
            return _admit(conn, hits, holds, reservation_id, now, ttl_s)

        return await self._db.write(run, durable=False)

    async def settle(self, settlement: Settlement) -> bool:
        now, keep = self._clock(), self._retention_s
        rid, cost, entries = settlement.reservation_id, settlement.cost_nano, settlement.entries

        def run(conn: sqlite3.Connection) -> bool:
            if cost is None:
                for scope, period in settlement.budgets:
                    _release(conn, scope, period, rid, now)
            elif settlement.budgets:
                marked: set[Scope] = set()
                for index, (scope, period) in enumerate(settlement.budgets):
                    if scope not in marked and not _mark(conn, scope, rid, now, keep):
                        if index == 0:
                            return False  # settled before: nothing more to do
                        continue
                    marked.add(scope)
                    _charge(conn, scope, period, rid, cost)
            append_entries(conn, entries)
            for change in settlement.adjustments:
                _adjust(conn, change)
            return True

        return await self._db.write(run)


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
        sweeper = _Sweeper()
        self._budgets = SqliteBudgets(db, clock, commit_retention_s, sweeper)
        self._ledger = SqliteLedger(db)
        self._rates = SqliteRates(db, clock)
        self._meter = SqliteMeter(db, clock, commit_retention_s, sweeper)

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

    @property
    def meter(self) -> SqliteMeter:
        return self._meter

    async def ping(self) -> None:
        await self._db.read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._db.close()
