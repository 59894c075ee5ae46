"""The limits policy's helpers (starting store operations eagerly, the windows it reports), and
reading a long answer's usage."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from aiohttp import web

from sidegate.config.budgets import Price
from sidegate.middlewares.contract import CALL_KEY, Call, EndpointKind, Principal, Route, Vendor
from sidegate.middlewares.limits import (
    LimitsSettings,
    _Done,
    _seen,
    _started,
    limits_middleware,
)
from sidegate.middlewares.pricing import TAIL_USAGE_MIN, Usage, cost, rates
from sidegate.middlewares.ratelimits import RateLimits
from sidegate.middlewares.store import MemoryStores, RateDecision, Scope, WindowHit


async def _answer(value: int) -> int:
    return value


async def _after_waiting(value: int) -> int:
    await asyncio.sleep(0)
    waited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, waited.set_result, value)
    return await waited + 1


async def test_work_that_never_waits_is_done_at_once_without_a_task() -> None:
    tasks = len(asyncio.all_tasks())
    started = _started(_answer(7))
    assert isinstance(started, _Done)
    assert started.value == 7
    assert len(asyncio.all_tasks()) == tasks


async def test_work_that_waits_goes_on_in_a_task() -> None:
    started = _started(_after_waiting(5))
    assert isinstance(started, asyncio.Task)
    assert not started.done()
    assert await asyncio.shield(started) == 6


async def test_errors_reach_the_caller_before_or_after_waiting() -> None:
    async def at_once() -> None:
        raise ValueError("at once")

    async def later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    with pytest.raises(ValueError, match="at once"):
        _started(at_once())
    started = _started(later())
    assert not isinstance(started, _Done)
    with pytest.raises(ValueError, match="later"):
        await started


async def test_shielded_work_outlives_a_cancelled_caller() -> None:
    finished: list[int] = []

    async def work() -> None:
        await asyncio.sleep(0.02)
        finished.append(1)

    started = _started(work())
    assert not isinstance(started, _Done)
    caller = asyncio.ensure_future(asyncio.shield(started))
    await asyncio.sleep(0.005)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.05)
    assert finished == [1]


async def test_cancelling_the_task_cancels_the_work_it_carries() -> None:
    seen: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    started = _started(work())
    assert not isinstance(started, _Done)
    await asyncio.sleep(0)
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    assert seen == ["cancelled"]


def _decision(remaining: int, reset_at: float) -> RateDecision:
    return RateDecision(True, 10 - remaining, 10, reset_at - 60, reset_at)


def test_seen_reports_the_first_scopes_windows() -> None:
    team, key = Scope("t"), Scope("t", "k")
    hits = [
        WindowHit(team, "requests", 10, 1),
        WindowHit(team, "tokens", 10, 4),
        WindowHit(key, "requests", 10, 1),
    ]
    windows = (_decision(9, 60.0), _decision(6, 61.0), _decision(1, 62.0))
    assert _seen(hits, windows) == RateLimits(10, 9, 60.0, 10, 6, 61.0)
    only_tokens = [WindowHit(key, "tokens", 10, 4), WindowHit(team, "requests", 10, 1)]
    assert _seen(only_tokens, windows[1:]) == RateLimits(
        limit_tokens=10, remaining_tokens=6, reset_tokens=61.0
    )


@pytest.mark.parametrize("long", [True, False])
async def test_a_long_answer_is_charged_by_the_usage_it_ends_with(long: bool) -> None:
    prices = rates(Price(input=Decimal("0.02")))
    middleware = limits_middleware(
        LimitsSettings(teams={}, prices={"embed": prices}), MemoryStores()
    )
    route = Route("meridian", Vendor.MERIDIAN, EndpointKind.EMBEDDINGS, "/v1/embeddings", "embed")
    call = Call("r", route, b'{"model":"embed","input":"x"}', "application/json", Principal("t"))
    # Not JSON before its usage: only a read from the end finds the usage.
    filler = b"," * (TAIL_USAGE_MIN if long else 100)
    answer = b'{"data":[' + filler + b'],"usage":{"prompt_tokens":3,"total_tokens":3}}'

    async def handler(request: object) -> web.StreamResponse:
        call.upstream_status = 200
        return web.Response(body=answer, content_type="application/json")

    await middleware({CALL_KEY: call}, handler)  # type: ignore[arg-type]

    if long:
        assert call.usage == {"prompt_tokens": 3, "completion_tokens": 0, "images": 0}
        assert call.cost_nano_usd == cost(Usage(3), prices, "embeddings")
    else:  # parsed whole, not JSON: the estimate is charged
        assert call.usage is None
        assert call.cost_nano_usd == call.cost_estimate_nano_usd
