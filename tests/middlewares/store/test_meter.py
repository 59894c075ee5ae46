"""The meter contract, run against every backend: all-or-nothing admission, atomic settlement."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from sidegate.middlewares.store import (
    Admission,
    BudgetHold,
    BudgetStatus,
    LedgerEntry,
    RateDecision,
    Reservation,
    Scope,
    Settlement,
    Stores,
    WindowAdjustment,
    WindowHit,
)
from sidegate.middlewares.store.redis import RedisStores
from tests.middlewares.store.conftest import FakeClock, fresh_redis

TEAM = Scope("search")
KEY = Scope("search", "search-prod")
OTHER = Scope("ads")
MONTH = "m2025-06"
DAY = "d2025-06-15"
TTL = 60.0
NOW = 6_000_030.0
START = 6_000_000.0  # the 60 s window containing NOW
EPOCH = datetime(2025, 6, 1, tzinfo=UTC)
FAR = datetime(2100, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _halfway_through_a_window(clock: FakeClock) -> None:
    clock.now = NOW


def hit(name: str, limit: int, amount: int = 1, scope: Scope = TEAM) -> WindowHit:
    return WindowHit(scope, name, limit, amount)


def hold(limit: int, amount: int, scope: Scope = TEAM, period: str = MONTH) -> BudgetHold:
    return BudgetHold(scope, period, limit, amount)


def adjust(name: str, delta: int, scope: Scope = TEAM, start: float = START) -> WindowAdjustment:
    return WindowAdjustment(scope, name, delta, start)


def window(allowed: bool, count: int, limit: int, start: float = START) -> RateDecision:
    return RateDecision(allowed, count, limit, start, start + 60)


def entry(rid: str, cost: int, *, team: str = "search") -> LedgerEntry:
    return LedgerEntry(
        timestamp=datetime(2025, 6, 15, 12, 0, tzinfo=UTC),
        team=team,
        key_id="search-prod",
        upstream="meridian",
        model="meridian-1",
        kind="chat",
        prompt_tokens=10,
        completion_tokens=5,
        cost_nano=cost,
        request_id=rid,
    )


async def count(stores: Stores, name: str, scope: Scope = TEAM) -> int:
    """The current window's count, read with a hit that adds nothing."""
    return (await stores.rates.hit(scope, name, 10**12, 0)).count


async def entries(stores: Stores, team: str = "search") -> list[LedgerEntry]:
    return await stores.ledger.query(team, EPOCH, FAR)


async def test_admit_counts_every_hit_and_reserves_every_hold(stores: Stores) -> None:
    await stores.rates.hit(TEAM, "requests", 10, 4)
    await stores.budgets.reserve(TEAM, MONTH, 100, 20, "earlier", TTL)
    await stores.budgets.commit(TEAM, MONTH, "earlier", 10)
    await stores.budgets.reserve(TEAM, MONTH, 100, 15, "running", TTL)

    admission = await stores.meter.admit(
        (hit("requests", 10), hit("tokens", 1000, 300, KEY)),
        (hold(100, 30), hold(40, 30, period=DAY), hold(50, 0, KEY)),
        "r1",
        TTL,
    )

    assert admission == Admission(
        True,
        (window(True, 5, 10), window(True, 300, 1000)),
        (Reservation(True, 10, 45, 100), Reservation(True, 0, 30, 40), Reservation(True, 0, 1, 50)),
    )
    assert (await count(stores, "requests"), await count(stores, "tokens", KEY)) == (5, 300)
    assert await count(stores, "tokens") == 0
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(10, 45)
    assert await stores.budgets.status(TEAM, DAY) == BudgetStatus(0, 30)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(0, 1)
    assert await stores.budgets.release(TEAM, MONTH, "r1") is True  # held under the given id
    assert await stores.budgets.release(KEY, MONTH, "r1") is True


async def test_a_refused_first_hit_changes_nothing(stores: Stores) -> None:
    await stores.rates.hit(TEAM, "requests", 2, 2)

    admission = await stores.meter.admit(
        (hit("requests", 2), hit("tokens", 1000, 10)), (hold(100, 10),), "r1", TTL
    )

    assert admission == Admission(False, (window(False, 2, 2),), ())
    assert (await count(stores, "requests"), await count(stores, "tokens")) == (2, 0)
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 0)


