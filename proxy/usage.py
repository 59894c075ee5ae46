"""Usage and budget reports from sidegate's own ledger: ``GET /v1/usage``, ``GET /admin/budgets``
and ``sidegate usage`` render the same data.

``/v1/usage`` is scoped to the caller's team and shaped like Meridian's (buckets with prompt,
completion and total tokens and ``cost_usd``, plus ``aggregate``), with a per-model breakdown
(``by_model``; for Meivan services the service id) in each bucket and in the aggregate.
``cost_usd`` is a decimal string-free JSON number derived from the integer nano-USD ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, get_args

from sidegate.config.models import SidegateConfig
from sidegate.middlewares.errors import BadRequest
from sidegate.middlewares.pricing import nano_to_usd, usd_to_nano
from sidegate.middlewares.store import (
    Granularity,
    Scope,
    Stores,
    UsageReport,
    UsageTotals,
    period_key,
)

__all__ = ["budget_report", "parse_usage_query", "usage_body"]

_GRANULARITIES = frozenset(get_args(Granularity))


def _instant(query: Mapping[str, str], name: str) -> datetime:
    raw = query.get(name)
    if not raw:
        raise BadRequest(f"'{name}' is required (ISO 8601, e.g. 2025-01-01T00:00:00Z).", param=name)
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"'{name}' is not an ISO 8601 date-time.", param=name) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_usage_query(query: Mapping[str, str]) -> tuple[datetime, datetime, Granularity]:
    """``from``, ``to`` and ``granularity`` (hour, day — the default — or month), validated."""
    since, until = _instant(query, "from"), _instant(query, "to")
    if until < since:
        raise BadRequest("'to' is before 'from'.", param="to")
    granularity = query.get("granularity", "day")
    if granularity not in _GRANULARITIES:
        raise BadRequest("granularity must be hour, day or month.", param="granularity")
    return since, until, granularity  # type: ignore[return-value]


def _totals(totals: UsageTotals) -> dict[str, Any]:
    return {
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "total_tokens": totals.total_tokens,
        "images": totals.images,
        "cost_usd": float(nano_to_usd(totals.cost_nano)),
        "cost_nano_usd": totals.cost_nano,
    }


def usage_body(report: UsageReport) -> dict[str, Any]:
    """The report in Meridian's ``/v1/usage`` shape, with per-model breakdowns."""
    return {
        "object": "list",
        "data": [
            {
                "timestamp": bucket.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                **_totals(bucket.totals),
                "by_model": {m: _totals(t) for m, t in sorted(bucket.by_model.items())},
            }
            for bucket in report.buckets
        ],
        "aggregate": {
            **_totals(report.total),
            "total_cost_usd": float(nano_to_usd(report.total.cost_nano)),
            "by_model": {m: _totals(t) for m, t in sorted(report.by_model.items())},
        },
    }


async def budget_report(
    config: SidegateConfig, stores: Stores, *, now: datetime | None = None, team: str | None = None
) -> list[dict[str, Any]]:
    """Per team (and per key with its own budget): spent, reserved, limit, remaining, reset."""
    now = now or datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for name, settings in sorted(config.teams.items()):
        if team is not None and name != team:
            continue
        scopes = [(Scope(name), settings.budget)] + [
            (Scope(name, key_id), limits.budget) for key_id, limits in sorted(settings.keys.items())
        ]
        for scope, budget in scopes:
            if budget is None:
                continue
            period, resets = period_key(budget.period, now)
            status = await stores.budgets.status(scope, period)
            limit = usd_to_nano(budget.usd)
            rows.append(
                {
                    "team": scope.team,
                    "key_id": scope.key_id,
                    "period": budget.period,
                    "period_key": period,
                    "limit_usd": float(budget.usd),
                    "spent_usd": float(nano_to_usd(status.spent)),
                    "reserved_usd": float(nano_to_usd(status.reserved)),
                    "remaining_usd": float(
                        nano_to_usd(max(0, limit - status.spent - status.reserved))
                    ),
                    "spent_nano_usd": status.spent,
                    "resets_at": resets.strftime("%Y-%m-%dT%H:%M:%SZ") if resets else None,
                }
            )
    return rows
