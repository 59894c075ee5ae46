"""Budgets and rate limits hold across real ``sidegate serve`` processes sharing one store.

The concurrency proof: a $1.00 budget and 20 concurrent requests that each reserve exactly $0.10,
sent alternately through two sidegate processes sharing one Redis (database 14, flushed) or one
SQLite file, or to one port served by ``--workers 2``. The mock upstream runs in the test process
and holds every request it receives until each of the 20 has either been refused by sidegate or
reached it, so the admitted requests are all in flight at once: a check-then-charge budget would
let all 20 through. At most 10 may be admitted, the spend may not pass $1.00, and the ledger must
equal the sum of the per-request costs.

When Redis is unreachable the Redis cases skip, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidegate.config.models import Price
from sidegate.middlewares.api_keys import hash_key
from sidegate.middlewares.pricing import estimate, rates
from sidegate.middlewares.store import BudgetStatus, LedgerEntry, Scope, Stores, open_stores
from sidegate.proxy.mock import MOCK_STATE, meridian_app
from tests.conftest import DEMO_KEY, AiohttpServer, Upstream, redis_database, redis_url
from tests.proxy.serving import POLL_TIMEOUT_S, Served, serve, write_yaml

REDIS_URL = redis_url(14)
CHAT = "/v1/chat/completions"
TEAM = "race"
PRICE = {"input": 0, "output": 12_500}  # USD per 1M tokens: 8 output tokens are $0.10
BODY = {
    "model": "meridian-1",
    "messages": [{"role": "user", "content": "how much is left?"}],
    "max_tokens": 8,
}
EACH_NANO = 100_000_000  # $0.10
LIMIT_NANO = 1_000_000_000  # $1.00
STOP_GRACE_S = 10.0


@pytest.fixture
async def shared_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """The ``store:`` section the gateways share (parametrized indirectly: redis or sqlite)."""
    if request.param == "sqlite":
        yield {"kind": "sqlite", "path": str(tmp_path / "shared.db")}
        return
    async with redis_database(14) as url:
        yield {"kind": "redis", "url": url}


@dataclass
class Gated:
    """The mock Meridian, holding chat requests (once received and recorded) until ``gate``."""

    upstream: Upstream
    gate: asyncio.Event


@pytest.fixture
async def gated(aiohttp_server: AiohttpServer) -> AsyncIterator[Gated]:
    gate = asyncio.Event()
    app = meridian_app()

    @web.middleware
    async def hold(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == CHAT:
            await gate.wait()
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(hold)  # inside the mock's own: requests are recorded first
    upstream = Upstream(await aiohttp_server(app), app[MOCK_STATE])
    try:
        yield Gated(upstream, gate)
    finally:
        gate.set()


def config(upstream_url: str, store: dict[str, Any], team: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"watch_config": False, "shutdown_grace_s": 2},
        "store": store,
        "retry": {"max_attempts": 1},
        "upstreams": {
            "meridian": {
                "kind": "meridian",
                "base_url": upstream_url,
                "keys": [{"id": "k", "secret": "sk-test-race"}],
                "models": ["meridian-1"],
            }
        },
        "pricing": {"meridian-1": PRICE},
        "auth": {"api_keys": [{"id": "race-key", "team": TEAM, "hash": hash_key(DEMO_KEY)}]},
        "teams": {TEAM: team},
    }


@contextlib.asynccontextmanager
async def gateways(
    path: Path, tmp_path: Path, ports: Callable[[], int], *, workers: bool = False
) -> AsyncIterator[list[Served]]:
    """Two sidegate processes on two ports, or one ``--workers 2`` on one (listed twice)."""
    async with contextlib.AsyncExitStack() as stack:
        if workers:
            directory = tmp_path / "workers"
            directory.mkdir()
            served = await stack.enter_async_context(
                serve(path, ports(), directory, args=("--workers", "2"), stop_grace_s=STOP_GRACE_S)
            )
            yield [served, served]
            return
        directories = [tmp_path / "a", tmp_path / "b"]
        for directory in directories:
            directory.mkdir()
        started = await asyncio.gather(
            *(
                stack.enter_async_context(
                    serve(path, ports(), directory, stop_grace_s=STOP_GRACE_S)
                )
                for directory in directories
            ),
            return_exceptions=True,
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield [outcome for outcome in started if isinstance(outcome, Served)]


async def eventually(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_TIMEOUT_S
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {POLL_TIMEOUT_S} s")
        await asyncio.sleep(0.01)


def cost_of(usage: dict[str, int]) -> int:
    """Nano-USD of one answer's usage at PRICE, rounded up."""
    per_million = Fraction(PRICE["input"]) * usage["prompt_tokens"]
    per_million += Fraction(PRICE["output"]) * usage["completion_tokens"]
    return math.ceil(per_million * 10**9 / 10**6)