async def test_a_refused_later_hit_changes_nothing(stores: Stores) -> None:
    await stores.rates.hit(KEY, "tokens", 100, 90)

    admission = await stores.meter.admit(
        (hit("requests", 10), hit("tokens", 100, 20, KEY), hit("images", 5)),
        (hold(100, 10),),
        "r1",
        TTL,
    )

    assert admission == Admission(False, (window(True, 1, 10), window(False, 90, 100)), ())
    assert await count(stores, "requests") == 0
    assert await count(stores, "tokens", KEY) == 90
    assert await count(stores, "images") == 0
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 0)


async def test_a_refused_hold_counts_no_window_and_reserves_nothing(stores: Stores) -> None:
    await stores.budgets.reserve(KEY, MONTH, 50, 45, "other", TTL)

    admission = await stores.meter.admit(
        (hit("requests", 10), hit("tokens", 1000, 300)),
        (hold(100, 30), hold(50, 10, KEY), hold(40, 30, period=DAY)),
        "r1",
        TTL,
    )

    assert admission == Admission(
        False,
        (window(True, 1, 10), window(True, 300, 1000)),
        (Reservation(True, 0, 30, 100), Reservation(False, 0, 45, 50)),
    )
    assert (await count(stores, "requests"), await count(stores, "tokens")) == (0, 0)
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 0)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(0, 45)
    assert await stores.budgets.status(TEAM, DAY) == BudgetStatus(0, 0)
    assert await stores.budgets.release(TEAM, MONTH, "r1") is False


async def test_repeated_windows_and_budgets_decide_as_if_one_after_another(stores: Stores) -> None:
    twice = await stores.meter.admit(
        (hit("requests", 3, 2), hit("requests", 3, 2)), (hold(100, 30),), "r1", TTL
    )
    fits = await stores.meter.admit(
        (hit("requests", 4, 2), hit("requests", 4, 2)), (hold(100, 30), hold(100, 30)), "r2", TTL
    )

    assert twice == Admission(False, (window(True, 2, 3), window(False, 2, 3)), ())
    assert fits == Admission(
        True,
        (window(True, 2, 4), window(True, 4, 4)),
        (Reservation(True, 0, 30, 100), Reservation(True, 0, 30, 100)),
    )
    assert await count(stores, "requests") == 4
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 30)


async def test_admitting_a_live_reservation_id_again_holds_it_once(stores: Stores) -> None:
    holds = (hold(100, 60), hold(50, 50, KEY))
    first = await stores.meter.admit((), holds, "r1", TTL)

    again = await stores.meter.admit((), holds, "r1", TTL)
    other = await stores.meter.admit((), (hold(100, 41),), "r2", TTL)

    assert first.admitted
    assert again == Admission(
        True, (), (Reservation(True, 0, 60, 100), Reservation(True, 0, 50, 50))
    )
    assert other == Admission(False, (), (Reservation(False, 0, 60, 100),))
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 60)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(0, 50)


async def test_admitting_a_live_id_again_keeps_its_amount_and_expiry(
    stores: Stores, clock: FakeClock
) -> None:
    assert (await stores.meter.admit((), (hold(100, 30),), "r1", 30)).admitted
    clock.advance(20)
    again = await stores.meter.admit((), (hold(100, 60),), "r1", 30)
    assert again == Admission(True, (), (Reservation(True, 0, 30, 100),))
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 30)
    clock.advance(10)  # 30 s after the first admission: it expires, not extended by the second
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 0)


async def test_expired_reservations_do_not_count(stores: Stores, clock: FakeClock) -> None:
    meter = stores.meter
    assert (await meter.admit((), (hold(100, 100),), "crashed", 30)).admitted
    assert not (await meter.admit((), (hold(100, 1),), "r2", 30)).admitted

    clock.advance(29.5)
    assert not (await meter.admit((), (hold(100, 1),), "r3", 30)).admitted
    clock.advance(0.5)
    fresh = await meter.admit((), (hold(100, 100),), "r4", 30)
    crashed_again = await meter.admit((), (hold(200, 100),), "crashed", 30)

    assert fresh.reservations == (Reservation(True, 0, 100, 100),)
    assert crashed_again.reservations == (Reservation(True, 0, 200, 200),)  # held afresh
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 200)


