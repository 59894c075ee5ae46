"""Budgets, the ledger, local usage and per-team rate limits, through the gateway, in process.

Each test runs sidegate (``aiohttp_client``) in front of the mock upstreams, on the memory and the
sqlite store. Expected costs are computed here from the mock's usage and the prices below, in
exact fractions of a USD, and rounded up to a whole nano-USD per request. A ledger entry may be
committed after the client has its response (a stream is settled when the handler ends), so the
tests poll the store, with a deadline, for it.

Rate windows are fixed unix minutes and sidegate's clock cannot be injected into a gateway, so a
rate-limit test first makes sure a few seconds remain in the current minute (``fresh_minute``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from sidegate.config import ConfigError, load_config_text
from sidegate.config.models import Price, SidegateConfig
from sidegate.middlewares.api_keys import hash_key
from sidegate.middlewares.pricing import TAIL_USAGE_MIN, estimate, nano_to_usd, rates
from sidegate.middlewares.store import (
    Admission,
    BudgetStatus,
    LedgerEntry,
    Scope,
    Settlement,
    Stores,
    StoreUnavailable,
    open_stores,
    period_key,
)
from sidegate.proxy import cli
from sidegate.proxy.app import create_app
from sidegate.proxy.mock import Fault
from sidegate.proxy.mock.text import plan_completion
from sidegate.proxy.state import STATE_KEY
from tests.conftest import (
    ADMIN,
    SEARCH,
    SEARCH_MODELS,
    AiohttpClient,
    Upstream,
    base_config,
    gateway_client,
)
from tests.proxy.serving import SIDEGATE

Client = TestClient[web.Request, web.Application]


def _usd(nano: int) -> str:
    return f"{nano_to_usd(nano).normalize():f}"


Make = Callable[..., Awaitable[Client]]
T = TypeVar("T")

SEARCH2_KEY = "sg-test-search-batch-key-0000000000000000000003"
SEARCH2 = {"Authorization": f"Bearer {SEARCH2_KEY}"}
CHAT = "/v1/chat/completions"
POLL_S = 10.0
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
FAR = datetime(2100, 1, 1, tzinfo=UTC)
AMPLE = {"usd": 100, "period": "total"}

# USD per 1M tokens, per image, per request or per second of audio.
PRICING: dict[str, dict[str, Any]] = {
    "meridian-1": {"input": "0.333333", "output": "1.5"},  # 333.333 nano-USD a prompt token
    "meridian-1-turbo": {"input": "0.5", "output": "1.5"},
    "fast": {"input": 0, "output": "1.25"},  # an alias's own price; prompts are free
    "meridian-embed-3": {"input": "0.02"},
    "embed.text.v1": {"input": "0.013"},
    "meridian-image-1": {
        "per_image": {"1024x1024": {"standard": "0.04", "hd": "0.08"}, "1792x1024": "0.08"}
    },
    "meridian-whisper-1": {
        "per_request": "0.001",
        "per_second": "0.0001",
        "max_audio_seconds": 600,
    },
    "whisper": {"per_request": "0.006"},
    "llm.general.v1": {"input": "0.3", "output": "0.6"},
}


# -- helpers --------------------------------------------------------------------------------------


def usd(value: Any) -> Fraction:
    return Fraction(str(value))


def nano(amount_usd: Fraction) -> int:
    """Whole nano-USD, rounded up."""
    return math.ceil(amount_usd * 10**9)


def token_usd(model: str, prompt: int, completion: int = 0) -> Fraction:
    """The exact USD cost of a request's tokens."""
    price = PRICING[model]
    per_million = usd(price.get("input", 0)) * prompt + usd(price.get("output", 0)) * completion
    return per_million / 10**6


def token_cost(model: str, prompt: int, completion: int = 0) -> int:
    """What sidegate must charge for a request's tokens: nano-USD, rounded up."""
    return nano(token_usd(model, prompt, completion))


