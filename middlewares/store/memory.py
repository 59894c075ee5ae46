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
    Admission,
    BudgetHold,
    BudgetStatus,
    Granularity,
    LedgerEntry,
    RateDecision,
    Reservation,
    Scope,
    Settlement,
    UsageReport,
    WindowHit,
    nonnegative,
    to_micros,
    window_index,
)

__all__ = ["MemoryBudgets", "MemoryLedger", "MemoryMeter", "MemoryRates", "MemoryStores"]

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
        answer = self.decide(scope, period, limit_nano, amount_nano, reservation_id)
        if answer.admitted:
            self.hold(scope, period, amount_nano, reservation_id, ttl_s)
        return answer

    def decide(
        self, scope: Scope, period: str, limit_nano: int, amount_nano: int, reservation_id: str
    ) -> Reservation:
        """What :meth:`reserve` would answer, without reserving."""
        held = self._live((scope, period))
        spent = self._spent.get((scope, period), 0)
        reserved = sum(amount for amount, _ in held.values())
        amount = max(1, amount_nano)
        if reservation_id in held:
            return Reservation(True, spent, reserved, limit_nano)
        if spent + reserved + amount > limit_nano:
            return Reservation(False, spent, reserved, limit_nano)
        return Reservation(True, spent, reserved + amount, limit_nano)

    def hold(
        self, scope: Scope, period: str, amount_nano: int, reservation_id: str, ttl_s: float
    ) -> None:
        """Reserve what :meth:`decide` admitted (an id already live keeps its reservation)."""
        held = self._held.setdefault((scope, period), {})
        if reservation_id not in held:
            held[reservation_id] = (max(1, amount_nano), self._clock() + ttl_s)

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
        decision = self.decide(scope, name, limit, amount, window_s, now)
        self.count(scope, name, window_s, decision)
        return decision

    def decide(
        self,
        scope: Scope,
        name: str,
        limit: int,
        amount: int,
        window_s: int,
        now: float | None = None,
    ) -> RateDecision:
        """What :meth:`hit` would answer, without counting."""
        index = window_index(self._clock() if now is None else now, window_s)
        window, count = self._counts.get((scope, name, window_s), (index, 0))
        count = count if window == index else 0
        allowed = count + amount <= limit
        start = float(index * window_s)
        return RateDecision(
            allowed, count + amount if allowed else count, limit, start, start + window_s
        )

    def count(self, scope: Scope, name: str, window_s: int, decision: RateDecision) -> None:
        """Record an allowed ``decision`` of :meth:`decide` as the window's count."""
        if decision.allowed:
            index = window_index(decision.window_start, window_s)
            self._counts[scope, name, window_s] = (index, decision.count)

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        index = window_index(window_start, window_s)
        window, count = self._counts.get((scope, name, window_s), (index - 1, 0))
        if window == index:
            self._counts[scope, name, window_s] = (index, max(0, count + delta))


class MemoryMeter:
    """:class:`~.protocols.Meter` over the other memory stores: decide everything, then write."""

    def __init__(self, budgets: MemoryBudgets, rates: MemoryRates, ledger: MemoryLedger) -> None:
        self._budgets = budgets
        self._rates = rates
        self._ledger = ledger

    async def admit(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        reservation_id: str,
        ttl_s: float,
    ) -> Admission:
        nonnegative(ttl_s=ttl_s)
        rates, budgets = self._rates, self._budgets
        windows = []
        for hit in hits:
            decision = rates.decide(hit.scope, hit.name, hit.limit, hit.amount, hit.window_s)
            windows.append(decision)
            if not decision.allowed:
                return Admission(False, tuple(windows), ())
        reservations = []
        for hold in holds:
            answer = budgets.decide(
                hold.scope, hold.period, hold.limit_nano, hold.amount_nano, reservation_id
            )
            reservations.append(answer)
            if not answer.admitted:
                return Admission(False, tuple(windows), tuple(reservations))
        for hit, decision in zip(hits, windows, strict=True):
            rates.count(hit.scope, hit.name, hit.window_s, decision)
        for hold in holds:
            budgets.hold(hold.scope, hold.period, hold.amount_nano, reservation_id, ttl_s)
        return Admission(True, tuple(windows), tuple(reservations))

    async def settle(self, settlement: Settlement) -> bool:
        budgets, rid = self._budgets, settlement.reservation_id
        cost = settlement.cost_nano
        if cost is None:
            for scope, period in settlement.budgets:
                await budgets.release(scope, period, rid)
        elif settlement.budgets:
            first = True
            for scope, period in settlement.budgets:
                charged = await budgets.commit(
                    scope, period, rid, cost, settlement.entry if first else None
                )
                if first and not charged:
                    return False
                first = False
        elif settlement.entry is not None:
            self._ledger.append(settlement.entry)
        for change in settlement.adjustments:
            await self._rates.adjust(
                change.scope,
                change.name,
                change.delta,
                window_start=change.window_start,
                window_s=change.window_s,
            )
        return True


class MemoryStores:
    """The memory backend's three stores; ``clock`` gives unix seconds (inject one in tests)."""

    def __init__(
        self, *, clock: Clock = time.time, commit_retention_s: float = COMMIT_RETENTION_S
    ) -> None:
        self._ledger = MemoryLedger()
        self._budgets = MemoryBudgets(self._ledger, clock, commit_retention_s)
        self._rates = MemoryRates(clock)
        self._meter = MemoryMeter(self._budgets, self._rates, self._ledger)

    @property
    def meter(self) -> MemoryMeter:
        return self._meter

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