async def fresh_minute(margin_s: float = 3.0) -> None:
    """Make sure at least ``margin_s`` remain in the current one-minute rate window (the
    store's windows are fixed unix minutes; sidegate's clock cannot be injected here)."""
    left = 60.0 - time.time() % 60.0
    if left < margin_s:
        await asyncio.sleep(left + 0.05)


# -- the concurrency proof -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared_store", "workers"),
    [
        pytest.param("redis", False, marks=pytest.mark.redis, id="redis-two-processes"),
        pytest.param("sqlite", False, id="sqlite-two-processes"),
        pytest.param("sqlite", True, id="sqlite-workers-2"),
    ],
    indirect=["shared_store"],
)
async def test_twenty_concurrent_requests_cannot_overspend_a_shared_budget(
    shared_store: dict[str, Any],
    workers: bool,
    gated: Gated,
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    bound = estimate("chat", BODY, rates(Price.model_validate(PRICE)))
    assert bound.cost_nano == EACH_NANO  # every request reserves exactly $0.10
    store = shared_store
    team = {"budget": {"usd": "1.00", "period": "total"}}
    path = tmp_path / "sidegate.yaml"
    write_yaml(path, config(gated.upstream.url, store, team))
    mock = gated.upstream.state

    async with gateways(path, tmp_path, unused_tcp_port_factory, workers=workers) as servers:
        refused_so_far: list[int] = []

        async def send(served: Served, n: int) -> tuple[str, int, Any, dict[str, str]]:
            request_id = f"race-{n:02d}"
            async with served.session.post(
                served.url + CHAT, json=BODY, headers={"x-request-id": request_id}
            ) as response:
                payload = await response.json()
                if response.status != 200:
                    refused_so_far.append(response.status)
                return request_id, response.status, payload, dict(response.headers)

        tasks = [asyncio.create_task(send(servers[n % 2], n)) for n in range(20)]
        try:
            # Every request is decided (refused, or arrived upstream and held there) while
            # none of the admitted ones has finished: the reservations were concurrent.
            await eventually(
                lambda: len(refused_so_far) + mock.count(CHAT) >= 20,
                f"20 requests decided ({len(refused_so_far)} refused, {mock.count(CHAT)} upstream)",
            )
            in_flight_upstream = mock.count(CHAT)
        finally:
            gated.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), POLL_TIMEOUT_S)

        admitted = {rid: body for rid, status, body, _ in results if status == 200}
        refused = [(status, body, headers) for _, status, body, headers in results if status != 200]
        assert len(admitted) + len(refused) == 20
        assert len(admitted) <= 10, f"{len(admitted)} admitted on a budget for 10"
        assert len(admitted) == 10  # each costs what it reserved: exactly ten fit
        assert in_flight_upstream == mock.count(CHAT) == len(admitted)
        for status, body, headers in refused:
            assert status == 429, body
            assert body["error"]["code"] == "budget_exceeded"
            assert body["error"]["type"] == "insufficient_quota"
            assert headers["x-should-retry"] == "false"
        costs = {rid: cost_of(body["usage"]) for rid, body in admitted.items()}
        assert set(costs.values()) == {EACH_NANO}

        stores = await open_shared(store)
        try:
            ledger = await settled_ledger(stores, len(admitted))
            status = await stores.budgets.status(Scope(TEAM), "total")
        finally:
            await stores.close()
        assert status == BudgetStatus(sum(costs.values()), 0)
        assert status.spent <= LIMIT_NANO
        assert {entry.request_id: entry.cost_nano for entry in ledger} == costs
        assert sum(entry.cost_nano for entry in ledger) == sum(costs.values())

        for served in {id(s): s for s in servers}.values():
            usage_status, usage = await served.get(
                "/v1/usage?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"
            )
            assert usage_status == 200, usage
            assert usage["aggregate"]["cost_nano_usd"] == sum(costs.values())
            assert usage["aggregate"]["requests"] == len(admitted)

        if workers:
            started = [
                json.loads(line)
                for line in servers[0].output().splitlines()
                if '"workers_started"' in line
            ]
            assert [event["count"] for event in started] == [2]