def chat(model: str = "meridian-1", content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def mock_usage(meridian: Upstream, body: dict[str, Any]) -> dict[str, int]:
    """The usage the mock answers ``body`` with (its deterministic plan)."""
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = meridian.state.stream_chunks if cap is None else cap
    return plan_completion(body["messages"], meridian.state.stream_chunks, limit).usage()


def budget_config(
    base: dict[str, Any],
    store: dict[str, Any],
    teams: dict[str, dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """``base`` with prices for every model, a second search key and budgets (``teams``)."""
    config = copy.deepcopy(base)
    config["store"] = store
    config["pricing"] = copy.deepcopy(PRICING)
    config["auth"]["api_keys"].append(
        {"id": "search-batch", "team": "search", "hash": hash_key(SEARCH2_KEY)}
    )
    chosen = (
        {"platform": {"budget": AMPLE}, "search": {"budget": AMPLE}} if teams is None else teams
    )
    config["teams"] = {
        "platform": copy.deepcopy(chosen.get("platform", {})),
        "search": {"models": SEARCH_MODELS, **copy.deepcopy(chosen.get("search", {}))},
    }
    config.update(top)
    return config


STRICT = ["memory", "sqlite"]
"""The stores that write each request before answering it; with leases, what the store holds is
a lease, not the request's own reservation (tests/middlewares/store/test_leases.py)."""


@pytest.fixture(params=[*STRICT, "sqlite-leased"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Each store; ``sqlite-leased`` admits from leases and writes in batches (``batch_s``)."""
    if request.param == "memory":
        return {"kind": "memory"}
    if request.param == "sqlite-leased":
        return {"kind": "sqlite", "path": str(tmp_path / "sidegate.db"), "batch_s": 0.05}
    return {"kind": "sqlite", "path": str(tmp_path / "sidegate.db")}


@pytest.fixture
def make(
    aiohttp_client: AiohttpClient, gateway_config: dict[str, Any], store: dict[str, Any]
) -> Make:
    """A budgeted sidegate on ``store``; ``teams`` and top-level overrides as in budget_config."""

    async def factory(
        teams: dict[str, dict[str, Any]] | None = None,
        headers: dict[str, str] = ADMIN,
        **top: Any,
    ) -> Client:
        config = budget_config(gateway_config, store, teams, **top)
        return await gateway_client(aiohttp_client, config, headers)

    return factory


def stores_of(client: Client) -> Stores:
    return client.app[STATE_KEY].stores


def period_now(period: str) -> str:
    return period_key(period, datetime.now(UTC))[0]  # type: ignore[arg-type]


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first non-None answer of ``probe``, polled for at most POLL_S seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_S
    while True:
        found = await probe()
        if found is not None:
            return found
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {POLL_S} s")
        await asyncio.sleep(0.02)


async def settled(
    client: Client,
    team: str,
    count: int,
    *,
    period: str = "total",
    scopes: tuple[Scope, ...] = (),
) -> list[LedgerEntry]:
    """The team's ledger once it holds ``count`` entries and nothing is reserved any more."""
    stores = stores_of(client)
    watched = (Scope(team), *scopes)

    async def probe() -> list[LedgerEntry] | None:
        entries = await stores.ledger.query(team, EPOCH, FAR)
        statuses = [await stores.budgets.status(s, period_now(period)) for s in watched]
        if len(entries) >= count and all(s.reserved == 0 for s in statuses):
            return entries
        return None

    entries = await eventually(probe, f"{count} settled ledger entries of {team!r}")
    assert len(entries) == count, entries
    return entries


async def status_of(client: Client, scope: Scope, period: str = "total") -> BudgetStatus:
    return await stores_of(client).budgets.status(scope, period_now(period))


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    error = body["error"]
    assert isinstance(error, dict)
    return error


def sse_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a whole SSE stream, which must end with ``data: [DONE]``."""
    events = [event for event in raw.split(b"\n\n") if event.strip()]
    assert events[-1] == b"data: [DONE]", raw[-200:]
    return [orjson.loads(event.removeprefix(b"data: ")) for event in events[:-1]]


async def budgets_rows(client: Client) -> dict[tuple[str, str | None], dict[str, Any]]:
    response = await client.get("/admin/budgets", headers=ADMIN)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["object"] == "list"
    return {(row["team"], row["key_id"]): row for row in body["data"]}


async def fresh_minute(margin_s: float = 3.0) -> None:
    """Make sure at least ``margin_s`` remain in the current one-minute rate window.

    The store's windows are fixed unix minutes and sidegate's clock cannot be injected from
    here; without this, a test crossing a minute boundary would see its counters reset.
    """
    left = 60.0 - time.time() % 60.0
    if left < margin_s:
        await asyncio.sleep(left + 0.05)


# -- refusal before any upstream call -------------------------------------------------------------


async def test_a_request_whose_reservation_does_not_fit_is_refused_before_any_upstream_call(
    make: Make, meridian: Upstream
) -> None:
    client = await make(
        teams={"search": {"budget": {"usd": "0.001", "period": "monthly"}}}, headers=SEARCH
    )
    small = chat(max_tokens=8)
    ok = await client.post(CHAT, json=small, headers={"x-request-id": "fits"})
    assert ok.status == 200
    spent = token_cost("meridian-1", **_tokens(await ok.json()))
    await settled(client, "search", 1, period="monthly")
    assert meridian.state.count() == 1

    before = datetime.now(UTC)
    big = chat(max_tokens=10_000)  # 10,000 × 1.5 USD / 1M = 0.015 USD > 0.001
    response = await client.post(CHAT, json=big)
    after = datetime.now(UTC)

    assert response.status == 429
    assert response.headers["x-should-retry"] == "false"
    error = await error_of(response)
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "budget_exceeded"
    message = error["message"]
    remaining = 1_000_000 - spent
    assert f"${_usd(remaining)} of its" in message, message  # what remains
    resets = {period_key("monthly", moment)[1] for moment in (before, after)}
    assert any(f"{when:%Y-%m-%dT%H:%M:%SZ}" in message for when in resets if when), message
    assert meridian.state.count() == 1  # the refused request never reached the upstream
    assert await status_of(client, Scope("search"), "monthly") == BudgetStatus(spent, 0)


def _tokens(body: dict[str, Any]) -> dict[str, int]:
    usage = body["usage"]
    return {"prompt": usage["prompt_tokens"], "completion": usage.get("completion_tokens", 0)}


async def test_spend_exactly_at_the_limit_refuses_the_next_request(
    make: Make, meridian: Upstream
) -> None:
    body = chat("fast", max_tokens=8)  # meridian answers 8 words: the estimate is the cost
    bound = estimate("chat", body, rates(Price.model_validate(PRICING["fast"])))
    each = token_cost("fast", prompt=1_000, completion=8)
    assert bound.cost_nano == each == 10_000
    limit = 3 * each
    client = await make(
        teams={"search": {"budget": {"usd": str(nano_to_usd(limit)), "period": "total"}}},
        headers=SEARCH,
    )
    for n in range(3):
        response = await client.post(CHAT, json=body, headers={"x-request-id": f"exact-{n}"})
        assert response.status == 200, await response.text()
        assert (await response.json())["usage"]["completion_tokens"] == 8
    entries = await settled(client, "search", 3)
    assert [entry.cost_nano for entry in entries] == [each] * 3
    assert await status_of(client, Scope("search")) == BudgetStatus(limit, 0)

    refused = await client.post(CHAT, json=body)
    assert refused.status == 429
    assert (await error_of(refused))["code"] == "budget_exceeded"
    tiny = await client.post(CHAT, json=chat("fast", content="x", max_tokens=1))
    assert tiny.status == 429  # even a request costing 1,250 nano-USD
    assert meridian.state.count(CHAT) == 3


async def test_spend_put_at_the_limit_through_the_store_refuses_the_next_request(
    make: Make, meridian: Upstream
) -> None:
    client = await make(teams={"search": {"budget": {"usd": "0.5", "period": "daily"}}})
    stores = stores_of(client)
    scope, period = Scope("search"), period_now("daily")
    assert (await stores.budgets.reserve(scope, period, 500_000_000, 500_000_000, "r", 60)).admitted
    assert await stores.budgets.commit(scope, period, "r", 500_000_000)

    response = await client.post(CHAT, json=chat(max_tokens=1), headers=SEARCH)
    assert response.status == 429
    error = await error_of(response)
    assert error["code"] == "budget_exceeded"
    assert meridian.state.count() == 0


async def test_an_exhausted_budget_says_zero_remains_in_plain_digits(make: Make) -> None:
    client = await make(teams={"search": {"budget": {"usd": "0.00001", "period": "total"}}})
    stores = stores_of(client)
    assert (
        await stores.budgets.reserve(Scope("search"), "total", 10_000, 10_000, "r", 60)
    ).admitted
    assert await stores.budgets.commit(Scope("search"), "total", "r", 10_000)
    response = await client.post(CHAT, json=chat("fast", max_tokens=1), headers=SEARCH)
    assert response.status == 429
    message = (await error_of(response))["message"]
    assert "E-" not in message, message


async def test_a_repeated_client_request_id_does_not_bypass_the_budget(
    make: Make, meridian: Upstream
) -> None:
    body = chat("fast", max_tokens=8)  # 10,000 nano-USD each, estimate == cost
    client = await make(teams={"search": {"budget": {"usd": "0.00003", "period": "total"}}})
    statuses = []
    for _ in range(5):
        response = await client.post(
            CHAT, json=body, headers={**SEARCH, "x-request-id": "the-same-id"}
        )
        statuses.append(response.status)
    admitted = statuses.count(200)
    assert admitted <= 3, statuses
    stores = stores_of(client)

    async def probe() -> BudgetStatus | None:
        status = await stores.budgets.status(Scope("search"), "total")
        return status if status.reserved == 0 else None

    status = await eventually(probe, "no reservation left")
    assert status.spent == 10_000 * admitted == 10_000 * meridian.state.count(CHAT)


# -- the ledger -----------------------------------------------------------------------------------


async def test_the_ledger_sum_equals_the_sum_of_per_request_costs(
    make: Make, meridian: Upstream
) -> None:
    client = await make(headers=SEARCH)
    requests = [
        chat(content="hello there", max_tokens=3),
        chat(content="a somewhat longer question about prices", max_tokens=7),
        chat(content="x"),
        chat("fast", content="what does this cost", max_tokens=5),
        chat(content="one two three four five six seven", max_tokens=2),
    ]
    expected: dict[str, int] = {}
    for n, body in enumerate(requests):
        response = await client.post(CHAT, json=body, headers={"x-request-id": f"ledger-{n}"})
        assert response.status == 200, await response.text()
        usage = (await response.json())["usage"]
        assert usage == mock_usage(meridian, body)
        expected[f"ledger-{n}"] = token_cost(
            body["model"], usage["prompt_tokens"], usage["completion_tokens"]
        )
    assert len(set(expected.values())) > 1
    # 333.333 nano-USD per prompt token: rounding up per request is not rounding the sum.
    exact = sum(
        token_usd(b["model"], u["prompt_tokens"], u["completion_tokens"])
        for b in requests
        for u in [mock_usage(meridian, b)]
    )
    assert sum(expected.values()) > nano(exact)

    entries = await settled(client, "search", len(requests))
    assert {entry.request_id: entry.cost_nano for entry in entries} == expected
    total = sum(expected.values())
    assert sum(entry.cost_nano for entry in entries) == total
    assert await status_of(client, Scope("search")) == BudgetStatus(total, 0)
    usage = await client.get(
        "/v1/usage",
        params={"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"},
    )
    assert (await usage.json())["aggregate"]["cost_nano_usd"] == total


# -- streams --------------------------------------------------------------------------------------


async def test_a_stream_without_include_usage_is_charged_its_real_usage_and_hides_the_chunk(
    make: Make, meridian: Upstream
) -> None:
    client = await make()
    body = chat(stream=True, max_tokens=6)
    sent = orjson.dumps(body)
    response = await client.post(
        CHAT, data=sent, headers={"Content-Type": "application/json", "x-request-id": "s-hide"}
    )
    assert response.status == 200
    chunks = sse_chunks(await response.read())
    assert all(chunk["choices"] for chunk in chunks)  # no usage-only chunk (choices == [])
    assert all(chunk.get("usage") is None for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(text.split()) == 6

    upstream_body = meridian.state.received[-1].json()
    assert upstream_body["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in upstream_body.items() if k != "stream_options"} == body

    usage = mock_usage(meridian, body)
    [entry] = await settled(client, "platform", 1)
    assert entry.request_id == "s-hide"
    assert (entry.prompt_tokens, entry.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert entry.cost_nano == token_cost(
        "meridian-1", usage["prompt_tokens"], usage["completion_tokens"]
    )
    assert await status_of(client, Scope("platform")) == BudgetStatus(entry.cost_nano, 0)


async def test_a_stream_with_include_usage_passes_its_usage_chunk_and_is_charged_once(
    make: Make, meridian: Upstream
) -> None:
    client = await make()
    body = chat(stream=True, stream_options={"include_usage": True})
    sent = orjson.dumps(body)
    response = await client.post(
        CHAT, data=sent, headers={"Content-Type": "application/json", "x-request-id": "s-keep"}
    )
    assert response.status == 200
    chunks = sse_chunks(await response.read())
    usage_only = [chunk for chunk in chunks if chunk["choices"] == []]
    usage = mock_usage(meridian, body)
    assert [chunk["usage"] for chunk in usage_only] == [usage]
    assert meridian.state.received[-1].body == sent  # not rewritten

    [entry] = await settled(client, "platform", 1)
    cost = token_cost("meridian-1", usage["prompt_tokens"], usage["completion_tokens"])
    assert entry.cost_nano == cost
    assert await status_of(client, Scope("platform")) == BudgetStatus(cost, 0)


@contextlib.asynccontextmanager
async def run_app(app: web.Application, port: int) -> AsyncIterator[str]:
    """Serve ``app`` as ``web.run_app`` (and so ``sidegate serve``) does: a handler is not
    cancelled when its client goes away (aiohttp's test server cancels it)."""
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "server",
    [
        "run_app",
        "handler_cancellation",
    ],
)
async def test_a_client_that_leaves_mid_stream_is_charged_more_than_zero(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    store: dict[str, Any],
    meridian: Upstream,
    unused_tcp_port: int,
    server: str,
) -> None:
    app = create_app(SidegateConfig.model_validate(budget_config(gateway_config, store)))
    meridian.state.script(Fault(pace_s=0.1), path=CHAT)
    body = chat(stream=True, content="count to ten please")
    async with contextlib.AsyncExitStack() as stack:
        if server == "run_app":
            url = await stack.enter_async_context(run_app(app, unused_tcp_port))
            session = await stack.enter_async_context(aiohttp.ClientSession(headers=ADMIN))
        else:
            client = await aiohttp_client(app, headers=ADMIN)
            url, session = str(client.make_url("")).rstrip("/"), client.session
        response = await session.post(url + CHAT, json=body, headers={"x-request-id": "gone"})
        assert response.status == 200
        first = await asyncio.wait_for(response.content.readline(), POLL_S)
        assert first.startswith(b"data: {")
        assert await asyncio.wait_for(response.content.readline(), POLL_S) == b"\n"
        response.close()  # after the first event, while the upstream is pausing
        await asyncio.wait_for(meridian.state.wait_disconnects(1), POLL_S)
        assert meridian.state.open_streams == 0

        stores = app[STATE_KEY].stores

        async def probe() -> list[LedgerEntry] | None:
            status = await stores.budgets.status(Scope("platform"), "total")
            if status.reserved:
                return None
            entries = await stores.ledger.query("platform", EPOCH, FAR)
            return entries if entries or status.spent == 0 else None

        entries = await eventually(probe, "the disconnected stream settled")
        assert [entry.request_id for entry in entries] == ["gone"]
        [entry] = entries
        assert entry.cost_nano > 0
        assert await stores.budgets.status(Scope("platform"), "total") == BudgetStatus(
            entry.cost_nano, 0
        )


@pytest.mark.parametrize("store", STRICT, indirect=True)
async def test_admin_budgets_shows_the_reservation_of_a_stream_in_flight(
    make: Make, meridian: Upstream
) -> None:
    client = await make(teams={"platform": {"budget": {"usd": 10, "period": "monthly"}}})
    meridian.state.script(Fault(pace_s=0.05), path=CHAT)
    body = chat(stream=True, max_tokens=8)
    reserved = estimate("chat", body, rates(Price.model_validate(PRICING["meridian-1"])))
    response = await client.post(CHAT, json=body)
    assert response.status == 200
    await asyncio.wait_for(response.content.readline(), POLL_S)

    row = (await budgets_rows(client))[("platform", None)]
    assert row["reserved_usd"] == float(nano_to_usd(reserved.cost_nano))
    assert row["spent_usd"] == 0

    rest = await asyncio.wait_for(response.content.read(), POLL_S)
    assert rest.endswith(b"data: [DONE]\n\n")
    usage = mock_usage(meridian, body)
    cost = token_cost("meridian-1", usage["prompt_tokens"], usage["completion_tokens"])
    await settled(client, "platform", 1, period="monthly")
    row = (await budgets_rows(client))[("platform", None)]
    assert row["reserved_usd"] == 0
    assert row["spent_nano_usd"] == cost
    assert row["remaining_usd"] == float(nano_to_usd(10 * 10**9 - cost))


# -- upstream errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 400, 404])
async def test_an_upstream_error_releases_the_reservation(
    make: Make, meridian: Upstream, status: int
) -> None:
    client = await make()
    meridian.state.script(Fault(status=status), path=CHAT)
    response = await client.post(CHAT, json=chat(max_tokens=100))
    assert response.status == status
    assert meridian.state.count(CHAT) == 1

    async def released() -> dict[str, Any] | None:  # at once; with leases, within batch_s
        row = (await budgets_rows(client))[("platform", None)]
        return row if row["reserved_usd"] == 0 else None

    row = await eventually(released, "the reservation released")
    assert (row["spent_usd"], row["reserved_usd"], row["remaining_usd"]) == (0, 0, 100)
    assert await stores_of(client).ledger.query("platform", EPOCH, FAR) == []

    again = await client.post(CHAT, json=chat(max_tokens=100))  # the budget is whole again
    assert again.status == 200


async def test_an_upstream_error_on_a_stream_releases_the_reservation(
    make: Make, meridian: Upstream
) -> None:
    client = await make()
    meridian.state.script(Fault(status=503), path=CHAT)
    response = await client.post(CHAT, json=chat(stream=True))
    assert response.status == 503

    async def released() -> BudgetStatus | None:  # at once; with leases, within batch_s
        status = await status_of(client, Scope("platform"))
        return status if status.reserved == 0 else None

    assert await eventually(released, "the reservation released") == BudgetStatus(0, 0)


# -- every endpoint -------------------------------------------------------------------------------


async def _charged(client: Client, team: str, request_id: str) -> LedgerEntry:
    stores = stores_of(client)

    async def probe() -> LedgerEntry | None:
        for entry in await stores.ledger.query(team, EPOCH, FAR):
            if entry.request_id == request_id:
                return entry
        return None

    return await eventually(probe, f"the ledger entry of {request_id!r}")


async def test_chat_json_is_charged_from_its_usage(make: Make, meridian: Upstream) -> None:
    client = await make()
    response = await client.post(CHAT, json=chat(max_tokens=5), headers={"x-request-id": "c"})
    assert response.status == 200
    tokens = _tokens(await response.json())
    entry = await _charged(client, "platform", "c")
    assert entry.cost_nano == token_cost("meridian-1", **tokens)
    assert (entry.kind, entry.model, entry.upstream) == ("chat", "meridian-1", "meridian")


@pytest.mark.parametrize(
    ("body", "model"),
    [
        ({"model": "meridian-embed-3", "input": ["alpha beta gamma", "delta"]}, "meridian-embed-3"),
        ({"service_id": "embed.text.v1", "input": "a Meivan embedding"}, "embed.text.v1"),
        # An answer long enough to be read for its usage from its end (usage_at_end).
        ({"model": "meridian-embed-3", "input": ["a", "b c", "d e f", "g"]}, "meridian-embed-3"),
    ],
)
async def test_embeddings_are_charged_from_their_usage(
    make: Make, body: dict[str, Any], model: str
) -> None:
    client = await make()
    response = await client.post("/v1/embeddings", json=body, headers={"x-request-id": "e"})
    assert response.status == 200, await response.text()
    if len(body["input"]) == 4:
        assert len(await response.read()) >= TAIL_USAGE_MIN
    usage = (await response.json())["usage"]
    assert usage["prompt_tokens"] > 0
    entry = await _charged(client, "platform", "e")
    assert entry.cost_nano == token_cost(model, usage["prompt_tokens"])
    assert (entry.kind, entry.model, entry.prompt_tokens) == (
        "embeddings",
        model,
        usage["prompt_tokens"],
    )


@pytest.mark.parametrize(
    ("options", "images", "each_usd"),
    [
        ({}, 1, "0.04"),  # 1024x1024 standard by default
        ({"size": "1024x1024", "quality": "hd"}, 1, "0.08"),
        ({"size": "1792x1024", "n": 2}, 2, "0.08"),
        ({"size": "1024x1024", "n": 3, "quality": "standard"}, 3, "0.04"),
    ],
)
async def test_images_are_charged_per_image_by_size_and_quality(
    make: Make, options: dict[str, Any], images: int, each_usd: str
) -> None:
    client = await make()
    body = {"model": "meridian-image-1", "prompt": "a lighthouse", **options}
    response = await client.post(
        "/v1/images/generations", json=body, headers={"x-request-id": "img"}
    )
    assert response.status == 200, await response.text()
    assert len((await response.json())["data"]) == images
    entry = await _charged(client, "platform", "img")
    assert entry.cost_nano == nano(images * usd(each_usd))
    assert (entry.kind, entry.images) == ("images", images)


@pytest.mark.parametrize(
    ("model", "response_format", "expected_usd"),
    [
        # 32,000 bytes are 2.0 s to the mock: per request + 2 × per second
        ("meridian-whisper-1", "verbose_json", usd("0.001") + 2 * usd("0.0001")),
        # no duration in a json answer: charged max_audio_seconds
        ("meridian-whisper-1", "json", usd("0.001") + 600 * usd("0.0001")),
        ("whisper", "verbose_json", usd("0.006")),  # per request only
        ("whisper", "text", usd("0.006")),
    ],
)
async def test_audio_is_charged_per_request_and_per_second(
    make: Make, model: str, response_format: str, expected_usd: Fraction
) -> None:
    client = await make()
    form = aiohttp.FormData()
    form.add_field("file", b"\x01" * 32_000, filename="clip.wav", content_type="audio/wav")
    form.add_field("model", model)
    form.add_field("response_format", response_format)
    response = await client.post(
        "/v1/audio/transcriptions", data=form, headers={"x-request-id": "audio"}
    )
    assert response.status == 200, await response.text()
    if response_format == "verbose_json":
        assert (await response.json())["duration"] == 2.0
    entry = await _charged(client, "platform", "audio")
    assert entry.cost_nano == nano(expected_usd)
    assert entry.kind == "audio"


@pytest.mark.parametrize(
    ("service", "priced_as"), [("general", "llm.general.v1"), ("llm.general.v1", "llm.general.v1")]
)
async def test_meivan_complete_is_charged_from_its_usage(
    make: Make, meivan: Upstream, service: str, priced_as: str
) -> None:
    client = await make()
    body = {
        "service_id": service,
        "messages": [{"role": "user", "content": "summarise the quarter"}],
        "max_tokens": 5,
    }
    response = await client.post("/v1/complete", json=body, headers={"x-request-id": "mv"})
    assert response.status == 200, await response.text()
    tokens = _tokens(await response.json())
    assert meivan.state.count("/v1/complete") == 1
    entry = await _charged(client, "platform", "mv")
    assert entry.cost_nano == token_cost(priced_as, **tokens)
    assert (entry.kind, entry.model, entry.upstream) == ("complete", service, "meivan")


async def test_a_passthrough_without_usage_costs_nothing_but_is_recorded(
    make: Make, meridian: Upstream
) -> None:
    client = await make(budgets={"passthrough_reserve_usd": "0.25"})
    response = await client.get("/upstreams/meridian/v1/models", headers={"x-request-id": "pt"})
    assert response.status == 200
    entry = await _charged(client, "platform", "pt")
    assert entry.cost_nano == 0
    assert entry.kind == "passthrough"
    assert await status_of(client, Scope("platform")) == BudgetStatus(0, 0)


async def test_a_passthrough_is_reserved_by_the_configured_bound(
    make: Make, meridian: Upstream
) -> None:
    teams = {"platform": {"budget": {"usd": "0.5", "period": "total"}}}
    refused_client = await make(teams=teams, budgets={"passthrough_reserve_usd": "1.00"})
    refused = await refused_client.get("/upstreams/meridian/v1/models")
    assert refused.status == 429
    error = await error_of(refused)
    assert error["code"] == "budget_exceeded"
    assert "cost up to $1." in error["message"]  # the bound it would have reserved
    assert meridian.state.count() == 0

    admitted_client = await make(teams=teams, budgets={"passthrough_reserve_usd": "0.25"})
    admitted = await admitted_client.get("/upstreams/meridian/v1/models")
    assert admitted.status == 200
    assert meridian.state.count() == 1


async def test_a_passthrough_is_charged_from_the_usage_it_returns(
    make: Make, meridian: Upstream
) -> None:
    client = await make(budgets={"passthrough_reserve_usd": "0.25"})
    response = await client.post(
        "/upstreams/meridian/v1/embeddings",
        json={"model": "meridian-embed-3", "input": "passed through"},
        headers={"x-request-id": "pt-embed"},
    )
    assert response.status == 200
    prompt = (await response.json())["usage"]["prompt_tokens"]
    assert meridian.state.count("/v1/embeddings") == 1
    entry = await _charged(client, "platform", "pt-embed")
    assert entry.prompt_tokens == prompt
    assert entry.cost_nano == token_cost("meridian-embed-3", prompt)


async def test_a_passthrough_reaches_a_path_of_several_segments(
    make: Make, meridian: Upstream
) -> None:
    client = await make(budgets={"passthrough_reserve_usd": "0.25"})
    response = await client.post(
        "/upstreams/meridian/v1/chat/completions",
        json=chat(max_tokens=4),
        headers={"x-request-id": "pt-chat"},
    )
    assert response.status == 200
    assert meridian.state.count(CHAT) == 1
    entry = await _charged(client, "platform", "pt-chat")
    assert entry.kind == "passthrough"


# -- per-key budgets ------------------------------------------------------------------------------


async def test_a_key_budget_refuses_that_key_while_the_team_still_has_budget(
    make: Make, meridian: Upstream
) -> None:
    body = chat("fast", max_tokens=8)  # 10,000 nano-USD, estimate == cost
    client = await make(
        teams={
            "search": {
                "budget": {"usd": 1, "period": "total"},
                "keys": {"search-prod": {"budget": {"usd": "0.00002", "period": "total"}}},
            }
        }
    )
    for _ in range(2):
        assert (await client.post(CHAT, json=body, headers=SEARCH)).status == 200
    refused = await client.post(CHAT, json=body, headers=SEARCH)
    assert refused.status == 429
    error = await error_of(refused)
    assert error["code"] == "budget_exceeded"
    assert "search-prod" in error["message"]
    assert refused.headers["x-should-retry"] == "false"

    other = await client.post(CHAT, json=body, headers=SEARCH2)  # same team, another key
    assert other.status == 200
    assert meridian.state.count(CHAT) == 3

    await settled(client, "search", 3, scopes=(Scope("search", "search-prod"),))
    assert await status_of(client, Scope("search", "search-prod")) == BudgetStatus(20_000, 0)
    assert await status_of(client, Scope("search")) == BudgetStatus(30_000, 0)
    rows = await budgets_rows(client)
    assert rows[("search", "search-prod")]["remaining_usd"] == 0
    assert rows[("search", None)]["remaining_usd"] == float(nano_to_usd(10**9 - 30_000))


# -- GET /v1/usage --------------------------------------------------------------------------------


def _window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "from": (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "to": (now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


async def test_usage_is_scoped_to_the_callers_team_in_meridians_shape(
    make: Make, meridian: Upstream
) -> None:
    client = await make()
    search_requests = [
        (CHAT, chat(max_tokens=3)),
        (CHAT, chat(content="another question", max_tokens=6)),
        ("/v1/embeddings", {"model": "meridian-embed-3", "input": "embed me"}),
    ]
    search_costs: dict[str, list[tuple[int, int, int]]] = {}
    for path, body in search_requests:
        response = await client.post(path, json=body, headers=SEARCH)
        assert response.status == 200
        tokens = _tokens(await response.json())
        search_costs.setdefault(body["model"], []).append(
            (tokens["prompt"], tokens["completion"], token_cost(body["model"], **tokens))
        )
    platform = await client.post(CHAT, json=chat("fast", max_tokens=4), headers=ADMIN)
    platform_tokens = _tokens(await platform.json())
    platform_cost = token_cost("fast", **platform_tokens)
    await settled(client, "search", 3)
    await settled(client, "platform", 1)

    response = await client.get(
        "/v1/usage", params={**_window(), "granularity": "day"}, headers=SEARCH
    )
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    aggregate = body["aggregate"]
    total_cost = sum(c for rows in search_costs.values() for _, _, c in rows)
    total_tokens = sum(p + c for rows in search_costs.values() for p, c, _ in rows)
    assert aggregate["total_tokens"] == total_tokens
    assert aggregate["total_cost_usd"] == pytest.approx(float(nano_to_usd(total_cost)))
    assert aggregate["cost_nano_usd"] == total_cost
    assert set(aggregate["by_model"]) == {"meridian-1", "meridian-embed-3"}  # not "fast"
    for model, rows in search_costs.items():
        breakdown = aggregate["by_model"][model]
        assert breakdown["requests"] == len(rows)
        assert breakdown["prompt_tokens"] == sum(p for p, _, _ in rows)
        assert breakdown["completion_tokens"] == sum(c for _, c, _ in rows)
        assert breakdown["cost_nano_usd"] == sum(c for _, _, c in rows)
    buckets = body["data"]
    assert 1 <= len(buckets) <= 2  # today (and yesterday, at midnight)
    for bucket in buckets:
        assert {
            "timestamp",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_usd",
        } <= set(bucket)
        assert bucket["total_tokens"] == bucket["prompt_tokens"] + bucket["completion_tokens"]
        assert bucket["timestamp"].endswith("T00:00:00Z")
        assert set(bucket["by_model"]) <= {"meridian-1", "meridian-embed-3"}
    assert sum(b["total_tokens"] for b in buckets) == total_tokens
    assert sum(b["cost_usd"] for b in buckets) == pytest.approx(float(nano_to_usd(total_cost)))

    mine = await (await client.get("/v1/usage", params=_window(), headers=ADMIN)).json()
    assert mine["aggregate"]["cost_nano_usd"] == platform_cost
    assert mine["aggregate"]["total_tokens"] == sum(platform_tokens.values())
    assert set(mine["aggregate"]["by_model"]) == {"fast"}

    hourly = await client.get(
        "/v1/usage", params={**_window(), "granularity": "hour"}, headers=SEARCH
    )
    hours = (await hourly.json())["data"]
    assert all(bucket["timestamp"].endswith(":00:00Z") for bucket in hours)
    assert sum(bucket["total_tokens"] for bucket in hours) == total_tokens


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"from": "yesterday", "to": "2025-01-02T00:00:00Z"}, "from"),
        ({"from": "2025-01-01T00:00:00Z", "to": "2025-13-40T00:00:00Z"}, "to"),
        ({"from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, "to"),
        ({"to": "2025-01-01T00:00:00Z"}, "from"),
        (
            {"from": "2025-01-01T00:00:00Z", "to": "2025-01-02T00:00:00Z", "granularity": "week"},
            "granularity",
        ),
    ],
)
async def test_a_bad_usage_query_is_a_400_envelope_naming_the_parameter(
    make: Make, query: dict[str, str], param: str
) -> None:
    client = await make(headers=SEARCH)
    response = await client.get("/v1/usage", params=query)
    assert response.status == 400
    error = await error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_a_team_without_a_budget_still_sees_its_usage(make: Make) -> None:
    client = await make(teams={"platform": {"budget": AMPLE}, "search": {}})
    unbudgeted = await client.post(CHAT, json=chat(max_tokens=2), headers=SEARCH)
    assert unbudgeted.status == 200
    tokens = _tokens(await unbudgeted.json())
    budgeted = await client.post(CHAT, json=chat(max_tokens=2), headers=ADMIN)
    assert budgeted.status == 200
    await settled(client, "platform", 1)  # settled after the unbudgeted request's
    entries = await stores_of(client).ledger.query("search", EPOCH, FAR)
    assert [entry.cost_nano for entry in entries] == [token_cost("meridian-1", **tokens)]


# -- GET /admin/budgets ---------------------------------------------------------------------------


async def test_admin_budgets_needs_the_admin_role_and_shows_every_budget(
    make: Make, meridian: Upstream
) -> None:
    client = await make(
        teams={
            "platform": {"budget": {"usd": 2, "period": "total"}},
            "search": {
                "budget": {"usd": 5, "period": "monthly"},
                "keys": {"search-batch": {"budget": {"usd": 1, "period": "daily"}}},
            },
        }
    )
    forbidden = await client.get("/admin/budgets", headers=SEARCH)
    assert forbidden.status == 403
    assert (await error_of(forbidden))["code"] == "admin_required"

    response = await client.post(CHAT, json=chat("fast", max_tokens=8), headers=SEARCH2)
    assert response.status == 200
    cost = token_cost("fast", 0, 8)
    await settled(client, "search", 1, period="monthly")

    async def key_charged() -> dict[tuple[str, str | None], dict[str, Any]] | None:
        rows = await budgets_rows(client)  # with leases the key's is written next to the team's
        return rows if rows[("search", "search-batch")]["spent_nano_usd"] == cost else None

    now = datetime.now(UTC)
    rows = await eventually(key_charged, "the key's spend")
    assert set(rows) == {("platform", None), ("search", None), ("search", "search-batch")}
    platform = rows[("platform", None)]
    assert platform == {
        **platform,
        "period": "total",
        "limit_usd": 2,
        "spent_usd": 0,
        "reserved_usd": 0,
        "remaining_usd": 2,
        "resets_at": None,
    }
    search = rows[("search", None)]
    assert search["period"] == "monthly"
    assert (search["limit_usd"], search["spent_nano_usd"], search["reserved_usd"]) == (5, cost, 0)
    assert search["spent_usd"] == float(nano_to_usd(cost))
    assert search["remaining_usd"] == float(nano_to_usd(5 * 10**9 - cost))
    assert search["resets_at"] == f"{period_key('monthly', now)[1]:%Y-%m-%dT%H:%M:%SZ}"
    key = rows[("search", "search-batch")]
    assert (key["period"], key["limit_usd"], key["spent_nano_usd"]) == ("daily", 1, cost)
    assert key["resets_at"] == f"{period_key('daily', now)[1]:%Y-%m-%dT%H:%M:%SZ}"


# -- per-team rate limits -------------------------------------------------------------------------


async def test_requests_per_minute_refuses_the_request_over_the_limit(
    make: Make, meridian: Upstream
) -> None:
    client = await make(
        teams={"search": {"rate_limit": {"requests_per_minute": 2}}, "platform": {}}
    )
    await fresh_minute()
    statuses = []
    for _ in range(3):
        response = await client.post(CHAT, json=chat(max_tokens=1), headers=SEARCH)
        statuses.append(response.status)
    assert statuses == [200, 200, 429]
    error = await error_of(response)
    assert error["code"] == "rate_limit_exceeded"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert meridian.state.count(CHAT) == 2
    other = await client.post(CHAT, json=chat(max_tokens=1), headers=ADMIN)  # another team
    assert other.status == 200


async def test_tokens_per_minute_counts_actual_tokens_and_refuses_over_the_limit(
    make: Make, meridian: Upstream
) -> None:
    body = chat("fast", content="hi", max_tokens=8)
    bound = estimate("chat", body, rates(Price.model_validate(PRICING["fast"])))
    actual = mock_usage(meridian, body)["total_tokens"]
    assert (bound.tokens, actual) == (41, 12)
    # 60 tokens: two requests fit only because the first is corrected to its actual 12 tokens.
    client = await make(teams={"search": {"rate_limit": {"tokens_per_minute": 60}}})
    await fresh_minute()
    statuses = []
    for _ in range(3):
        response = await client.post(CHAT, json=body, headers=SEARCH)
        statuses.append(response.status)
    assert statuses == [200, 200, 429]
    assert (await error_of(response))["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert meridian.state.count(CHAT) == 2


async def test_team_mode_rate_limit_headers_show_the_teams_own_limits(
    make: Make, meridian: Upstream
) -> None:
    client = await make(
        teams={"search": {"rate_limit": {"requests_per_minute": 7, "tokens_per_minute": 5_000}}},
        rate_limit_headers={"mode": "team"},
    )
    body = chat(max_tokens=8)
    bound = estimate("chat", body, rates(Price.model_validate(PRICING["meridian-1"])))
    usage = mock_usage(meridian, body)
    await fresh_minute()
    seen = []
    for stream in (False, True, False, True):
        response = await client.post(CHAT, json={**body, "stream": stream}, headers=SEARCH)
        assert response.status == 200
        if stream:
            assert response.content_type == "text/event-stream"
            sse_chunks(await response.read())
        else:
            await response.read()
        headers = response.headers
        assert headers["x-ratelimit-limit-requests"] == "7"
        assert headers["x-ratelimit-limit-tokens"] == "5000"
        reset = int(headers["x-ratelimit-reset-requests"])
        assert time.time() < reset <= time.time() + 61
        seen.append(
            (
                int(headers["x-ratelimit-remaining-requests"]),
                int(headers["x-ratelimit-remaining-tokens"]),
            )
        )
    assert [requests for requests, _ in seen] == [6, 5, 4, 3]
    # Tokens: the estimate is taken at admission and corrected to actual usage afterwards.
    used = usage["total_tokens"]
    assert [tokens for _, tokens in seen] == [5_000 - n * used - bound.tokens for n in range(4)]


async def test_passthrough_mode_keeps_the_upstream_headers_even_with_team_limits(
    make: Make,
) -> None:
    client = await make(teams={"search": {"rate_limit": {"requests_per_minute": 7}}})
    response = await client.post(CHAT, json=chat(max_tokens=1), headers=SEARCH)
    assert response.status == 200
    assert response.headers["x-ratelimit-limit-requests"] == "10000"  # the mock's account


# -- config ---------------------------------------------------------------------------------------


UNPRICED = """\
upstreams:
  meridian:
    kind: meridian
    mock: true
    models: [meridian-1, meridian-1-turbo]
pricing:
  meridian-1: {input: 1, output: 2}
auth:
  api_keys:
    - {id: k, team: search, hash: "sha256:%s"}
teams:
  open: {models: [meridian-1-turbo]}
  search:
    models: [meridian-1, meridian-1-turbo]
    budget: {usd: 10}
""" % ("0" * 64)


def test_a_budgeted_team_with_an_unpriced_model_is_refused_at_load() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(UNPRICED)
    problems = caught.value.problems
    assert len(problems) == 1, problems
    [problem] = problems
    lines = UNPRICED.splitlines()
    assert problem.line == lines.index("    budget: {usd: 10}") + 1
    assert problem.path == "teams.search.budget"
    assert "'search'" in problem.message
    assert "meridian-1-turbo" in problem.message
    assert f"<string>:{problem.line}: teams.search.budget: " in str(caught.value)

    priced = UNPRICED.replace(
        "  meridian-1: {input: 1, output: 2}",
        "  meridian-1: {input: 1, output: 2}\n  meridian-1-turbo: {input: 1, output: 2}",
    )
    assert load_config_text(priced).teams["search"].budget is not None


def test_a_key_budget_needs_prices_too() -> None:
    text = UNPRICED.replace("    budget: {usd: 10}", "    keys:\n      k: {budget: {usd: 1}}")
    with pytest.raises(ConfigError) as caught:
        load_config_text(text)
    assert any("meridian-1-turbo" in problem.message for problem in caught.value.problems)


# -- the store unreachable ------------------------------------------------------------------------


async def test_an_unreachable_store_fails_budgeted_requests_closed_unless_fail_open(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    meridian: Upstream,
    unused_tcp_port: int,
) -> None:
    store = {"kind": "redis", "url": f"redis://127.0.0.1:{unused_tcp_port}/0"}  # nobody listens

    def gateway(search: dict[str, Any]) -> Awaitable[Client]:
        config = budget_config(gateway_config, store, {"search": search})
        return gateway_client(aiohttp_client, config, SEARCH)

    closed = await gateway({"budget": {"usd": 10, "period": "monthly"}})
    refused = await closed.post(CHAT, json=chat(max_tokens=2))
    assert refused.status == 503
    error = await error_of(refused)
    assert error["code"] == "store_unavailable"
    assert str(unused_tcp_port) not in error["message"]
    assert meridian.state.count() == 0

    rate_limited = await gateway({"rate_limit": {"requests_per_minute": 100}})
    assert (await rate_limited.post(CHAT, json=chat(max_tokens=2))).status == 503
    assert meridian.state.count() == 0

    fail_open = await gateway({"budget": {"usd": 10, "period": "monthly", "fail_open": True}})
    served = await fail_open.post(CHAT, json=chat(max_tokens=2))
    assert served.status == 200
    assert meridian.state.count() == 1


async def test_a_request_a_budget_refuses_takes_no_place_in_the_rate_window(
    make: Make, meridian: Upstream
) -> None:
    body = chat("fast", max_tokens=8)  # 10,000 nano-USD
    client = await make(
        teams={
            "search": {
                "rate_limit": {"requests_per_minute": 2},
                "keys": {"search-prod": {"budget": {"usd": "0.000001", "period": "total"}}},
            }
        }
    )
    await fresh_minute()
    for _ in range(3):  # the key's budget refuses: admission is all or nothing
        refused = await client.post(CHAT, json=body, headers=SEARCH)
        assert (await error_of(refused))["code"] == "budget_exceeded"
    statuses = [(await client.post(CHAT, json=body, headers=SEARCH2)).status for _ in range(3)]
    assert statuses == [200, 200, 429]  # the refused requests did not count
    assert meridian.state.count(CHAT) == 2


@pytest.mark.parametrize("store", STRICT, indirect=True)
async def test_a_commit_the_store_refuses_is_retried_until_it_lands(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = chat("fast", max_tokens=8)  # estimate == cost == 10,000 nano-USD
    client = await make(teams={"search": {"budget": AMPLE}})
    state = client.app[STATE_KEY]
    meter = state.stores.meter
    settle = meter.settle
    refusals = []

    async def refuse_twice(settlement: Settlement) -> bool:
        if len(refusals) < 2:
            refusals.append(settlement)
            raise StoreUnavailable()
        return await settle(settlement)

    monkeypatch.setattr(meter, "settle", refuse_twice)
    response = await client.post(CHAT, json=body, headers=SEARCH)
    assert response.status == 200
    assert await status_of(client, Scope("search")) == BudgetStatus(0, 10_000)  # still held
    assert len(state.pending_commits) == 1
    await asyncio.gather(*state.pending_commits)
    assert len(refusals) == 2
    assert await status_of(client, Scope("search")) == BudgetStatus(10_000, 0)
    entries = await stores_of(client).ledger.query("search", EPOCH, FAR)
    assert [entry.cost_nano for entry in entries] == [10_000]


@pytest.mark.parametrize("store", STRICT, indirect=True)
async def test_an_admission_the_handler_stops_waiting_for_is_undone(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    store: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    meridian: Upstream,
) -> None:
    config = budget_config(
        gateway_config,
        store,
        {"search": {"budget": AMPLE, "rate_limit": {"requests_per_minute": 5}}},
    )
    app = create_app(SidegateConfig.model_validate(config))
    client = await aiohttp_client(app, headers=SEARCH, server_kwargs={"handler_cancellation": True})
    state = app[STATE_KEY]
    meter = state.stores.meter
    admit = meter.admit
    entered, go_on, landed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_admit(*args: Any) -> Admission:
        entered.set()
        await go_on.wait()
        admission = await admit(*args)
        landed.set()
        return admission

    monkeypatch.setattr(meter, "admit", slow_admit)
    await fresh_minute()
    with capture_logs() as logs:
        request = asyncio.ensure_future(client.post(CHAT, json=chat("fast", max_tokens=8)))
        await entered.wait()
        request.cancel()  # the client leaves; with handler_cancellation the handler is cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await eventually(lambda: _access_line(logs), "the cancelled request's access line")
    assert not state.pending_commits  # the admission has not landed yet
    go_on.set()
    await landed.wait()  # the store admitted it: a reservation and a counted request, for now

    async def undone() -> bool | None:
        held = await status_of(client, Scope("search"))
        window = await stores_of(client).rates.hit(Scope("search"), "requests", 5, 0)
        return True if held == BudgetStatus(0, 0) and window.count == 0 else None

    await eventually(undone, "the reservation and the window's count given back")
    assert meridian.state.count(CHAT) == 0


async def _access_line(logs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((line for line in logs if line["event"] == "request"), None)


# -- durability -----------------------------------------------------------------------------------


async def test_a_restart_on_the_sqlite_store_keeps_the_spend(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    meridian: Upstream,
    tmp_path: Path,
) -> None:
    store = {"kind": "sqlite", "path": str(tmp_path / "spend.db")}
    teams = {"search": {"budget": {"usd": "0.00003", "period": "monthly"}}}
    config = budget_config(gateway_config, store, teams)
    body = chat("fast", max_tokens=8)  # 10,000 nano-USD, estimate == cost
    first = await gateway_client(aiohttp_client, config, SEARCH)
    for _ in range(2):
        assert (await first.post(CHAT, json=body)).status == 200
    await settled(first, "search", 2, period="monthly")
    before = (await budgets_rows(first))[("search", None)]
    assert before["spent_nano_usd"] == 20_000
    await first.close()

    second = await gateway_client(aiohttp_client, config, SEARCH)
    after = (await budgets_rows(second))[("search", None)]
    assert after == before
    over = await second.post(CHAT, json=chat("fast", max_tokens=9))  # 11,250 > 10,000 left
    assert over.status == 429
    assert (await error_of(over))["code"] == "budget_exceeded"
    assert meridian.state.count(CHAT) == 2
    fits = await second.post(CHAT, json=body)  # exactly what is left
    assert fits.status == 200
    await settled(second, "search", 3, period="monthly")
    assert (await status_of(second, Scope("search"), "monthly")).spent == 30_000


# -- sidegate usage -------------------------------------------------------------------------------


async def test_sidegate_usage_prints_the_spend_of_a_sqlite_store(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    meridian: Upstream,
    tmp_path: Path,
) -> None:
    store = {"kind": "sqlite", "path": str(tmp_path / "usage.db")}
    config = budget_config(gateway_config, store, {"search": {"budget": AMPLE}})
    path = tmp_path / "sidegate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    client = await gateway_client(aiohttp_client, config, SEARCH)
    costs = []
    for body in (chat(max_tokens=3), chat("fast", max_tokens=5)):
        response = await client.post(CHAT, json=body)
        assert response.status == 200
        costs.append(token_cost(body["model"], **_tokens(await response.json())))
    await settled(client, "search", 2)
    await client.close()

    window = _window()
    proc = await asyncio.create_subprocess_exec(
        str(SIDEGATE),
        "usage",
        "--config",
        str(path),
        "--json",
        "--from",
        window["from"],
        "--to",
        window["to"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    [row] = report["budgets"]
    assert (row["team"], row["key_id"], row["period"]) == ("search", None, "total")
    assert row["spent_nano_usd"] == sum(costs)
    assert row["reserved_usd"] == 0
    assert row["limit_usd"] == 100
    search = report["usage"]["search"]["aggregate"]
    assert search["cost_nano_usd"] == sum(costs)
    assert search["requests"] == 2
    assert set(search["by_model"]) == {"meridian-1", "fast"}
    assert report["usage"]["platform"]["aggregate"]["requests"] == 0


def test_sidegate_usage_without_to_includes_a_request_made_this_second(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "usage.db"
    nowhere = "http://127.0.0.1:9"  # nothing is sent upstream here
    config = budget_config(
        base_config(nowhere, nowhere),
        {"kind": "sqlite", "path": str(db)},
        {"search": {"budget": AMPLE}},
    )
    path = tmp_path / "sidegate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    spent_at = datetime(2025, 6, 15, 12, 0, 0, 250_000, tzinfo=UTC)

    async def spend() -> None:
        stores = await open_stores("sqlite", path=str(db))
        try:
            scope = Scope("search")
            assert (await stores.budgets.reserve(scope, "total", 10**11, 500, "r", 60)).admitted
            entry = LedgerEntry(
                timestamp=spent_at,
                team="search",
                key_id="search-prod",
                upstream="meridian",
                model="meridian-1",
                kind="chat",
                prompt_tokens=1,
                completion_tokens=1,
                cost_nano=500,
                request_id="r",
            )
            assert await stores.budgets.commit(scope, "total", "r", 500, entry)
        finally:
            await stores.close()

    asyncio.run(spend())

    class HalfASecondLater(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> HalfASecondLater:  # type: ignore[override]
            later = spent_at + timedelta(milliseconds=500)
            return cls.fromtimestamp(later.timestamp(), tz)

    monkeypatch.setattr(cli, "datetime", HalfASecondLater)
    assert cli.main(["usage", "--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budgets"][0]["spent_nano_usd"] == 500
    assert report["usage"]["search"]["aggregate"]["cost_nano_usd"] == 500
