"""Admission from per-process leases, settlement in batches: a meter with no round trip per request.

:class:`LeasedMeter` sits in front of a shared :class:`~.protocols.Meter` (a SQLite file or a
Redis that several processes use). Instead of asking the store about every request, a process
takes a **lease** — a slice of a budget (a reservation of its own in the store) or a number of
slots of a rate window (counted in the store) — and admits requests from it in memory. What the
requests cost is written every ``batch_s`` seconds: each lease is committed at the sum of the
costs of the requests it admitted, with their ledger entries, which also gives back what the lease
did not use. A lease that runs short grows by another slice (its own reservation: a budget lease
is one or more of them, committed and released together); it stops admitting after ``batch_s``,
when the next one is taken.

What holds, and what changes, against a meter that asks the store about every request:

- **No overspend, across processes.** The store admits a lease only within the budget, like any
  reservation, and a process admits a request only within its leases; so the spend of a period
  stays within its limit as before (with the same documented exception: a request that costs more
  than its estimate). A slice is at most :data:`LEASE_REQUESTS` requests' worth and at most a
  quarter of what the store said was left, so near the limit the slices shrink; a request is
  refused only when the store cannot reserve even what its own estimate lacks. Another process
  may hold the rest in an unused slice, though, for up to ``batch_s``.
- **Rate windows** are leased the same way (at most a sixteenth of the limit at a time); slots a
  process leased and did not use (or got back from a correction) serve only that process until
  the window ends, so another process may be refused while this one holds unused slots. The
  ``x-ratelimit-*`` figures a process reports are the store's count at its last lease plus its
  own use since.
- **Durability.** A request's cost reaches the store within about ``batch_s`` of its end, not
  before its answer; if the process dies, the spend not yet written is lost (under-counted) and its
  leases stay reserved until their time to live runs out (the reservation TTL plus ``batch_s``
  and a second). Closing the meter (at shutdown) writes everything. A team's and a key's lease
  are written in two settlements, not one transaction.
- **Reports** (``/admin/budgets``, ``sidegate usage``) read the store: spend and the ledger lag by
  up to ``batch_s``, and a budget's ``reserved`` includes the leases.

A settlement for a reservation this meter did not admit (one admitted before a restart, say) goes
to the store as it is. So does one repeated after :data:`_SETTLED_MEMORY` later settlements: it
would be charged again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from .protocols import BudgetStore, Ledger, Meter, RateWindows, Stores
from .types import (
    Admission,
    BudgetHold,
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

__all__ = ["LEASE_REQUESTS", "LeasedMeter", "LeasedStores"]

log = structlog.get_logger(__name__)

LEASE_REQUESTS = 128
"""A lease covers up to this many requests like the one that asked for it."""

_ROUNDS = 8
"""Leases one admission may take (each used up by concurrent ones before it could use it) before
it goes to the store directly, as without leases."""

_SETTLED_MEMORY = 10_000
"""How many settled reservation ids are remembered, so that a repeated settlement is a no-op
(about 170 bytes each). The limits policy settles each request once (a commit is retried only
when the store refused it, and this meter's settlements never reach the store)."""


@dataclass(slots=True, eq=False)
class _Lease:
    """A share of one budget: ``slices`` are its reservations in the store, ``amount`` in all."""

    slices: list[str]
    amount: int
    opened: float
    held: int = 0
    live: int = 0
    spent: int = 0
    entries: list[LedgerEntry] = field(default_factory=list)

    @property
    def free(self) -> int:
        return self.amount - self.held - self.spent


@dataclass(slots=True, eq=False)
class _Budget:
    """One budget's leases: the one admitting now, and those waiting to be written; ``spent`` and
    ``reserved`` are what the store last said, updated for the leases written since."""

    scope: Scope
    period: str
    spent: int = 0
    reserved: int = 0
    current: _Lease | None = None
    closed: list[_Lease] = field(default_factory=list)
    taking: asyncio.Future[None] | None = None


@dataclass(slots=True, eq=False)
class _Window:
    """The slots of one rate window this process has counted in the store, and used."""

    index: int = -1
    granted: int = 0
    used: int = 0
    count: int = 0
    taking: asyncio.Future[None] | None = None


@dataclass(slots=True, eq=False)
class _Held:
    """One admitted request: the lease and amount of each budget it holds."""

    holds: dict[tuple[Scope, str], tuple[_Lease, int]]
    expires_at: float
    admission: Admission


_Need = WindowHit | BudgetHold


class LeasedMeter:
    """A :class:`~.protocols.Meter` admitting from leases on ``inner`` and settling every
    ``batch_s`` seconds (see the module's docstring); call :meth:`close` to write everything."""

    def __init__(
        self, inner: Meter, *, batch_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        if batch_s <= 0:
            raise ValueError(f"batch_s must be positive, got {batch_s}")
        self._inner = inner
        self._batch_s = batch_s
        self._clock = clock
        self._budgets: dict[tuple[Scope, str], _Budget] = {}
        self._windows: dict[tuple[Scope, str, int], _Window] = {}
        self._live: dict[str, _Held] = {}
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._loose: dict[str, list[LedgerEntry]] = {}
        self._adjust: dict[tuple[Scope, str, float, int], int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._closed = False

    # -- admission --------------------------------------------------------------------------

    async def admit(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        reservation_id: str,
        ttl_s: float,
    ) -> Admission:
        if ttl_s < 0:
            nonnegative(ttl_s=ttl_s)
        self._start()
        held = self._live.get(reservation_id)
        if held is not None:  # admitted before: keeps what it holds
            return held.admission
        if _names_twice(hits, holds):
            return await self._inner.admit(hits, holds, reservation_id, ttl_s)
        taken = 0
        while taken < _ROUNDS:
            now = self._clock()
            short = self._shortage(hits, holds, now)
            if short is None:
                return self._take(hits, holds, reservation_id, ttl_s, now)
            state = self._state(short)
            if state.taking is not None:  # another admission is taking that lease: wait for it
                await asyncio.shield(state.taking)
                continue
            taken += 1
            refused = await self._lease(short, state, ttl_s)
            if refused is not None:
                return self._refusal(hits, holds, short, refused)
        # Leases taken were used up by concurrent requests each time: ask the store directly.
        return await self._inner.admit(hits, holds, reservation_id, ttl_s)

    def _shortage(
        self, hits: tuple[WindowHit, ...], holds: tuple[BudgetHold, ...], now: float
    ) -> _Need | None:
        """The first hit or hold the leases in hand cannot cover."""
        for hit in hits:
            window = self._windows.get((hit.scope, hit.name, hit.window_s))
            index = window_index(now, hit.window_s)
            if window is None or window.index != index or window.granted - window.used < hit.amount:
                return hit
        for hold in holds:
            budget = self._budgets.get((hold.scope, hold.period))
            lease = budget.current if budget is not None else None
            if lease is None or now - lease.opened >= self._batch_s:
                return hold
            if lease.free < max(1, hold.amount_nano):
                return hold
        return None

    def _take(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        reservation_id: str,
        ttl_s: float,
        now: float,
    ) -> Admission:
        """Admit from the leases (which cover everything: see :meth:`_shortage`)."""
        decisions = []
        for hit in hits:
            window = self._windows[(hit.scope, hit.name, hit.window_s)]
            window.used += hit.amount
            decisions.append(_decision(hit, window, True))
        reservations = []
        taken: dict[tuple[Scope, str], tuple[_Lease, int]] = {}
        for hold in holds:
            budget = self._budgets[(hold.scope, hold.period)]
            lease = budget.current
            assert lease is not None
            amount = max(1, hold.amount_nano)
            lease.held += amount
            lease.live += 1
            taken[(hold.scope, hold.period)] = (lease, amount)
            reservations.append(Reservation(True, budget.spent, budget.reserved, hold.limit_nano))
        admission = Admission(True, tuple(decisions), tuple(reservations))
        if taken:
            self._live[reservation_id] = _Held(taken, now + ttl_s, admission)
        return admission

    def _refusal(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        short: _Need,
        refused: RateDecision | Reservation,
    ) -> Admission:
        """The admission refusing at ``short``, as the store would report it (nothing taken)."""
        decisions: list[RateDecision] = []
        for hit in hits:
            if hit is short:
                assert isinstance(refused, RateDecision)
                return Admission(False, (*decisions, refused), ())
            window = self._windows[(hit.scope, hit.name, hit.window_s)]
            decisions.append(_decision(hit, window, True, hit.amount))
        reservations: list[Reservation] = []
        for hold in holds:
            if hold is short:
                break
            budget = self._budgets[(hold.scope, hold.period)]
            reservations.append(Reservation(True, budget.spent, budget.reserved, hold.limit_nano))
        assert isinstance(refused, Reservation)
        return Admission(False, tuple(decisions), (*reservations, refused))

    def _state(self, need: _Need) -> _Window | _Budget:
        if isinstance(need, WindowHit):
            return self._windows.setdefault((need.scope, need.name, need.window_s), _Window())
        key = (need.scope, need.period)
        return self._budgets.setdefault(key, _Budget(need.scope, need.period))

    async def _lease(
        self, need: _Need, state: _Window | _Budget, ttl_s: float
    ) -> RateDecision | Reservation | None:
        """Take a lease covering ``need`` (while it does, other admissions needing that budget or
        window wait); the store's refusal when it cannot give even ``need`` itself."""
        state.taking = asyncio.get_running_loop().create_future()
        try:
            if isinstance(need, WindowHit):
                assert isinstance(state, _Window)
                return await self._lease_window(need, state)
            assert isinstance(state, _Budget)
            return await self._lease_budget(need, state, ttl_s)
        finally:
            taking, state.taking = state.taking, None
            taking.set_result(None)

    async def _lease_window(self, hit: WindowHit, window: _Window) -> RateDecision | None:
        index = window_index(self._clock(), hit.window_s)
        short = hit.amount - (window.granted - window.used if window.index == index else 0)
        want = max(short, min(max(hit.amount, 1) * LEASE_REQUESTS, hit.limit // 16))
        for amount in dict.fromkeys((want, short)):
            lease = WindowHit(hit.scope, hit.name, hit.limit, amount, hit.window_s)
            admission = await self._inner.admit((lease,), (), uuid.uuid4().hex, 0)
            decision = admission.windows[0]
            if decision.allowed:
                index = round(decision.window_start / hit.window_s)
                if window.index != index:
                    window.index, window.granted, window.used = index, 0, 0
                window.granted += amount
                window.count = decision.count
                return None
        return decision

    async def _lease_budget(
        self, hold: BudgetHold, budget: _Budget, ttl_s: float
    ) -> Reservation | None:
        """Grow the lease admitting now by what ``hold`` lacks (a new lease once it is
        ``batch_s`` old): a reservation of its own in the store, written with the lease."""
        amount = max(1, hold.amount_nano)
        lease = budget.current
        if lease is not None and self._clock() - lease.opened >= self._batch_s:
            budget.closed.append(lease)
            budget.current = lease = None
        short = amount - lease.free if lease is not None else amount
        left = hold.limit_nano - budget.spent - budget.reserved
        want = max(short, min(amount * LEASE_REQUESTS, left // 4))
        for size in dict.fromkeys((want, short)):
            slice_id = f"lease:{uuid.uuid4().hex}"
            slice_ = BudgetHold(hold.scope, hold.period, hold.limit_nano, size)
            admission = await self._inner.admit((), (slice_,), slice_id, self._lease_ttl(ttl_s))
            answer = admission.reservations[0]
            budget.spent, budget.reserved = answer.spent, answer.reserved
            if answer.admitted:
                if budget.current is None:  # it admits for batch_s from now
                    budget.current = _Lease([], 0, self._clock())
                budget.current.slices.append(slice_id)
                budget.current.amount += size
                return None
        return answer

    def _lease_ttl(self, ttl_s: float) -> float:
        """A slice outlives every request it admits: one admitted just before the lease stops
        admitting may hold for ``ttl_s`` more (and a second covers the store's round trip)."""
        return ttl_s + self._batch_s + 1.0

    # -- settlement -------------------------------------------------------------------------

    async def settle(self, settlement: Settlement) -> bool:
        rid = settlement.reservation_id
        held = self._live.pop(rid, None)
        if held is None and settlement.budgets:
            if rid in self._settled:
                return settlement.cost_nano is None
            return await self._inner.settle(settlement)
        self._start()
        cost = settlement.cost_nano
        first: _Lease | None = None
        for budget in settlement.budgets:
            lease, amount = held.holds.pop(budget, (None, 0)) if held is not None else (None, 0)
            if lease is None:
                continue
            lease.held -= amount
            lease.live -= 1
            if cost is not None:
                lease.spent += cost
                first = first or lease
        if first is not None:
            first.entries.extend(settlement.entries)
        elif settlement.entries:
            self._loose.setdefault(settlement.entries[0].team, []).extend(settlement.entries)
        for change in settlement.adjustments:
            self._correct(change)
        if settlement.budgets:
            self._remember(rid)
        return True

    def _correct(self, change: WindowAdjustment) -> None:
        """Apply a window correction to the slots in hand; what they cannot absorb (a window
        that is over, or use beyond the slots leased) goes to the store with the next batch."""
        window = self._windows.get((change.scope, change.name, change.window_s))
        delta = change.delta
        if window is not None and window.index == window_index(
            change.window_start, change.window_s
        ):
            window.used = max(0, window.used + delta)
            delta = max(0, window.used - window.granted)
            if delta == 0:
                return
            window.granted = window.used
            window.count += delta
        key = (change.scope, change.name, change.window_start, change.window_s)
        self._adjust[key] = self._adjust.get(key, 0) + delta

    def _remember(self, rid: str) -> None:
        self._settled[rid] = None
        if len(self._settled) > _SETTLED_MEMORY:
            self._settled.popitem(last=False)

    # -- writing ----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._every_batch())

    async def _every_batch(self) -> None:
        while True:
            await asyncio.sleep(self._batch_s)
            await asyncio.shield(self.flush())  # close() waits for it rather than cut it short

    async def flush(self, *, final: bool = False) -> None:
        """Write what is due: every lease past its ``batch_s`` whose requests have all ended
        (every lease, when ``final``), the entries of requests without a budget, and window
        corrections. What the store does not take stays for the next flush (settling is
        idempotent)."""
        async with self._flushing:
            await self._flush(final)

    async def _flush(self, final: bool) -> None:
        now = self._clock()
        self._expire(now)
        leases: list[tuple[_Budget, _Lease]] = []
        for budget in self._budgets.values():
            lease = budget.current
            if lease is not None and (final or now - lease.opened >= self._batch_s):
                budget.closed.append(lease)
                budget.current = None
            leases += [(budget, lease) for lease in budget.closed if lease.live == 0 or final]
        loose, self._loose = self._loose, {}
        adjust, self._adjust = self._adjust, {}
        teams: dict[str, list[WindowAdjustment]] = {}
        for (scope, name, start, window_s), delta in adjust.items():
            if delta:
                change = WindowAdjustment(scope, name, delta, start, window_s)
                teams.setdefault(scope.team, []).append(change)
        batches = [
            Settlement(
                reservation_id=f"batch:{uuid.uuid4().hex}",
                cost_nano=0 if team in loose else None,
                entries=tuple(loose.get(team, ())),
                adjustments=tuple(teams.get(team, ())),
            )
            for team in loose.keys() | teams.keys()
        ]
        results = await asyncio.gather(
            *(self._write(_written(budget, lease)) for budget, lease in leases),
            *(self._write([batch]) for batch in batches),
            return_exceptions=True,
        )
        for (budget, lease), result in zip(leases, results, strict=False):
            if not isinstance(result, BaseException):
                budget.closed.remove(lease)
                budget.reserved = max(0, budget.reserved - lease.amount)
                budget.spent += lease.spent
        for batch, result in zip(batches, results[len(leases) :], strict=True):
            if isinstance(result, BaseException):  # put the batch back
                for entry in batch.entries:
                    self._loose.setdefault(entry.team, []).append(entry)
                for change in batch.adjustments:
                    key = (change.scope, change.name, change.window_start, change.window_s)
                    self._adjust[key] = self._adjust.get(key, 0) + change.delta
        errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})
        if errors:
            log.warning("lease_flush_deferred", errors=errors)

    async def _write(self, settlements: list[Settlement]) -> None:
        for settlement in settlements:
            await self._inner.settle(settlement)

    def _expire(self, now: float) -> None:
        """Drop the holds of requests past their time to live, as the store would."""
        for rid in [rid for rid, held in self._live.items() if held.expires_at <= now]:
            for lease, amount in self._live.pop(rid).holds.values():
                lease.held -= amount
                lease.live -= 1

    async def close(self) -> None:
        """Stop the periodic writing and write everything."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush(final=True)


def _written(budget: _Budget, lease: _Lease) -> list[Settlement]:
    """The settlements writing ``lease``: its first slice committed at what its requests cost,
    with their entries, and the others released (a lease that admitted nothing: all released).
    Each is idempotent, so a lease that failed half-way is written again whole."""
    spent = lease.spent > 0 or bool(lease.entries)
    budgets = ((budget.scope, budget.period),)
    first, *rest = lease.slices
    return [
        Settlement(
            reservation_id=first,
            budgets=budgets,
            cost_nano=lease.spent if spent else None,
            entries=tuple(lease.entries),
        ),
        *(Settlement(reservation_id=other, budgets=budgets) for other in rest),
    ]


def _decision(hit: WindowHit, window: _Window, allowed: bool, extra: int = 0) -> RateDecision:
    """The window's state as this process sees it: the store's count at the last lease, less
    the slots leased and not used yet (``extra``: as if ``hit`` were counted too)."""
    start = float(window.index * hit.window_s)
    count = window.count - window.granted + window.used + extra
    return RateDecision(allowed, count, hit.limit, start, start + hit.window_s)


def _names_twice(hits: tuple[WindowHit, ...], holds: tuple[BudgetHold, ...]) -> bool:
    windows = {(hit.scope, hit.name, hit.window_s) for hit in hits}
    budgets = {(hold.scope, hold.period) for hold in holds}
    return len(windows) < len(hits) or len(budgets) < len(holds)


class LeasedStores:
    """``inner``'s stores with its meter behind a :class:`LeasedMeter`."""

    def __init__(
        self, inner: Stores, *, batch_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._inner = inner
        self._meter = LeasedMeter(inner.meter, batch_s=batch_s, clock=clock)

    @property
    def budgets(self) -> BudgetStore:
        return self._inner.budgets

    @property
    def ledger(self) -> Ledger:
        return self._inner.ledger

    @property
    def rates(self) -> RateWindows:
        return self._inner.rates

    @property
    def meter(self) -> LeasedMeter:
        return self._meter

    async def ping(self) -> None:
        await self._inner.ping()

    async def close(self) -> None:
        try:
            await self._meter.close()
        finally:
            await self._inner.close()