async def test_windows_roll_over_with_the_clock(stores: Stores, clock: FakeClock) -> None:
    first = await stores.meter.admit((hit("requests", 2, 2),), (), "r1", TTL)
    refused = await stores.meter.admit((hit("requests", 2),), (), "r2", TTL)
    clock.advance(30)
    fresh = await stores.meter.admit((hit("requests", 2, 2),), (), "r3", TTL)

    assert first == Admission(True, (window(True, 2, 2),), ())
    assert refused == Admission(False, (window(False, 2, 2),), ())
    assert fresh == Admission(True, (window(True, 2, 2, START + 60),), ())


async def test_settle_commits_every_budget_and_records_one_entry(stores: Stores) -> None:
    admission = await stores.meter.admit(
        (hit("requests", 10), hit("tokens", 1000, 300, KEY), hit("images", 10, 2)),
        (hold(100, 30), hold(40, 30, period=DAY), hold(50, 20, KEY)),
        "r1",
        TTL,
    )
    await stores.budgets.reserve(TEAM, MONTH, 100, 10, "other", TTL)
    charged = entry("req-1", 25)

    settled = await stores.meter.settle(
        Settlement(
            reservation_id="r1",
            budgets=((TEAM, MONTH), (TEAM, DAY), (KEY, MONTH)),
            cost_nano=25,
            entries=(charged,),
            adjustments=(
                adjust("tokens", -200, KEY),
                adjust("requests", 2),
                adjust("images", -5000),
            ),
        )
    )

    assert admission.admitted
    assert settled is True
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(25, 10)
    assert await stores.budgets.status(TEAM, DAY) == BudgetStatus(25, 0)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(25, 0)
    assert await entries(stores) == [charged]
    assert await count(stores, "tokens", KEY) == 100
    assert await count(stores, "requests") == 3
    assert await count(stores, "images") == 0


async def test_a_repeated_settlement_changes_nothing(stores: Stores) -> None:
    await stores.meter.admit((hit("requests", 10),), (hold(100, 30), hold(50, 20, KEY)), "r1", TTL)
    settlement = Settlement(
        reservation_id="r1",
        budgets=((TEAM, MONTH), (KEY, MONTH)),
        cost_nano=25,
        entries=(entry("req-1", 25),),
        adjustments=(adjust("requests", 4),),
    )

    first = await stores.meter.settle(settlement)
    again = [await stores.meter.settle(settlement) for _ in range(2)]
    concurrent = await asyncio.gather(*(stores.meter.settle(settlement) for _ in range(5)))

    assert first is True
    assert again == [False, False]
    assert not any(concurrent)
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(25, 0)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(25, 0)
    assert len(await entries(stores)) == 1
    assert await count(stores, "requests") == 5


async def test_settle_release_frees_the_holds_without_charging(stores: Stores) -> None:
    await stores.meter.admit(
        (hit("tokens", 1000, 300),), (hold(100, 30), hold(50, 20, KEY)), "r1", TTL
    )
    await stores.budgets.reserve(TEAM, MONTH, 100, 10, "other", TTL)

    released = await stores.meter.settle(
        Settlement(
            reservation_id="r1",
            budgets=((TEAM, MONTH), (KEY, MONTH)),
            adjustments=(adjust("tokens", -120),),
        )
    )

    assert released is True
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 10)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(0, 0)
    assert await entries(stores) == []
    assert await count(stores, "tokens") == 180
    assert (await stores.meter.admit((), (hold(100, 90),), "r2", TTL)).admitted


async def test_settle_without_budgets_records_the_entry(stores: Stores) -> None:
    await stores.meter.admit((hit("tokens", 1000, 100),), (), "r1", TTL)
    charged = entry("req-1", 7)

    settled = await stores.meter.settle(
        Settlement(
            reservation_id="r1",
            cost_nano=7,
            entries=(charged,),
            adjustments=(adjust("tokens", 50),),
        )
    )

    assert settled is True
    assert await entries(stores) == [charged]
    assert await count(stores, "tokens") == 150


