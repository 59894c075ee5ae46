"""The store seams: budget reservations, the spend ledger, rate windows, and their bundle.

Every operation is atomic — across the coroutines of one process and, for ``sqlite`` and
``redis``, across processes and machines sharing the store. Every operation raises
:class:`~.types.StoreUnavailable` (and nothing else of the backend's) when the store cannot be
reached; the caller then knows nothing happened, or, for a commit, must retry it (commits are
idempotent, so retrying is always safe).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from .types import (
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
)

__all__ = ["BudgetStore", "Ledger", "Meter", "RateWindows", "Stores"]


class BudgetStore(Protocol):
    """Reserve before a request, commit the actual cost (or release) after.

    A budget is a ``(scope, period)`` pair; ``period`` is a key from
    :func:`~.periods.period_key`. The limit is passed on every call, so a reloaded config applies
    at once. Amounts are nano-USD.
    """

    async def reserve(
        self,
        scope: Scope,
        period: str,
        limit_nano: int,
        amount_nano: int,
        reservation_id: str,
        ttl_s: float,
    ) -> Reservation:
        """Hold ``amount_nano`` iff ``spent + live reservations + amount <= limit``.

        A reservation holds at least 1 nano-USD, so spend exactly at the limit refuses every
        further request. It expires ``ttl_s`` after it was made unless committed or released
        first (a crashed worker does not hold budget forever). Reserving an id that is already
        live changes nothing and answers admitted.
        """
        ...

    async def commit(
        self,
        scope: Scope,
        period: str,
        reservation_id: str,
        actual_nano: int,
        entry: LedgerEntry | None = None,
    ) -> bool:
        """In one atomic step: drop the reservation, add ``actual_nano`` to the spend of
        ``period`` (the one the reservation was made in) and append ``entry`` to the ledger.

        Idempotent by ``reservation_id``: a repeated commit changes nothing and returns False;
        the first returns True. A reservation that expired meanwhile is still charged. Commit
        the team scope with the entry and a key scope with ``entry=None``.
        """
        ...

    async def release(self, scope: Scope, period: str, reservation_id: str) -> bool:
        """Drop the reservation without charging; False when it was not live."""
        ...

    async def status(self, scope: Scope, period: str) -> BudgetStatus:
        """Committed spend and live reservations of the budget."""
        ...


class Ledger(Protocol):
    """Every charged request, queryable per team only."""

    async def record(self, entry: LedgerEntry) -> None:
        """Append ``entry`` outside a budget commit (a team without a budget)."""
        ...

    async def query(self, team: str, since: datetime, until: datetime) -> list[LedgerEntry]:
        """The entries of ``team`` with ``since <= timestamp <= until``, oldest first."""
        ...

    async def aggregate(
        self, team: str, since: datetime, until: datetime, granularity: Granularity
    ) -> UsageReport:
        """:meth:`query`'s entries summed per UTC hour, day or month, and per model."""
        ...


class RateWindows(Protocol):
    """Fixed-window counters (a window is ``[k·window_s, (k+1)·window_s)`` of unix time).

    Fixed windows are one counter per key and window, cheap and atomic in every backend; a
    client may send up to twice the limit across a window boundary, which is the accepted cost.
    """

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
        """Add ``amount`` to the current window of ``(scope, name)`` iff the total stays within
        ``limit``; a refused hit adds nothing. ``now`` defaults to the store's clock."""
        ...

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        """Add ``delta`` (may be negative; the count stays >= 0) to the window that began at
        ``window_start`` — to correct an estimate with actual usage. A window that is over no
        longer matters and may be left alone."""
        ...


class Meter(Protocol):
    """A request's whole admission, and its whole settlement, each one atomic store operation.

    The limits policy uses these rather than the single operations above: one round trip (one
    transaction, one Lua script) before the request and one after, whatever the number of windows
    and budgets, and no window counted for a request a budget then refuses.
    """

    async def admit(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        reservation_id: str,
        ttl_s: float,
    ) -> Admission:
        """All or nothing: count every hit and reserve every hold, or change nothing.

        Each hit and hold means what :meth:`RateWindows.hit` and :meth:`BudgetStore.reserve`
        mean; every hold is reserved under ``reservation_id`` for ``ttl_s``.
        """
        ...

    async def settle(self, settlement: Settlement) -> bool:
        """Commit or release the reservations, record the entries and apply the adjustments, as
        :class:`~.types.Settlement` describes; False when its commit was already done."""
        ...


class Stores(Protocol):
    """One backend's stores, closed together."""

    @property
    def budgets(self) -> BudgetStore: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def rates(self) -> RateWindows: ...
    @property
    def meter(self) -> Meter: ...

    async def ping(self) -> None:
        """Raise :class:`~.types.StoreUnavailable` unless the store answers (for health checks)."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the stores must not be used afterwards."""
        ...
