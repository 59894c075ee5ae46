"""The rate-window contract, run against every backend, and across two clients of one store."""

from __future__ import annotations

import asyncio

import pytest

from sidegate.middlewares.store import Scope, Stores
from tests.middlewares.store.conftest import FakeClock

TEAM = Scope("search")


async def test_fixed_window_counts_refuses_and_resets(stores: Stores, clock: FakeClock) -> None:
    clock.now = 6_000_030.0
    rates = stores.rates

    first = await rates.hit(TEAM, "requests", 3)
    await rates.hit(TEAM, "requests", 3, 2)
    refused = await rates.hit(TEAM, "requests", 3)
    clock.advance(30)
    fresh = await rates.hit(TEAM, "requests", 3)

    assert (first.allowed, first.count, first.remaining) == (True, 1, 2)
    assert (first.window_start, first.reset_at) == (6_000_000.0, 6_000_060.0)
    assert (refused.allowed, refused.count, refused.remaining) == (False, 3, 0)
    assert (fresh.allowed, fresh.count, fresh.reset_at) == (True, 1, 6_000_120.0)


async def test_a_refused_hit_adds_nothing(stores: Stores) -> None:
    await stores.rates.hit(TEAM, "tokens", 100, 60, now=120.0)

    assert not (await stores.rates.hit(TEAM, "tokens", 100, 41, now=121.0)).allowed
    assert (await stores.rates.hit(TEAM, "tokens", 100, 40, now=122.0)).count == 100
    assert not (await stores.rates.hit(TEAM, "tokens", 10, 11, now=200.0)).allowed


async def test_names_scopes_and_window_lengths_are_independent(stores: Stores) -> None:
    await stores.rates.hit(TEAM, "requests", 1, now=60.0)

    assert (await stores.rates.hit(TEAM, "tokens", 1, now=60.0)).allowed
    assert (await stores.rates.hit(Scope("search", "k"), "requests", 1, now=60.0)).allowed
    assert (await stores.rates.hit(Scope("ads"), "requests", 1, now=60.0)).allowed
    assert (await stores.rates.hit(TEAM, "requests", 1, window_s=1, now=60.0)).allowed


async def test_adjust_corrects_an_estimate(stores: Stores) -> None:
    hit = await stores.rates.hit(TEAM, "tokens", 1000, 900, now=60.0)

    await stores.rates.adjust(TEAM, "tokens", -800, window_start=hit.window_start)
    assert (await stores.rates.hit(TEAM, "tokens", 1000, 900, now=61.0)).count == 1000
    await stores.rates.adjust(TEAM, "tokens", -5000, window_start=hit.window_start)
    assert (await stores.rates.hit(TEAM, "tokens", 1000, 1, now=62.0)).count == 1
    await stores.rates.adjust(TEAM, "tokens", 999, window_start=hit.window_start)
    assert not (await stores.rates.hit(TEAM, "tokens", 1000, 1, now=63.0)).allowed


async def test_adjusting_a_past_window_leaves_the_current_one(stores: Stores) -> None:
    old = await stores.rates.hit(TEAM, "tokens", 100, 50, now=60.0)
    await stores.rates.hit(TEAM, "tokens", 100, 100, now=120.0)

    await stores.rates.adjust(TEAM, "tokens", -50, window_start=old.window_start)

    assert not (await stores.rates.hit(TEAM, "tokens", 100, 1, now=121.0)).allowed


async def test_window_must_be_positive(stores: Stores) -> None:
    with pytest.raises(ValueError, match="window_s"):
        await stores.rates.hit(TEAM, "requests", 1, window_s=0)


async def test_two_clients_share_the_window(pair: tuple[Stores, Stores]) -> None:
    results = await asyncio.gather(
        *(pair[i % 2].rates.hit(TEAM, "requests", 20, now=600.0) for i in range(30))
    )

    assert sum(r.allowed for r in results) == 20
    assert max(r.count for r in results) == 20
    assert (await pair[0].rates.hit(TEAM, "requests", 21, now=601.0)).count == 21
