"""Key readings are kept raw and folded only when read: the same as parsing each at once."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from sidegate.middlewares import keypool
from sidegate.middlewares.keypool import KeySpec, PoolSpec
from sidegate.middlewares.ratelimits import (
    RATELIMIT_HEADERS,
    RateLimits,
    parse_ratelimit_values,
    parse_ratelimits,
    ratelimit_values,
)
from tests.middlewares.test_outbound_support import START, FakeClock, pool


class Eager:
    """What a key's readings were before they were lazy: every answer parsed and merged at once."""

    def __init__(self) -> None:
        self.limits = RateLimits()

    def observe(self, headers: Mapping[str, str], now: float) -> None:
        reading = parse_ratelimits(headers, now)
        if reading is not None:
            self.limits = self.limits.merged(reading)

    def pick(self, now: float) -> None:
        remaining = self.limits.current(now).remaining_requests
        if remaining is not None:
            self.limits = self.limits.merged(RateLimits(remaining_requests=max(0, remaining - 1)))


# Per header: plain values, other valid forms and garbage, so that readings are complete,
# partial or partly unparsable.
_VALUES = {
    "x-ratelimit-limit-requests": ["100", "10", " 50 ", "12.5", "lots"],
    "x-ratelimit-remaining-requests": ["0", "1", "7", "99", "3.0", "-1"],
    "x-ratelimit-reset-requests": ["30", "2m", "1s", str(int(START) + 45), "6m0s", "soon"],
    "x-ratelimit-limit-tokens": ["1000", "20000", "x"],
    "x-ratelimit-remaining-tokens": ["0", "500", "19999", ""],
    "x-ratelimit-reset-tokens": ["5s", "120", str(int(START) + 20), "1.5s", "?"],
}


def answer(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.5:  # most answers carry all six, as Meridian's do
        return {name: rng.choice(values[:3]) for name, values in _VALUES.items()}
    return {name: rng.choice(values) for name, values in _VALUES.items() if rng.random() < 0.5}


@pytest.mark.parametrize("seed", range(20))
def test_a_lazy_reading_equals_the_eager_one(seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    keys = pool("a", clock=clock)
    (key,) = keys.keys
    eager = Eager()
    for _ in range(300):
        clock.now += rng.choice([0.0, 0.0, 0.5, 3.0, 40.0])
        action = rng.random()
        if action < 0.45:
            headers = answer(rng)
            keys.observe(key, 200, headers)
            eager.observe(headers, clock.now)
        elif action < 0.9:
            assert keys.acquire() is key
            eager.pick(clock.now)
        else:
            assert key.limits == eager.limits
    assert key.limits == eager.limits
    assert keys.snapshot()[0].limits == eager.limits.current(clock.now)


def test_readings_nobody_reads_are_barely_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def counting(values: tuple[str | None, ...], now: float) -> RateLimits | None:
        nonlocal calls
        calls += 1
        return parse_ratelimit_values(values, now)

    monkeypatch.setattr(keypool, "parse_ratelimit_values", counting)
    clock = FakeClock()
    keys = pool("a", clock=clock)
    (key,) = keys.keys
    for remaining in range(200, 0, -1):
        key = keys.acquire()
        keys.observe(key, 200, full(remaining))

    folds = 400 // keypool._FOLD_AT  # 200 picks and 200 answers, folded in bounded batches
    assert calls == folds  # each parsing only its newest complete reading
    assert key.limits == RateLimits(1000, 1, START + 60, 10_000, 9_000, START + 30)
    assert key.limits.remaining_requests == 1
    assert calls == folds + 1  # read twice, folded once


def test_an_incomplete_reading_merges_into_the_one_before() -> None:
    clock = FakeClock()
    keys = pool("a", clock=clock)
    (key,) = keys.keys
    keys.observe(key, 200, full(500))
    keys.observe(key, 200, {"x-ratelimit-remaining-tokens": "10", "x-ratelimit-limit-tokens": "?"})
    keys.acquire()

    assert key.limits == RateLimits(1000, 499, START + 60, 10_000, 10, START + 30)


def test_a_key_exhausted_per_its_headers_is_still_treated_as_such() -> None:
    clock = FakeClock()
    keys = pool("a", "b", clock=clock, strategy="least_limited")
    a, b = keys.keys
    keys.observe(a, 200, full(0))
    keys.observe(b, 200, full(3))

    assert [keys.acquire().id for _ in range(3)] == ["b", "b", "b"]
    assert [status.limits.remaining_requests for status in keys.snapshot()] == [0, 0]
    assert keys.aggregate() == RateLimits(2000, 0, START + 60, 20_000, 18_000, START + 30)

    clock.now += 60  # the requests windows reset: both keys are full again
    assert keys.snapshot()[0].limits.remaining_requests == 1000


def test_values_come_in_the_order_of_the_header_names() -> None:
    headers = {name: str(number) for number, name in enumerate(RATELIMIT_HEADERS)}
    assert ratelimit_values(headers) == ("0", "1", "2", "3", "4", "5")
    assert ratelimit_values({}) == (None,) * 6
    assert parse_ratelimit_values((None,) * 6, START) is None


def test_a_rebuild_without_readings_drops_the_unread_ones() -> None:
    clock = FakeClock()
    keys = pool("a", clock=clock)
    keys.observe(keys.keys[0], 200, full(5))
    keys.rebuild(PoolSpec([KeySpec("a", "secret-a")], readings=False))
    assert keys.keys[0].limits == RateLimits()

    keys.rebuild(PoolSpec([KeySpec("a", "secret-a")]))
    keys.observe(keys.keys[0], 200, full(5))
    assert keys.aggregate() == RateLimits(1000, 5, START + 60, 10_000, 9_000, START + 30)


def full(remaining: int) -> dict[str, str]:
    """A complete Meridian reading: resets in unix seconds, 60 s and 30 s from the start."""
    return {
        "x-ratelimit-limit-requests": "1000",
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": str(int(START) + 60),
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9000",
        "x-ratelimit-reset-tokens": str(int(START) + 30),
    }
