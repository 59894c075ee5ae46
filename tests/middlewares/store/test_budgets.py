"""The budget contract, run against every backend: reserve, commit, release, expiry, periods."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from sidegate.middlewares.store import (
    BudgetStatus,
    LedgerEntry,
    Scope,
    Stores,
    period_key,
)
from tests.middlewares.store.conftest import FakeClock

TEAM = Scope("search")
KEY = Scope("search", "search-prod")
OTHER = Scope("ads")
PERIOD = "m2025-06"
TTL = 60.0
EPOCH = datetime(2025, 6, 1, tzinfo=UTC)
FAR = datetime(2100, 1, 1, tzinfo=UTC)


def entry(rid: str, cost: int, *, team: str = "search", model: str = "meridian-1") -> LedgerEntry:
    return LedgerEntry(
        timestamp=datetime(2025, 6, 15, 12, 0, tzinfo=UTC),
        team=team,
        key_id="search-prod",
        upstream="meridian",
        model=model,
        kind="chat",
        prompt_tokens=10,
        completion_tokens=5,
        cost_nano=cost,
        request_id=rid,
    )


async def ledger_sum(stores: Stores, team: str = "search") -> int:
    return sum(e.cost_nano for e in await stores.ledger.query(team, EPOCH, FAR))


async def test_reserve_commit_release(stores: Stores) -> None:
    budgets = stores.budgets

    first = await budgets.reserve(TEAM, PERIOD, 100, 30, "r1", TTL)
    second = await budgets.reserve(TEAM, PERIOD, 100, 20, "r2", TTL)

    assert (first.admitted, first.spent, first.reserved, first.remaining) == (True, 0, 30, 70)
    assert (second.admitted, second.reserved, second.remaining) == (True, 50, 50)
    assert await budgets.status(TEAM, PERIOD) == BudgetStatus(0, 50)

    assert await budgets.commit(TEAM, PERIOD, "r1", 25, entry("req-1", 25)) is True
    assert await budgets.status(TEAM, PERIOD) == BudgetStatus(25, 20)

    assert await budgets.release(TEAM, PERIOD, "r2") is True
    assert await budgets.release(TEAM, PERIOD, "r2") is False
    assert await budgets.status(TEAM, PERIOD) == BudgetStatus(25, 0)
    assert await ledger_sum(stores) == 25


async def test_reservations_count_against_the_limit(stores: Stores) -> None:
    await stores.budgets.reserve(TEAM, PERIOD, 100, 60, "r1", TTL)

    refused = await stores.budgets.reserve(TEAM, PERIOD, 100, 41, "r2", TTL)
    fits = await stores.budgets.reserve(TEAM, PERIOD, 100, 40, "r3", TTL)

    assert (refused.admitted, refused.spent, refused.reserved, refused.remaining) == (
        False,
        0,
        60,
        40,
    )
    assert fits.admitted
    assert fits.remaining == 0


async def test_spend_exactly_at_the_limit_refuses_the_next_request(stores: Stores) -> None:
    budgets = stores.budgets
    assert (await budgets.reserve(TEAM, PERIOD, 100, 100, "r1", TTL)).admitted
    await budgets.commit(TEAM, PERIOD, "r1", 100)

    for rid, amount in (("r2", 1), ("r3", 0)):
        refused = await budgets.reserve(TEAM, PERIOD, 100, amount, rid, TTL)
        assert not refused.admitted
        assert (refused.spent, refused.remaining) == (100, 0)


async def test_a_free_request_still_needs_room(stores: Stores) -> None:
    admitted = await stores.budgets.reserve(TEAM, PERIOD, 1, 0, "r1", TTL)

    assert admitted.reserved == 1
    assert not (await stores.budgets.reserve(TEAM, PERIOD, 1, 0, "r2", TTL)).admitted


async def test_commit_is_idempotent(stores: Stores) -> None:
    await stores.budgets.reserve(TEAM, PERIOD, 100, 10, "r1", TTL)

    results = [await stores.budgets.commit(TEAM, PERIOD, "r1", 7, entry("q", 7)) for _ in range(3)]
    concurrent = await asyncio.gather(
        *(stores.budgets.commit(TEAM, PERIOD, "r1", 7, entry("q", 7)) for _ in range(5))
    )

    assert results == [True, False, False]
    assert not any(concurrent)
    assert await stores.budgets.status(TEAM, PERIOD) == BudgetStatus(7, 0)
    assert await ledger_sum(stores) == 7


async def test_reserving_a_live_id_again_holds_it_once(stores: Stores) -> None:
    await stores.budgets.reserve(TEAM, PERIOD, 100, 30, "r1", TTL)

    again = await stores.budgets.reserve(TEAM, PERIOD, 100, 30, "r1", TTL)

    assert again.admitted
    assert await stores.budgets.status(TEAM, PERIOD) == BudgetStatus(0, 30)


async def test_abandoned_reservations_expire(stores: Stores, clock: FakeClock) -> None:
    budgets = stores.budgets
    assert (await budgets.reserve(TEAM, PERIOD, 100, 100, "crashed", 30)).admitted
    assert not (await budgets.reserve(TEAM, PERIOD, 100, 1, "r2", 30)).admitted

    clock.advance(29.9)
    assert not (await budgets.reserve(TEAM, PERIOD, 100, 1, "r3", 30)).admitted
    clock.advance(0.1)

    assert await budgets.status(TEAM, PERIOD) == BudgetStatus(0, 0)
    assert (await budgets.reserve(TEAM, PERIOD, 100, 100, "r4", 30)).admitted
    assert await budgets.release(TEAM, PERIOD, "crashed") is False


async def test_an_expired_reservation_is_still_charged_on_commit(
    stores: Stores, clock: FakeClock
) -> None:
    await stores.budgets.reserve(TEAM, PERIOD, 100, 50, "slow-stream", 10)
    clock.advance(11)

    assert await stores.budgets.commit(TEAM, PERIOD, "slow-stream", 40, entry("q", 40))
    assert await stores.budgets.status(TEAM, PERIOD) == BudgetStatus(40, 0)


async def test_a_commit_after_rollover_counts_in_its_own_period(
    stores: Stores, clock: FakeClock
) -> None:
    before_midnight = datetime(2025, 6, 30, 23, 59, 59, tzinfo=UTC)
    old, _ = period_key("daily", before_midnight)
    new, _ = period_key("daily", before_midnight + timedelta(seconds=2))
    await stores.budgets.reserve(TEAM, old, 100, 80, "straddles", TTL)
    await stores.budgets.reserve(TEAM, old, 100, 20, "other", TTL)

    await asyncio.gather(
        stores.budgets.commit(TEAM, old, "straddles", 80),
        stores.budgets.reserve(TEAM, new, 100, 100, "fresh", TTL),
        stores.budgets.commit(TEAM, old, "other", 20),
    )
    await stores.budgets.commit(TEAM, new, "fresh", 100)

    assert old != new
    assert await stores.budgets.status(TEAM, old) == BudgetStatus(100, 0)
    assert await stores.budgets.status(TEAM, new) == BudgetStatus(100, 0)


async def test_scopes_and_periods_are_independent(stores: Stores) -> None:
    await stores.budgets.reserve(TEAM, PERIOD, 100, 100, "t", TTL)

    assert (await stores.budgets.reserve(KEY, PERIOD, 100, 100, "k", TTL)).admitted
    assert (await stores.budgets.reserve(OTHER, PERIOD, 100, 100, "o", TTL)).admitted
    assert (await stores.budgets.reserve(TEAM, "m2025-07", 100, 100, "n", TTL)).admitted
    assert await stores.budgets.commit(KEY, PERIOD, "t", 5) is True
    assert await stores.budgets.status(TEAM, PERIOD) == BudgetStatus(0, 100)
    assert await stores.budgets.status(KEY, PERIOD) == BudgetStatus(5, 100)


async def test_negative_amounts_are_refused(stores: Stores) -> None:
    with pytest.raises(ValueError, match="amount_nano"):
        await stores.budgets.reserve(TEAM, PERIOD, 100, -1, "r", TTL)
    with pytest.raises(ValueError, match="actual_nano"):
        await stores.budgets.commit(TEAM, PERIOD, "r", -1)


async def test_twenty_concurrent_reservations_admit_exactly_ten(stores: Stores) -> None:
    results = await asyncio.gather(
        *(stores.budgets.reserve(TEAM, PERIOD, 100, 10, f"r{i}", TTL) for i in range(20))
    )
    admitted = [f"r{i}" for i, result in enumerate(results) if result.admitted]
    costs = {rid: 3 + i % 8 for i, rid in enumerate(admitted)}

    await asyncio.gather(
        *(
            stores.budgets.commit(TEAM, PERIOD, rid, cost, entry(rid, cost))
            for rid, cost in costs.items()
        )
    )

    assert len(admitted) == 10
    assert await stores.budgets.status(TEAM, PERIOD) == BudgetStatus(sum(costs.values()), 0)
    assert await ledger_sum(stores) == sum(costs.values())


async def test_two_clients_of_one_store_admit_exactly_ten(pair: tuple[Stores, Stores]) -> None:
    first, second = pair

    results = await asyncio.gather(
        *(
            (first, second)[i % 2].budgets.reserve(TEAM, PERIOD, 100, 10, f"r{i}", TTL)
            for i in range(20)
        )
    )
    admitted = [f"r{i}" for i, result in enumerate(results) if result.admitted]
    await asyncio.gather(
        *(
            (first, second)[i % 2].budgets.commit(TEAM, PERIOD, rid, 10, entry(rid, 10))
            for i, rid in enumerate(admitted)
        )
    )

    assert len(admitted) == 10
    assert await first.budgets.status(TEAM, PERIOD) == BudgetStatus(100, 0)
    assert await ledger_sum(second) == 100