async def test_a_settlement_records_a_batch_of_entries_once(stores: Stores) -> None:
    await stores.meter.admit((), (hold(100, 30),), "lease", TTL)
    batch = (entry("req-1", 5), entry("req-2", 7), entry("req-3", 0))
    settlement = Settlement(
        reservation_id="lease", budgets=((TEAM, MONTH),), cost_nano=12, entries=batch
    )

    first = await stores.meter.settle(settlement)
    again = await stores.meter.settle(settlement)
    loose = await stores.meter.settle(
        Settlement(reservation_id="batch", cost_nano=0, entries=(entry("req-4", 1),) * 2)
    )

    assert (first, again, loose) == (True, False, True)
    recorded = sorted(await entries(stores), key=lambda e: (e.request_id, e.cost_nano))
    assert recorded == [*batch, entry("req-4", 1), entry("req-4", 1)]
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(12, 0)


async def test_adjusting_a_window_that_is_over_or_never_counted_changes_nothing(
    stores: Stores,
) -> None:
    old = await stores.rates.hit(TEAM, "tokens", 100, 50, now=START - 30)
    await stores.meter.admit((hit("tokens", 100, 100),), (), "r1", TTL)

    await stores.meter.settle(
        Settlement(
            reservation_id="r1",
            adjustments=(adjust("tokens", -50, start=old.window_start), adjust("requests", 5)),
        )
    )

    assert old.window_start == START - 60
    assert await count(stores, "tokens") == 100
    assert await count(stores, "requests") == 0


def test_a_release_records_no_entry() -> None:
    with pytest.raises(ValueError, match="no ledger entry"):
        Settlement(reservation_id="r1", budgets=((TEAM, MONTH),), entries=(entry("req-1", 0),))


async def test_fifty_concurrent_admissions_admit_exactly_ten(stores: Stores) -> None:
    results = await asyncio.gather(
        *(
            stores.meter.admit(
                (hit("requests", 1000),), (hold(10_000, 10), hold(100, 10, KEY)), f"r{i}", TTL
            )
            for i in range(50)
        )
    )
    refused = [result for result in results if not result.admitted]

    assert len(refused) == 40
    assert all(r.reservations[-1] == Reservation(False, 0, 100, 100) for r in refused)
    assert await count(stores, "requests") == 10
    assert await stores.budgets.status(TEAM, MONTH) == BudgetStatus(0, 100)
    assert await stores.budgets.status(KEY, MONTH) == BudgetStatus(0, 100)


async def test_two_clients_of_one_store_admit_and_settle_exactly_ten(
    pair: tuple[Stores, Stores],
) -> None:
    results = await asyncio.gather(
        *(
            pair[i % 2].meter.admit((hit("requests", 1000),), (hold(100, 10),), f"r{i}", TTL)
            for i in range(30)
        )
    )
    admitted = [f"r{i}" for i, result in enumerate(results) if result.admitted]
    settled = await asyncio.gather(
        *(
            pair[i % 2].meter.settle(
                Settlement(
                    reservation_id=rid,
                    budgets=((TEAM, MONTH),),
                    cost_nano=7,
                    entries=(entry(rid, 7),),
                    adjustments=(adjust("requests", -1),),
                )
            )
            for i, rid in enumerate(admitted * 2)
        )
    )

    assert len(admitted) == 10
    assert sum(settled) == 10
    assert await pair[1].budgets.status(TEAM, MONTH) == BudgetStatus(70, 0)
    assert len(await entries(pair[0])) == 10
    assert await count(pair[0], "requests") == 0


@pytest.mark.redis
async def test_redis_refuses_an_admission_or_settlement_of_two_teams(clock: FakeClock) -> None:
    """Redis keeps a team's keys in one cluster slot, so one script can touch only one team."""
    stores = RedisStores(await fresh_redis(), owns_client=True, clock=clock)
    try:
        with pytest.raises(ValueError, match="one team"):
            await stores.meter.admit((hit("requests", 10),), (hold(100, 10, OTHER),), "r1", TTL)
        with pytest.raises(ValueError, match="one team"):
            await stores.meter.settle(
                Settlement(
                    reservation_id="r1",
                    budgets=((TEAM, MONTH),),
                    cost_nano=1,
                    entries=(entry("req-1", 1, team="ads"),),
                )
            )
        with pytest.raises(ValueError, match="one team"):
            await stores.meter.settle(
                Settlement(
                    reservation_id="r1",
                    adjustments=(adjust("requests", 1), adjust("requests", 1, OTHER)),
                )
            )

        assert await count(stores, "requests") == 0
        assert await stores.budgets.status(OTHER, MONTH) == BudgetStatus(0, 0)
    finally:
        await stores.close()
