"""Leases: admission from slices of a shared store, settlement in batches, nothing overspent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from sidegate.middlewares.store import (
    Admission,
    BudgetHold,
    BudgetStatus,
    LedgerEntry,
    Meter,
    Scope,
    Settlement,
    Stores,
    StoreUnavailable,
    WindowAdjustment,
    WindowHit,
)
from sidegate.middlewares.store.leases import LEASE_REQUESTS, LeasedMeter, LeasedStores
from tests.middlewares.store.conftest import FakeClock

TEAM = Scope("search")
KEY = Scope("search", "search-prod")
MONTH = "m2025-06"
TTL = 60.0
BATCH = 5.0
EPOCH = datetime(2025, 6, 1, tzinfo=UTC)
FAR = datetime(2100, 1, 1, tzinfo=UTC)


def hold(limit: int, amount: int, scope: Scope = TEAM) -> BudgetHold:
    return BudgetHold(scope, MONTH, limit, amount)


def entry(rid: str, cost: int, team: str = "search") -> LedgerEntry:
    return LedgerEntry(
        timestamp=datetime(2025, 6, 15, 12, 0, tzinfo=UTC),
        team=team,
        key_id=None,
        upstream="meridian",
        model="meridian-1",
        kind="chat",
        prompt_tokens=10,
        completion_tokens=5,
        cost_nano=cost,
        request_id=rid,
    )


def commit(rid: str, cost: int, *scopes: Scope) -> Settlement:
    return Settlement(
        reservation_id=rid,
        budgets=tuple((scope, MONTH) for scope in scopes or (TEAM,)),
        cost_nano=cost,
        entries=(entry(rid, cost),),
    )


async def ledger(stores: Stores, team: str = "search") -> list[LedgerEntry]:
    return await stores.ledger.query(team, EPOCH, FAR)


class Counting:
    """A meter that counts the admissions it passes to ``inner``."""

    def __init__(self, inner: Meter) -> None:
        self.inner = inner
        self.admissions = 0

    async def admit(self, *args: Any) -> Admission:
        self.admissions += 1
        return await self.inner.admit(*args)

    async def settle(self, settlement: Settlement) -> bool:
        return await self.inner.settle(settlement)


@pytest.fixture
async def leased(stores: Stores, clock: FakeClock) -> AsyncIterator[LeasedMeter]:
    """A leased meter on every backend (the memory one stands for a store of its own)."""
    meter = LeasedMeter(stores.meter, batch_s=BATCH, clock=clock)
    yield meter
    await meter.close()


async def test_settlements_reach_the_store_in_one_batch(
    leased: LeasedMeter, stores: Stores, clock: FakeClock
) -> None:
    admitted = [await leased.admit((), (hold(10_000, 10),), f"r{i}", TTL) for i in range(5)]
    settled = [await leased.settle(commit(f"r{i}", 3 + i)) for i in range(5)]

    assert all(a.admitted for a in admitted)
    assert settled == [True] * 5
    assert await ledger(stores) == []  # not written yet
    assert (await stores.budgets.status(TEAM, MONTH)).spent == 0

    clock.advance(BATCH)
    await leased.flush()

    assert sorted(e.request_id for e in await ledger(stores)) == [f"r{i}" for i in range(5)]
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(3 + 4 + 5 + 6 + 7, 0)


async def test_one_lease_serves_many_requests(stores: Stores, clock: FakeClock) -> None:
    counting = Counting(stores.meter)

    meter = LeasedMeter(counting, batch_s=BATCH, clock=clock)
    for i in range(LEASE_REQUESTS):
        assert (await meter.admit((), (hold(10**9, 10),), f"r{i}", TTL)).admitted

    assert counting.admissions == 1
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 10 * LEASE_REQUESTS)
    await meter.close()


async def test_a_released_request_gives_its_share_back_to_the_lease(
    stores: Stores, clock: FakeClock
) -> None:
    counting = Counting(stores.meter)

    meter = LeasedMeter(counting, batch_s=BATCH, clock=clock)
    hit = WindowHit(TEAM, "requests", 10**9, 1)
    first = await meter.admit((hit,), (hold(10**9, 10),), "r0", TTL)
    start = first.windows[0].window_start
    undo = WindowAdjustment(TEAM, "requests", -1, start)
    await meter.settle(
        Settlement(reservation_id="r0", budgets=((TEAM, MONTH),), adjustments=(undo,))
    )
    for i in range(1, LEASE_REQUESTS + 1):
        assert (await meter.admit((hit,), (hold(10**9, 10),), f"r{i}", TTL)).admitted

    assert counting.admissions == 2  # one lease of the window, one of the budget
    await meter.close()


async def test_two_processes_never_admit_more_than_the_budget(
    pair: tuple[Stores, Stores], clock: FakeClock
) -> None:
    first, second = (LeasedMeter(s.meter, batch_s=BATCH, clock=clock) for s in pair)

    async def one(meter: LeasedMeter, rid: str) -> bool:
        admission = await meter.admit((), (hold(1_000, 10),), rid, TTL)
        if admission.admitted:
            await meter.settle(commit(rid, 10))
        return admission.admitted

    results = await asyncio.gather(*(one(first if i % 2 else second, f"r{i}") for i in range(300)))
    clock.advance(BATCH)
    await first.close()
    await second.close()

    admitted = sum(results)
    assert 90 <= admitted <= 100  # a lease another process holds may refuse the last few
    assert await pair[0].budgets.status(TEAM, MONTH) == BudgetStatus(10 * admitted, 0)
    assert len(await ledger(pair[0])) == admitted


async def test_a_request_the_store_cannot_reserve_is_refused_as_the_store_says(
    leased: LeasedMeter, stores: Stores
) -> None:
    await stores.budgets.reserve(TEAM, MONTH, 100, 95, "elsewhere", TTL)

    small = await leased.admit((), (hold(100, 5),), "r1", TTL)
    big = await leased.admit((), (hold(100, 10, KEY), hold(100, 6)), "r2", TTL)

    assert small.admitted
    assert not big.admitted
    assert [r.admitted for r in big.reservations] == [True, False]
    assert big.reservations[-1].remaining == 0
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 100)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(0, 25)  # a lease: 100 // 4


async def test_near_the_limit_a_lease_is_only_what_is_left(
    leased: LeasedMeter, stores: Stores
) -> None:
    await stores.budgets.reserve(TEAM, MONTH, 1_000, 900, "elsewhere", TTL)

    assert (await leased.admit((), (hold(1_000, 30),), "r1", TTL)).admitted
    assert (await stores.budgets.status(TEAM, MONTH)).reserved == 900 + 30  # 250 was refused
    assert (await leased.admit((), (hold(1_000, 30),), "r2", TTL)).admitted  # 70 left: 30
    assert (await stores.budgets.status(TEAM, MONTH)).reserved == 900 + 60
    assert not (await leased.admit((), (hold(1_000, 50),), "r3", TTL)).admitted


async def test_rate_windows_are_leased_within_the_limit(
    pair: tuple[Stores, Stores], clock: FakeClock
) -> None:
    first, second = (LeasedMeter(s.meter, batch_s=BATCH, clock=clock) for s in pair)
    hit = WindowHit(TEAM, "requests", 64, 1)

    results = await asyncio.gather(
        *((first if i % 2 else second).admit((hit,), (), f"r{i}", TTL) for i in range(100))
    )
    admitted = [r for r in results if r.admitted]
    refused = [r for r in results if not r.admitted]
    clock.advance(60)
    later = await first.admit((hit,), (), "again", TTL)

    assert 56 <= len(admitted) <= 64  # four slots a lease at a time (64 // 16)
    assert all(not r.windows[-1].allowed for r in refused)
    assert all(r.windows[-1].reset_at > clock.now - 60 for r in refused)
    assert later.admitted
    assert later.windows[0].window_start == refused[0].windows[0].reset_at
    await first.close()
    await second.close()


async def test_tokens_used_beyond_the_lease_reach_the_store(
    leased: LeasedMeter, stores: Stores, clock: FakeClock
) -> None:
    hit = WindowHit(TEAM, "tokens", 1_000_000, 100)
    admission = await leased.admit((hit,), (), "r1", TTL)
    start = admission.windows[0].window_start
    counted = (await stores.rates.hit(TEAM, "tokens", 10**9, 0)).count

    await leased.settle(
        Settlement(
            reservation_id="r1",
            cost_nano=1,
            entries=(entry("r1", 1),),
            adjustments=(WindowAdjustment(TEAM, "tokens", 100 * LEASE_REQUESTS, start),),
        )
    )
    await leased.flush()

    assert counted == 100 * LEASE_REQUESTS
    after = (await stores.rates.hit(TEAM, "tokens", 10**9, 0)).count
    assert after == 100 + 100 * LEASE_REQUESTS  # what was used: more than the lease
    assert [e.request_id for e in await ledger(stores)] == ["r1"]


async def test_a_repeated_settlement_changes_nothing(
    leased: LeasedMeter, stores: Stores, clock: FakeClock
) -> None:
    await leased.admit((), (hold(10_000, 10),), "r1", TTL)

    first = await leased.settle(commit("r1", 7))
    again = await leased.settle(commit("r1", 7))
    clock.advance(BATCH)
    await leased.flush()

    assert (first, again) == (True, False)
    assert len(await ledger(stores)) == 1
    assert (await stores.budgets.status(TEAM, MONTH)).spent == 7


async def test_admitting_a_live_id_again_holds_nothing_more(
    leased: LeasedMeter, stores: Stores, clock: FakeClock
) -> None:
    first = await leased.admit((), (hold(10_000, 10),), "r1", TTL)
    again = await leased.admit((), (hold(10_000, 10),), "r1", TTL)
    await leased.settle(commit("r1", 7))
    clock.advance(BATCH)
    await leased.flush()

    assert first == again
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(7, 0)


async def test_a_reservation_it_did_not_admit_is_settled_in_the_store(
    leased: LeasedMeter, stores: Stores
) -> None:
    await stores.meter.admit((), (hold(100, 40),), "before-restart", TTL)

    settled = await leased.settle(commit("before-restart", 25))

    assert settled is True
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(25, 0)


async def test_a_lease_is_written_once_its_requests_have_ended(
    leased: LeasedMeter, stores: Stores, clock: FakeClock
) -> None:
    await leased.admit((), (hold(10_000, 10),), "long", TTL)
    await leased.admit((), (hold(10_000, 10),), "short", TTL)
    await leased.settle(commit("short", 4))
    clock.advance(BATCH)

    await leased.flush()
    waiting = await ledger(stores)
    await leased.settle(commit("long", 6))
    await leased.flush()

    assert waiting == []
    assert sorted(e.request_id for e in await ledger(stores)) == ["long", "short"]
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(10, 0)


async def test_a_request_past_its_time_to_live_stops_holding(
    leased: LeasedMeter, stores: Stores, clock: FakeClock
) -> None:
    await leased.admit((), (hold(10_000, 10),), "stuck", TTL)
    await leased.admit((), (hold(10_000, 10),), "done", TTL)
    await leased.settle(commit("done", 4))
    clock.advance(TTL)

    await leased.flush()

    assert [e.request_id for e in await ledger(stores)] == ["done"]
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(4, 0)


async def test_entries_without_a_budget_are_written_in_batches(
    leased: LeasedMeter, stores: Stores
) -> None:
    for i in range(3):
        await leased.settle(
            Settlement(reservation_id=f"r{i}", cost_nano=2, entries=(entry(f"r{i}", 2),))
        )
    await leased.settle(
        Settlement(reservation_id="ads", cost_nano=1, entries=(entry("ads", 1, "ads"),))
    )
    before = await ledger(stores)

    await leased.flush()

    assert before == []
    assert sorted(e.request_id for e in await ledger(stores)) == ["r0", "r1", "r2"]
    assert [e.request_id for e in await ledger(stores, "ads")] == ["ads"]


async def test_what_the_store_does_not_take_is_written_later(
    stores: Stores, clock: FakeClock
) -> None:
    down = True

    class Flaky:
        async def admit(self, *args: object) -> Admission:
            return await stores.meter.admit(*args)  # type: ignore[arg-type]

        async def settle(self, settlement: Settlement) -> bool:
            if down:
                raise StoreUnavailable()
            return await stores.meter.settle(settlement)

    meter = LeasedMeter(Flaky(), batch_s=BATCH, clock=clock)
    await meter.admit((), (hold(10_000, 10),), "r1", TTL)
    await meter.settle(commit("r1", 7))
    await meter.settle(Settlement(reservation_id="r2", cost_nano=1, entries=(entry("r2", 1),)))
    clock.advance(BATCH)
    await meter.flush()
    kept = await ledger(stores)

    down = False
    await meter.flush()

    assert kept == []
    assert sorted(e.request_id for e in await ledger(stores)) == ["r1", "r2"]
    assert (await stores.budgets.status(TEAM, MONTH)).spent == 7
    await meter.close()


async def test_closing_writes_everything(stores: Stores, clock: FakeClock) -> None:
    leased = LeasedStores(stores, batch_s=BATCH, clock=clock)
    await leased.meter.admit((), (hold(10_000, 10),), "r1", TTL)
    await leased.meter.admit((), (hold(10_000, 10),), "in-flight", TTL)
    await leased.meter.settle(commit("r1", 7))

    await leased.meter.close()

    assert [e.request_id for e in await ledger(stores)] == ["r1"]
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(7, 0)


async def test_a_process_that_dies_leaves_its_lease_until_it_expires(
    pair: tuple[Stores, Stores], clock: FakeClock
) -> None:
    dead = LeasedMeter(pair[0].meter, batch_s=BATCH, clock=clock)
    assert (await dead.admit((), (hold(100, 10),), "r1", TTL)).admitted
    await dead.settle(commit("r1", 10))  # never written: the process dies
    alive = LeasedMeter(pair[1].meter, batch_s=BATCH, clock=clock)

    blocked = await alive.admit((), (hold(100, 80),), "r2", TTL)
    clock.advance(TTL + BATCH + 1)
    freed = await alive.admit((), (hold(100, 80),), "r3", TTL)

    assert not blocked.admitted  # the dead process's lease (32 × 10 capped at 25) still holds
    assert freed.admitted
    assert await ledger(pair[1]) == []  # its spend is lost, as documented
    await alive.close()
