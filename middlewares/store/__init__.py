"""State shared by the policies: budget reservations, the spend ledger, rate windows.

Small Protocols (:mod:`.protocols`) with three backends — ``memory`` (:class:`MemoryStores`),
``sqlite`` (:class:`SqliteStores`, the default) and ``redis``
(:class:`~sidegate.middlewares.store.redis.RedisStores`, imported from its module so that the
``redis`` extra stays optional). :func:`open_stores` opens one by name. Money is integer nano-USD.
"""

from .factory import REDIS_DEFAULTS, StoreKind, open_stores
from .ledger import aggregate_entries, bucket_start
from .memory import MemoryStores
from .periods import Period, period_key
from .protocols import BudgetStore, Ledger, Meter, RateWindows, Stores
from .sqlite import SqliteStores
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
