"""The ledger contract, run against every backend: team-scoped queries and aggregation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sidegate.middlewares.store import Scope, Stores, UsageTotals
from tests.middlewares.store.conftest import JAN, ledger_entry


async def test_query_is_team_scoped_inclusive_and_ordered(stores: Stores) -> None:
    late = ledger_entry(JAN + timedelta(hours=2), cost=3)
    early = ledger_entry(JAN + timedelta(hours=1, microseconds=7), cost=2)
    await stores.ledger.record(late)
    await stores.ledger.record(early)
    await stores.ledger.record(ledger_entry(JAN + timedelta(hours=1), team="ads", cost=1000))
    await stores.ledger.record(ledger_entry(JAN + timedelta(hours=3), cost=4))

    found = await stores.ledger.query("search", early.timestamp, late.timestamp)

    assert found == [early, late]
    assert await stores.ledger.query("nobody", JAN, JAN + timedelta(days=1)) == []
    assert [e.cost_nano for e in await stores.ledger.query("ads", JAN, late.timestamp)] == [1000]


async def test_equal_entries_are_kept_apart(stores: Stores) -> None:
    same = ledger_entry(JAN)
    await stores.ledger.record(same)
    await stores.ledger.record(same)
    await stores.budgets.reserve(Scope("search"), "total", 10**9, 100, "a", 60)
    await stores.budgets.commit(Scope("search"), "total", "a", 100, same)

    assert await stores.ledger.query("search", JAN, JAN) == [same, same, same]


async def test_aggregate_buckets_and_models(stores: Stores) -> None:
    day = timedelta(days=1)
    for at, model, cost in [
        (JAN + timedelta(hours=1), "meridian-1", 100),
        (JAN + timedelta(hours=1, minutes=59), "meridian-embed-3", 7),
        (JAN + timedelta(hours=5), "meridian-1", 50),
        (JAN + day + timedelta(hours=1), "meridian-1", 1),
        (JAN + 40 * day, "llm.general.v1", 9),
    ]:
        await stores.ledger.record(ledger_entry(at, model=model, cost=cost))
    await stores.ledger.record(ledger_entry(JAN + timedelta(hours=1), team="ads", cost=10**6))
    await stores.ledger.record(
        ledger_entry(JAN + timedelta(minutes=30), images=2, prompt=0, completion=0)
    )

    hours = await stores.ledger.aggregate("search", JAN, JAN + 60 * day, "hour")
    days = await stores.ledger.aggregate("search", JAN, JAN + 60 * day, "day")
    months = await stores.ledger.aggregate("search", JAN, JAN + 60 * day, "month")

    assert [b.start for b in hours.buckets] == [
        JAN,
        JAN + timedelta(hours=1),
        JAN + timedelta(hours=5),
        JAN + day + timedelta(hours=1),
        JAN + 40 * day,
    ]
    second = hours.buckets[1]
    assert second.totals == UsageTotals(2, 20, 10, 30, 0, 107)
    assert set(second.by_model) == {"meridian-1", "meridian-embed-3"}
    assert second.by_model["meridian-embed-3"].cost_nano == 7
    assert [b.start for b in days.buckets] == [JAN, JAN + day, JAN + 40 * day]
    assert days.buckets[0].totals.cost_nano == 257
    assert [b.start for b in months.buckets] == [JAN, datetime(2025, 2, 1, tzinfo=UTC)]
    assert months.total == hours.total == days.total
    assert months.total.cost_nano == 100 + 7 + 50 + 1 + 9 + 100
    assert months.total.images == 2
    assert months.by_model["meridian-1"].requests == 4
    assert months.by_model["llm.general.v1"].cost_nano == 9


async def test_aggregate_of_nothing_is_empty(stores: Stores) -> None:
    report = await stores.ledger.aggregate("search", JAN, JAN + timedelta(days=1), "day")

    assert report.buckets == []
    assert report.total == UsageTotals()