async def open_shared(store: dict[str, Any]) -> Stores:
    """The test's own client of the store the gateways share."""
    if store["kind"] == "redis":
        return await open_stores("redis", url=store["url"])
    return await open_stores("sqlite", path=store["path"])


async def settled_ledger(stores: Stores, count: int) -> list[LedgerEntry]:
    """The team's ledger once it has ``count`` entries and no reservation is left (commits
    land after the responses)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_TIMEOUT_S
    since, until = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    while True:
        entries = await stores.ledger.query(TEAM, since, until)
        status = await stores.budgets.status(Scope(TEAM), "total")
        if len(entries) >= count and status.reserved == 0:
            assert len(entries) == count, entries
            return entries
        if loop.time() > deadline:
            pytest.fail(f"{len(entries)} ledger entries, {status.reserved} reserved: not settled")
        await asyncio.sleep(0.05)


# -- rate limits across processes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "shared_store",
    [pytest.param("redis", marks=pytest.mark.redis), "sqlite"],
    indirect=True,
)
async def test_requests_per_minute_hold_across_two_processes(
    shared_store: dict[str, Any],
    meridian: Upstream,
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    store = shared_store
    path = tmp_path / "sidegate.yaml"
    write_yaml(path, config(meridian.url, store, {"rate_limit": {"requests_per_minute": 5}}))
    async with gateways(path, tmp_path, unused_tcp_port_factory) as servers:
        await fresh_minute()
        statuses = []
        for n in range(8):
            served = servers[n % 2]
            async with served.session.post(served.url + CHAT, json=BODY) as response:
                body = await response.json()
                statuses.append(response.status)
                if response.status == 429:
                    assert body["error"]["code"] == "rate_limit_exceeded"
                    assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert statuses == [200] * 5 + [429] * 3
        assert meridian.state.count(CHAT) == 5


async def test_team_mode_headers_count_across_two_processes(
    meridian: Upstream,
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    store = {"kind": "sqlite", "path": str(tmp_path / "shared.db")}
    data = config(meridian.url, store, {"rate_limit": {"requests_per_minute": 9}})
    data["rate_limit_headers"] = {"mode": "team"}
    path = tmp_path / "sidegate.yaml"
    write_yaml(path, data)
    async with gateways(path, tmp_path, unused_tcp_port_factory) as servers:
        await fresh_minute()
        remaining = []
        for n, stream in enumerate((False, True, False, True)):
            served = servers[n % 2]
            async with served.session.post(
                served.url + CHAT, json={**BODY, "stream": stream}
            ) as response:
                assert response.status == 200
                await response.read()
                assert response.headers["x-ratelimit-limit-requests"] == "9"
                remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [8, 7, 6, 5]
