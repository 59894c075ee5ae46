"""Each config runs only the policies that can act under it; leaving one out changes nothing a
client can see."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import ClientResponse, web
from aiohttp.client_middlewares import ClientMiddlewareType
from aiohttp.test_utils import TestClient

from sidegate.config.resilience import RetryConfig
from sidegate.middlewares.keys import KeyPools, KeySpec, PoolSpec, key_rotation_middleware
from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.retry import retry_middleware
from sidegate.proxy import create_app, reload_config
from sidegate.proxy.mock import Fault
from sidegate.proxy.state import STATE_KEY
from tests.conftest import (
    ADMIN_KEY,
    DEMO,
    SEARCH,
    AiohttpClient,
    AiohttpServer,
    GatewayFactory,
    Upstream,
    base_config,
)

Client = TestClient[web.Request, web.Application]
DEMO_CONFIG = Path(__file__).parents[2] / "examples" / "demo.yaml"
CHAT = {"model": "meridian-1", "messages": [{"role": "user", "content": "hi"}]}
USAGE = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z", "granularity": "month"}
BARE = ("auth", "routing", "ratelimit_headers", "retry", "key_rotation")
# What differs between two answers of the same mock for reasons of time or order, not the chain.
VOLATILE = {
    "date",
    "x-request-id",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
}


def _names(client: Client) -> tuple[str, ...]:
    active = client.app[STATE_KEY].active
    assert active is not None
    return active.names


async def test_the_bare_config_runs_only_the_policies_it_needs(gateway: Client) -> None:
    # No budget, rate limit or price anywhere: limits could not act on any request.
    assert _names(gateway) == BARE
    # Retry runs key rotation's part itself: one client middleware, one coroutine, for both.
    active = gateway.app[STATE_KEY].active
    assert active is not None
    assert len(active.client_middlewares) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        {"teams": {"platform": {"budget": {"usd": 10}}, "search": {}}},
        {"teams": {"platform": {}, "search": {"rate_limit": {"requests_per_minute": 60}}}},
        {"pricing": {"meridian-embed-3": {"input": 0.02}}},
    ],
    ids=["budget", "rate-limit", "price"],
)
async def test_limits_join_the_chain_with_a_budget_a_rate_limit_or_a_price(
    make_gateway: GatewayFactory, overrides: dict[str, Any]
) -> None:
    gateway = await make_gateway(**overrides)
    assert _names(gateway) == (*BARE[:2], "limits", *BARE[2:])


async def test_key_rotation_only_when_an_upstream_has_keys(aiohttp_client: AiohttpClient) -> None:
    # The demo's built-in mocks have no keys: the stand-in mock key goes with the target.
    client = await aiohttp_client(create_app(DEMO_CONFIG), headers=DEMO)
    assert _names(client) == BARE[:-1]
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    assert response.headers["x-sidegate-attempts"] == "1"


async def _seen(response: ClientResponse) -> tuple[int, list[tuple[str, str]], Any]:
    """Status, headers (names in order; values unless volatile) and the body, less mock ids."""
    body = await response.read()
    headers = [
        (name.lower(), "" if name.lower() in VOLATILE else value)
        for name, value in response.headers.items()
    ]
    if response.content_type == "application/json":
        parsed = orjson.loads(body)
        if isinstance(parsed, dict):
            parsed.pop("id", None)
            parsed.pop("created", None)
        return response.status, headers, parsed
    return response.status, headers, body.count(b"data: ")


async def _answers(client: Client) -> list[tuple[int, list[tuple[str, str]], Any]]:
    return [
        await _seen(await client.post("/v1/chat/completions", json=CHAT)),
        await _seen(await client.post("/v1/chat/completions", json={**CHAT, "stream": True})),
        await _seen(await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})),
        await _seen(
            await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "x"})
        ),
        await _seen(await client.post("/v1/chat/completions", json=CHAT, headers=SEARCH)),
        await _seen(await client.get("/v1/models")),
        await _seen(await client.get("/v1/usage", params=USAGE)),  # the ledger: nothing charged
    ]


async def test_leaving_limits_out_changes_no_response(make_gateway: GatewayFactory) -> None:
    without = await make_gateway()
    # A price for another model only: limits is in the chain but has nothing to do for chat.
    inert = await make_gateway(pricing={"meridian-embed-3": {"input": 0.02}})
    assert "limits" not in _names(without)
    assert "limits" in _names(inert)
    assert await _answers(without) == await _answers(inert)


async def test_a_single_attempt_still_validates_counts_and_reports(
    gateway: Client, meridian: Upstream
) -> None:
    meridian.state.script(Fault(status=503, retry_after=3), path="/v1/chat/completions")
    before = len(meridian.state.received)
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 503
    assert response.headers["Retry-After"] == "3"
    assert response.headers["x-sidegate-attempts"] == "1"
    assert "x-should-retry" not in response.headers
    assert (await response.json())["error"]["type"]
    assert len(meridian.state.received) == before + 1
    metrics = await (await gateway.get("/metrics")).text()
    assert 'sidegate_upstream_retry_stops_total{failure="503",reason="max_attempts"} 1.0' in metrics
    bad = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "x" * 256}
    )
    assert bad.status == 400
    assert (await bad.json())["error"]["code"] == "invalid_idempotency_key"
    assert len(meridian.state.received) == before + 1


@pytest.mark.parametrize(
    ("mode", "strategy", "readings"),
    [
        ("passthrough", "round_robin", False),
        ("strip", "weighted", False),
        ("team", "round_robin", True),
        ("passthrough", "least_limited", True),
    ],
)
async def test_key_pools_keep_readings_only_when_something_reads_them(
    make_gateway: GatewayFactory,
    gateway_config: dict[str, Any],
    mode: str,
    strategy: str,
    readings: bool,
) -> None:
    upstreams = copy.deepcopy(gateway_config["upstreams"])
    upstreams["meridian"]["key_strategy"] = strategy
    gateway = await make_gateway(upstreams=upstreams, rate_limit_headers={"mode": mode})
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    assert "x-ratelimit-limit-requests" in response.headers or mode == "strip"
    (status,) = gateway.app[STATE_KEY].key_pools.snapshot()["meridian"]
    assert (status.limits.limit_requests is not None) is readings


async def test_a_reload_builds_new_principals_for_the_same_key(
    aiohttp_client: AiohttpClient, meridian: Upstream, meivan: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "sidegate.yaml"
    config = base_config(meridian.url, meivan.url)
    path.write_text(yaml.safe_dump(config))
    app = create_app(path)
    client = await aiohttp_client(app, headers=SEARCH)
    fast = {**CHAT, "model": "fast"}
    assert (await client.post("/v1/chat/completions", json=fast)).status == 200

    config["teams"]["search"]["models"] = ["meridian-1"]
    path.write_text(yaml.safe_dump(config))
    assert await reload_config(app) is True
    refused = await client.post("/v1/chat/completions", json=fast)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "model_not_allowed"
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def _raw_status(client: Client, target: str) -> int:
    """The status of ``GET target`` sent byte for byte (a client library would normalise it)."""
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            f"Authorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_a_remembered_path_lets_no_unsafe_one_through(
    gateway: Client, meridian: Upstream
) -> None:
    for target, status in [
        ("/upstreams/meridian/v1/models", 200),
        ("/upstreams/meridian/v1/%2e%2e/%2e%2e/admin", 400),
        ("/upstreams/meridian/v1/models", 200),
        ("/upstreams/meridian/v1/a%2F..%2Fadmin", 400),
        ("/upstreams/meridian/v1/a%2F..%2Fadmin", 400),
    ]:
        assert await _raw_status(gateway, target) == status, target
    assert [r.path for r in meridian.state.received] == ["/v1/models", "/v1/models"]


async def test_retry_running_key_rotation_sends_every_attempt_as_the_two_apart_would(
    aiohttp_server: AiohttpServer,
) -> None:
    """The gateway's one client middleware (retry with ``keys=``) against retry outside key
    rotation, as aiohttp runs two: the same attempts, with the same keys, the same outcome."""
    seen: list[str | None] = []

    async def flaky(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=503 if len(seen) % 3 != 0 else 200, text="ok")

    upstream = web.Application()
    upstream.router.add_post("/", flaky)
    server = await aiohttp_server(upstream)
    settings = RetryConfig(max_attempts=4, base_delay_s=0.0, max_delay_s=0.0)
    runs = []
    for fused in (False, True):
        pools = KeyPools()
        pools.rebuild({"up": PoolSpec([KeySpec("a", "sk-a"), KeySpec("b", "sk-b")])})
        retry = retry_middleware(settings, keys=pools.resolve if fused else None)
        middlewares: tuple[ClientMiddlewareType, ...] = (
            (retry,) if fused else (retry, key_rotation_middleware(pools.resolve))
        )
        seen.clear()
        async with aiohttp.ClientSession(middlewares=middlewares) as session:
            with outbound_scope(Outbound(upstream="up")) as outbound:
                async with session.post(server.make_url("/")) as response:
                    status = response.status
        runs.append((list(seen), status, outbound.attempts, outbound.key_ids))
    expected = (["Bearer sk-a", "Bearer sk-b", "Bearer sk-a"], 200, 3, ["a", "b", "a"])
    assert runs[0] == runs[1] == expected
