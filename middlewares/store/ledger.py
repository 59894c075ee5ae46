"""What every backend's ledger shares: entry encoding and aggregation into time buckets."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from .types import (
    Granularity,
    LedgerEntry,
    UsageBucket,
    UsageReport,
    UsageTotals,
    from_micros,
    to_micros,
)

__all__ = ["aggregate_entries", "bucket_start", "decode_entry", "encode_entry"]


def bucket_start(moment: datetime, granularity: Granularity) -> datetime:
    """The start of the UTC hour, day or month containing ``moment``."""
    start = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if granularity == "hour":
        return start
    start = start.replace(hour=0)
    if granularity == "day":
        return start
    if granularity == "month":
        return start.replace(day=1)
    raise ValueError(f"unknown granularity {granularity!r}")


def aggregate_entries(entries: Iterable[LedgerEntry], granularity: Granularity) -> UsageReport:
    """Sum ``entries`` per bucket and per model; buckets in time order, empty ones left out."""
    buckets: dict[datetime, UsageBucket] = {}
    report = UsageReport()
    for entry in entries:
        start = bucket_start(entry.timestamp, granularity)
        bucket = buckets.get(start)
        if bucket is None:
            bucket = buckets[start] = UsageBucket(start)
        for totals, by_model in ((bucket.totals, bucket.by_model), (report.total, report.by_model)):
            totals.add(entry)
            if entry.model not in by_model:
                by_model[entry.model] = UsageTotals()
            by_model[entry.model].add(entry)
    report.buckets = [buckets[start] for start in sorted(buckets)]
    return report


def encode_entry(entry: LedgerEntry, entry_id: str) -> bytes:
    """``entry`` as JSON, with a unique ``id`` so equal entries stay distinct in a set."""
    return orjson.dumps(
        {
            "id": entry_id,
            "at": to_micros(entry.timestamp),
            "team": entry.team,
            "key_id": entry.key_id,
            "upstream": entry.upstream,
            "model": entry.model,
            "kind": entry.kind,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "images": entry.images,
            "cost_nano": entry.cost_nano,
            "request_id": entry.request_id,
        }
    )


def decode_entry(raw: bytes | str) -> LedgerEntry:
    """The entry :func:`encode_entry` wrote."""
    data: dict[str, Any] = orjson.loads(raw)
    data.pop("id")
    return LedgerEntry(timestamp=from_micros(data.pop("at")), **data)
