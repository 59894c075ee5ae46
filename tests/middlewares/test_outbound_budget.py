"""The retry budget: a storm of failing requests retries only a bounded share of them."""

from __future__ import annotations

import asyncio

import aiohttp

from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.retry import RetryBudget
from sidegate.proxy.mock import Fault
from tests.conftest import Upstream
from tests.middlewares.test_outbound_support import CHAT, FakeClock, session

N = 50


class Decisions:
    """A RetryObserver that counts retry decisions and wakes the test after ``n`` of them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.reached = asyncio.Event()
        self.stopped_by: list[str] = []

    def _decided(self) -> None:
        self.count += 1
        if self.count == self.n:
            self.reached.set()

    def retried(self, failure: str) -> None:
        self._decided()

    def stopped(self, failure: str, reason: str) -> None:
        self.stopped_by.append(reason)
        self._decided()


class GatedClock(FakeClock):
    """Every retry waits until the test opens the gate, so retrying requests overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self.gate.wait()


async def test_50_concurrent_failing_requests_respect_the_budget(meridian: Upstream) -> None:
    meridian.state.script(*[Fault(status=503) for _ in range(N * 4)])
    clock = GatedClock()
    budget = RetryBudget(0.2, 3)
    decisions = Decisions(N)

    async def one(client: aiohttp.ClientSession) -> tuple[int, Outbound]:
        with outbound_scope() as outbound:
            async with client.post(meridian.url + "/v1/chat/completions", json=CHAT) as response:
                return response.status, outbound

    async with session(clock, budget=budget, observer=decisions) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(N)]
        async with asyncio.timeout(10):
            await decisions.reached.wait()
        waiting = budget.retrying
        assert budget.rejected == N - waiting
        assert decisions.stopped_by == ["budget"] * (N - waiting)
        clock.gate.set()
        results = await asyncio.gather(*tasks)

    assert 3 <= waiting <= N // 5
    assert [status for status, _ in results] == [503] * N
    retried = [outbound for _, outbound in results if outbound.attempts > 1]
    refused = [outbound for _, outbound in results if outbound.over_budget]
    assert len(retried) == waiting
    assert all(o.attempts == 4 and o.stop_reason == "max_attempts" for o in retried)
    assert all(o.attempts == 1 and o.stop_reason == "budget" and o.gave_up for o in refused)
    assert meridian.state.count() == N + 3 * waiting
    assert (budget.in_flight, budget.retrying) == (0, 0)
