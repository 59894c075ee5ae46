"""The ``memory`` backend: one process, no durability — tests and throwaway runs.

Every operation runs without awaiting, so it is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from .admission import decide
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


def _no_window(hit: WindowHit, index: int) -> int:
    raise AssertionError("a reservation has no rate window")


def _none(hold: BudgetHold) -> tuple[int, int, bool]:
    raise AssertionError("a rate-window hit has no budget")


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

    def now(self) -> float:
        return self._clock()

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
        nonnegative(ttl_s=ttl_s)
        hold = BudgetHold(scope, period, limit_nano, amount_nano)
        decided = decide((), (hold,), self._clock(), _no_window, self.state(reservation_id))
        self.hold(decided.holds, reservation_id, ttl_s)
        return decided.admission.reservations[0]

    def state(self, reservation_id: str) -> Callable[[BudgetHold], tuple[int, int, bool]]:
        """For :func:`~.admission.decide`: a budget's spend, live reservations, and whether
        ``reservation_id`` is one of them."""

        def of(hold: BudgetHold) -> tuple[int, int, bool]:
            held = self._live((hold.scope, hold.period))
            spent = self._spent.get((hold.scope, hold.period), 0)
            return spent, sum(amount for amount, _ in held.values()), reservation_id in held

        return of

    def hold(self, holds: tuple[BudgetHold, ...], reservation_id: str, ttl_s: float) -> None:
        """Reserve what :func:`~.admission.decide` admitted."""
        expires = self._clock() + ttl_s
        for hold in holds:
            held = self._held.setdefault((hold.scope, hold.period), {})
            held[reservation_id] = (max(1, hold.amount_nano), expires)

    async def commit(
        self,
        scope: Scope,
        period: str,
        reservation_id: str,
        actual_nano: int,
        entry: LedgerEntry | None = None,
    ) -> bool:
        nonnegative(actual_nano=actual_nano)
        if not self.mark(scope, reservation_id):
            return False
        self.charge(scope, period, reservation_id, actual_nano)
        if entry is not None:
            self._ledger.append(entry)
        return True

    def mark(self, scope: Scope, reservation_id: str) -> bool:
        """Remember that ``scope`` committed ``reservation_id``; False when it already had."""
        now = self._clock()
        while self._done and next(iter(self._done.values())) <= now:
            self._done.popitem(last=False)
        if (scope, reservation_id) in self._done:
            return False
        self._done[scope, reservation_id] = now + self._retention_s
        return True

    def charge(self, scope: Scope, period: str, reservation_id: str, actual_nano: int) -> None:
        """Turn the reservation into spend of ``actual_nano``."""
        self._held.get((scope, period), {}).pop(reservation_id, None)
        self._spent[scope, period] = self._spent.get((scope, period), 0) + actual_nano

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
        self.counts: dict[tuple[Scope, str, int], tuple[int, int]] = {}
        """(window index, count) per (scope, name, window_s)."""

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
        hit = WindowHit(scope, name, limit, amount, window_s)
        decided = decide((hit,), (), self._clock() if now is None else now, self.count_of, _none)
        self.counts.update(decided.counts)
        return decided.admission.windows[0]

    def count_of(self, hit: WindowHit, index: int) -> int:
        """For :func:`~.admission.decide`: the count of the hit's window number ``index``."""
        window, count = self.counts.get((hit.scope, hit.name, hit.window_s), (index, 0))
        return count if window == index else 0

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        index = window_index(window_start, window_s)
        window, count = self.counts.get((scope, name, window_s), (index - 1, 0))
        if window == index:
            self.counts[scope, name, window_s] = (index, max(0, count + delta))


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
        now = budgets.now()
        decided = decide(hits, holds, now, rates.count_of, budgets.state(reservation_id))
        rates.counts.update(decided.counts)
        budgets.hold(decided.holds, reservation_id, ttl_s)
        return decided.admission

    async def settle(self, settlement: Settlement) -> bool:
        budgets, rid = self._budgets, settlement.reservation_id
        cost = settlement.cost_nano
        if cost is None:
            for scope, period in settlement.budgets:
                await budgets.release(scope, period, rid)
        elif settlement.budgets:
            if not budgets.mark(settlement.budgets[0][0], rid):
                return False  # settled before: nothing more to do
            marked = {settlement.budgets[0][0]}
            for scope, period in settlement.budgets:
                if scope in marked or budgets.mark(scope, rid):
                    marked.add(scope)
                    budgets.charge(scope, period, rid, cost)
        for entry in settlement.entries:  # only given with a cost
            self._ledger.append(entry)
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
