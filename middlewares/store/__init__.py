"""State shared by the policies: budget reservations, the spend ledger, rate windows.

Small Protocols (:mod:`.protocols`) with three backends — ``memory`` (:class:`MemoryStores`),
``sqlite`` (:class:`SqliteStores`, the default) and ``redis``
(:class:`~sidegate.middlewares.store.redis.RedisStores`, imported from its module so that the
``redis`` extra stays optional). :func:`open_stores` opens one by name. Money is integer nano-USD.
:class:`SqliteStores` is imported when first asked for (here, or by :func:`open_stores`), so that
a process on another store does not load ``sqlite3``.
"""

import typing

from .factory import REDIS_DEFAULTS, StoreKind, open_stores
from .ledger import aggregate_entries, bucket_start
from .memory import MemoryStores
from .periods import Period, period_key
from .protocols import BudgetStore, Ledger, Meter, RateWindows, Stores
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
    StoreUnavailable,
    UsageBucket,
    UsageReport,
    UsageTotals,
    WindowAdjustment,
    WindowHit,
)

if typing.TYPE_CHECKING:
    from .sqlite import SqliteStores

__all__ = [
    "COMMIT_RETENTION_S",
    "REDIS_DEFAULTS",
    "Admission",
    "BudgetHold",
    "BudgetStatus",
    "BudgetStore",
    "Granularity",
    "Ledger",
    "LedgerEntry",
    "MemoryStores",
    "Meter",
    "Period",
    "RateDecision",
    "RateWindows",
    "Reservation",
    "Scope",
    "Settlement",
    "SqliteStores",
    "StoreKind",
    "StoreUnavailable",
    "Stores",
    "UsageBucket",
    "UsageReport",
    "UsageTotals",
    "WindowAdjustment",
    "WindowHit",
    "aggregate_entries",
    "bucket_start",
    "open_stores",
    "period_key",
]


def __getattr__(name: str) -> typing.Any:
    """``SqliteStores``, imported on first use (PEP 562) and bound here from then on."""
    if name == "SqliteStores":
        from .sqlite import SqliteStores

        globals()[name] = SqliteStores
        return SqliteStores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
