"""The ``memory`` backend: one process, no durability — tests and throwaway runs.

Every operation runs without awaiting, so it is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from .ledger import aggregate_entries
from .types import (
    COMMIT_RETENTION_S,
    BudgetStatus,
    Granularity,
    LedgerEntry,
    RateDecision,
    Reservation,
    Scope,
    UsageReport,
    nonnegative,
    to_micros,
    window_index,
)

__all__ = ["MemoryBudgets", "MemoryLedger", "MemoryRates", "MemoryStores"]

Clock = Callable[[], float]
_Budget = tuple[Scope, str]


class MemoryLedger:
    """:class:`~.protocols.Ledger` in a list per team."""

    def __init__(self) -> None:
        self._entries: dict[str, list[LedgerEntry]] = {}

    def append(self, entry: LedgerEntry) -> None:
        self._entries.setdefault(entry.team, []).append(entry)

    async def record(self, entry: LedgerEntry) -> None:
        self.append(entry)

    async def query(self, team: str, since: datetime, until: datetime) -> list[LedgerEntry]:
        low, high = to_micros(since), to_micros(until)
        found = [e for e in self._entries.get(team, ()) if low <= to_micros(e.timestamp) <= high]
        return sorted(found, key=lambda e: to_micros(e.timestamp))

    async def aggregate(
        self, team: str, since: datetime, until: datetime, granularity: Granularity
    ) -> UsageReport:
        return aggregate_entries(await self.query(team, since, until), granularity)


class MemoryBudgets:
    """:class:`~.protocols.BudgetStore` in dictionaries."""

    def __init__(self, ledger: MemoryLedger, clock: Clock, retention_s: float) -> None:
        self._ledger = ledger
        self._clock = clock
        self._retention_s = retention_s
        self._spent: dict[_Budget, int] = {}
        self._held: dict[_Budget, dict[str, tuple[int, float]]] = {}
        self._done: OrderedDict[tuple[Scope, str], float] = OrderedDict()

    def _live(self, budget: _Budget) -> dict[str, tuple[int, float]]:
        now = self._clock()
        held = self._held.setdefault(budget, {})
        for rid in [rid for rid, (_, expires) in held.items() if expires <= now]:
            del held[rid]
        return held

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
        held = self._live((scope, period))
        spent = self._spent.get((scope, period), 0)
        reserved = sum(amount for amount, _ in held.values())
        amount = max(1, amount_nano)
        if reservation_id in held:
            return Reservation(True, spent, reserved, limit_nano)
        if spent + reserved + amount > limit_nano:
            return Reservation(False, spent, reserved, limit_nano)
        held[reservation_id] = (amount, self._clock() + ttl_s)
        return Reservation(True, spent, reserved + amount, limit_nano)

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
        while self._done and next(iter(self._done.values())) <= now:
            self._done.popitem(last=False)
        if (scope, reservation_id) in self._done:
            return False
        self._held.get((scope, period), {}).pop(reservation_id, None)
        self._spent[scope, period] = self._spent.get((scope, period), 0) + actual_nano
        if entry is not None:
            self._ledger.append(entry)
        self._done[scope, reservation_id] = now + self._retention_s
        return True

    async def release(self, scope: Scope, period: str, reservation_id: str) -> bool:
        return self._live((scope, period)).pop(reservation_id, None) is not None

    async def status(self, scope: Scope, period: str) -> BudgetStatus:
        held = self._live((scope, period))
        spent = self._spent.get((scope, period), 0)
        return BudgetStatus(spent, sum(amount for amount, _ in held.values()))


class MemoryRates:
    """:class:`~.protocols.RateWindows` as one counter per key."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._counts: dict[tuple[Scope, str, int], tuple[int, int]] = {}

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
        window, count = self._counts.get((scope, name, window_s), (index, 0))
        count = count if window == index else 0
        allowed = count + amount <= limit
        if allowed:
            count += amount
            self._counts[scope, name, window_s] = (index, count)
        start = float(index * window_s)
        return RateDecision(allowed, count, limit, start, start + window_s)

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        index = window_index(window_start, window_s)
        window, count = self._counts.get((scope, name, window_s), (index - 1, 0))
        if window == index:
            self._counts[scope, name, window_s] = (index, max(0, count + delta))


class MemoryStores:
    """The memory backend's three stores; ``clock`` gives unix seconds (inject one in tests)."""

    def __init__(
        self, *, clock: Clock = time.time, commit_retention_s: float = COMMIT_RETENTION_S
    ) -> None:
        self._ledger = MemoryLedger()
        self._budgets = MemoryBudgets(self._ledger, clock, commit_retention_s)
        self._rates = MemoryRates(clock)

    @property
    def budgets(self) -> MemoryBudgets:
        return self._budgets

    @property
    def ledger(self) -> MemoryLedger:
        return self._ledger

    @property
    def rates(self) -> MemoryRates:
        return self._rates

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
