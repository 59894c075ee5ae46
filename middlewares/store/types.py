"""The values the stores take and return, and the one error they raise.

Money is integer nano-USD (10⁻⁹ USD) throughout; times given to and returned by a store are unix
seconds (``time.time()`` scale) unless they are ``datetime`` objects, which are always aware UTC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from sidegate.middlewares.errors import SidegateError
from sidegate.middlewares.values import value_type

__all__ = [
    "COMMIT_RETENTION_S",
    "Admission",
    "BudgetHold",
    "BudgetStatus",
    "Granularity",
    "LedgerEntry",
    "RateDecision",
    "Reservation",
    "Scope",
    "Settlement",
    "StoreUnavailable",
    "UsageBucket",
    "UsageReport",
    "UsageTotals",
    "WindowAdjustment",
    "WindowHit",
    "from_micros",
    "nonnegative",
    "to_micros",
    "window_index",
]

Granularity = Literal["hour", "day", "month"]

COMMIT_RETENTION_S = 7 * 86_400
"""How long a store remembers a committed reservation id, making a retried commit a no-op."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class StoreUnavailable(SidegateError):
    """The store could not be reached or did not answer; nothing is known to have happened.

    Budgeted routes fail closed on it (503) unless the team is ``fail_open``. The message never
    names the store's address (a Redis URL may carry a password); the cause is chained.
    """

    status = 503
    type = "server_error"
    code = "store_unavailable"

    def __init__(self, message: str = "sidegate's state store is unavailable.") -> None:
        super().__init__(message)


def to_micros(moment: datetime) -> int:
    """Exact microseconds since the epoch of an aware ``moment``."""
    if moment.tzinfo is None:
        raise ValueError("a store needs aware datetimes (UTC)")
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime ``micros`` microseconds after the epoch."""
    return _EPOCH + micros * _MICROSECOND


def nonnegative(**amounts: float) -> None:
    """Raise ValueError naming the first negative amount."""
    for name, value in amounts.items():
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")


def window_index(now: float, window_s: int) -> int:
    """The number of the fixed ``window_s``-second window containing unix time ``now``."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    return math.floor(now / window_s)


class _ScopeFields(NamedTuple):
    team: str
    key_id: str | None = None


class Scope(_ScopeFields):
    """Whose budget or rate window: a team, or one API key of it (``key_id``).

    Every key a backend derives from a scope carries the team, so one team's state lives together
    (one Redis Cluster slot). A named tuple, so that hashing and comparing one — every store keys
    its state by scope, several times a request — runs in C.
    """

    __slots__ = ()

    def __new__(cls, team: str, key_id: str | None = None) -> Scope:
        if not team or key_id == "":
            raise ValueError("a scope needs a team and, when given, a non-empty key id")
        return super().__new__(cls, team, key_id)


@value_type
class Reservation:
    """The answer to a reservation: whether it was admitted, and the budget's state after it.

    ``reserved`` counts the live reservations, this one included when admitted.
    """

    admitted: bool
    spent: int
    reserved: int
    limit: int

    @property
    def remaining(self) -> int:
        """What is left to reserve: ``limit - spent - reserved``, never below zero."""
        return max(0, self.limit - self.spent - self.reserved)


@value_type
class BudgetStatus:
    """Committed spend and live (not expired) reservations of one scope and period."""

    spent: int
    reserved: int


@value_type
class RateDecision:
    """The answer to a rate-window hit. ``count`` is the window's total after it (unchanged when
    refused); pass ``window_start`` back to ``adjust``."""

    allowed: bool
    count: int
    limit: int
    window_start: float
    reset_at: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)


@value_type(kw_only=True)
class LedgerEntry:
    """One charged request. ``timestamp`` is aware; ``model`` is the name usage is reported by
    (the public model, or the Meivan service id)."""

    timestamp: datetime
    team: str
    key_id: str | None
    upstream: str
    model: str
    kind: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    cost_nano: int = 0
    request_id: str

    def __post_init__(self) -> None:
        if self.timestamp.tzinfo is None:
            raise ValueError("a store needs aware datetimes (UTC)")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class UsageTotals:
    """Sums over ledger entries."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    images: int = 0
    cost_nano: int = 0

    def add(self, entry: LedgerEntry) -> None:
        self.requests += 1
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        self.total_tokens += entry.total_tokens
        self.images += entry.images
        self.cost_nano += entry.cost_nano


@dataclass(slots=True)
class UsageBucket:
    """The entries of one hour, day or month (UTC) starting at ``start``, also per model."""

    start: datetime
    totals: UsageTotals = field(default_factory=UsageTotals)
    by_model: dict[str, UsageTotals] = field(default_factory=dict)


@dataclass(slots=True)
class UsageReport:
    """Buckets in time order (only those with entries), and the totals over all of them."""

    buckets: list[UsageBucket] = field(default_factory=list)
    total: UsageTotals = field(default_factory=UsageTotals)
    by_model: dict[str, UsageTotals] = field(default_factory=dict)


@value_type
class WindowHit:
    """Add ``amount`` to the current ``window_s`` window of ``(scope, name)`` within ``limit``."""

    scope: Scope
    name: str
    limit: int
    amount: int
    window_s: int = 60

    def __post_init__(self) -> None:
        if self.limit < 0 or self.amount < 0:  # (checked first: these are made every request)
            nonnegative(limit=self.limit, amount=self.amount)


@value_type
class BudgetHold:
    """Reserve ``amount_nano`` of the ``(scope, period)`` budget within ``limit_nano``."""

    scope: Scope
    period: str
    limit_nano: int
    amount_nano: int

    def __post_init__(self) -> None:
        if self.limit_nano < 0 or self.amount_nano < 0:
            nonnegative(limit_nano=self.limit_nano, amount_nano=self.amount_nano)


@value_type
class WindowAdjustment:
    """Add ``delta`` to the window of ``(scope, name)`` that began at ``window_start``."""

    scope: Scope
    name: str
    delta: int
    window_start: float
    window_s: int = 60


@value_type
class Admission:
    """The answer to :meth:`~.protocols.Meter.admit`.

    The hits are decided first, in order, then the holds; deciding stops at the first refusal,
    which is then the last element of ``windows`` (when it is a hit) or of ``reservations``.
    When ``admitted`` every hit was counted and every hold reserved; otherwise nothing was.
    """

    admitted: bool
    windows: tuple[RateDecision, ...]
    reservations: tuple[Reservation, ...]


@value_type(kw_only=True)
class Settlement:
    """What :meth:`~.protocols.Meter.settle` does after a request, in one atomic step.

    ``budgets`` are the ``(scope, period)`` pairs reserved under ``reservation_id`` at
    admission. With ``cost_nano`` given they are committed at that cost (each budget's spend grows
    by it) and ``entries`` go to the ledger once (also when there is no budget: a request's one
    entry, or a batch of them); with ``cost_nano=None`` they are released and no entry may be
    given. ``adjustments`` correct rate windows counted in advance. Every scope and entry of one
    settlement belongs to one team.
    A settlement that commits budgets is idempotent by ``reservation_id``: repeating it changes
    nothing, adjustments and entries included.
    """

    reservation_id: str
    budgets: tuple[tuple[Scope, str], ...] = ()
    cost_nano: int | None = None
    entries: tuple[LedgerEntry, ...] = ()
    adjustments: tuple[WindowAdjustment, ...] = ()

    def __post_init__(self) -> None:
        if self.cost_nano is not None:
            if self.cost_nano < 0:
                nonnegative(cost_nano=self.cost_nano)
        elif self.entries:
            raise ValueError("a settlement that releases its budgets records no ledger entry")
