"""The embeddings cache inside the gateway: budgets, scopes, replicas sharing Redis, Redis down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.proxy.mock import Fault
from tests.conftest import (
    ADMIN,
    SEARCH,
    AiohttpClient,
    GatewayFactory,
    Upstream,
    gateway_client,
    redis_database,
)
from tests.proxy.serving import serve, write_yaml

Client = TestClient[web.Request, web.Application]
PRICES = {
    "meridian-embed-3": {"input": 1000},
    "meridian-1": {"input": 1, "output": 1},
    "meridian-1-turbo": {"input": 1, "output": 1},
    "meridian-whisper-1": {"per_request": 0.01},
    "meridian-image-1": {"per_image": 0.04},
    "llm.general.v1": {"input": 1, "output": 1},
    "embed.text.v1": {"input": 1},
}


def _body(items: list[str]) -> dict[str, Any]:
    return {"model": "meridian-embed-3", "input": items, "dimensions": 64}


def _sent(upstream: Upstream) -> list[str]:
    return list(orjson.loads(upstream.state.received[-1].body)["input"])


@pytest.fixture
def cached_config(gateway_config: dict[str, Any]) -> dict[str, Any]:
    teams = {
        "platform": {"budget": {"usd": 100, "period": "total"}},
        "search": {**gateway_config["teams"]["search"], "budget": {"usd": 100, "period": "total"}},
    }
    return {
        **gateway_config,
        "pricing": PRICES,
        "teams": teams,
        "cache": {"embeddings": {"ttl_s": 3600}},
    }


async def _spent(client: Client, team: str) -> float:
    rows = (await (await client.get("/admin/budgets", headers=ADMIN)).json())["data"]
    return float(next(row["spent_nano_usd"] for row in rows if row["team"] == team))


async def test_the_budget_is_charged_only_for_the_items_sent_upstream(
    aiohttp_client: AiohttpClient, cached_config: dict[str, Any], meridian: Upstream
) -> None:
    client = await gateway_client(aiohttp_client, cached_config)
    first = await client.post("/v1/embeddings", json=_body(["alpha", "beta"]))
    assert first.headers["x-sidegate-cache"] == "miss"
    usage_first = (await first.json())["usage"]["prompt_tokens"]
    spent_first = await _spent(client, "platform")
    assert spent_first == usage_first * 1000 * 1000  # $1000 per 1M tokens = 1000 nano per token

    partial = await client.post("/v1/embeddings", json=_body(["alpha", "gamma", "beta"]))
    assert partial.headers["x-sidegate-cache"] == "partial"
    assert partial.headers["x-sidegate-cache-hits"] == "2"
    assert _sent(meridian) == ["gamma"]
    body = await partial.json()
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    spent_partial = await _spent(client, "platform") - spent_first
    assert spent_partial == body["usage"]["prompt_tokens"] * 1000 * 1000

    calls = meridian.state.count("/v1/embeddings")
    hit = await client.post("/v1/embeddings", json=_body(["gamma", "alpha"]))
    assert hit.headers["x-sidegate-cache"] == "hit"
    assert meridian.state.count("/v1/embeddings") == calls
    assert (await hit.json())["usage"]["prompt_tokens"] == 0
    assert await _spent(client, "platform") == spent_first + spent_partial


async def test_a_hit_still_needs_auth_and_the_allowlist(
    aiohttp_client: AiohttpClient, cached_config: dict[str, Any], meridian: Upstream
) -> None:
    # A shared cache warmed by the admin team: the entry exists for anyone who may read it.
    teams = dict(cached_config["teams"])
    teams["search"] = {**teams["search"], "models": ["meridian-1", "fast"]}
    config = {
        **cached_config,
        "teams": teams,
        "cache": {"embeddings": {"ttl_s": 3600, "scope": "shared"}},
    }
    client = await gateway_client(aiohttp_client, config)
    warm = await client.post("/v1/embeddings", json=_body(["alpha"]), headers=ADMIN)
    assert warm.headers["x-sidegate-cache"] == "miss"
    hit = await client.post("/v1/embeddings", json=_body(["alpha"]), headers=ADMIN)
    assert hit.headers["x-sidegate-cache"] == "hit"

    wrong_key = {"Authorization": "Bearer sg-wrong-key-000000000000000000000000000"}
    refused = await client.post("/v1/embeddings", json=_body(["alpha"]), headers=wrong_key)
    assert refused.status == 401
    assert "x-sidegate-cache" not in refused.headers
    not_allowed = await client.post("/v1/embeddings", json=_body(["alpha"]), headers=SEARCH)
    assert not_allowed.status == 403
    assert (await not_allowed.json())["error"]["code"] == "model_not_allowed"
    assert "x-sidegate-cache" not in not_allowed.headers
    assert meridian.state.count("/v1/embeddings") == 1


@pytest.mark.parametrize(("scope", "shared"), [("team", False), ("shared", True)])
async def test_scope_team_keeps_teams_apart_and_shared_does_not(
    aiohttp_client: AiohttpClient,
    cached_config: dict[str, Any],
    meridian: Upstream,
    scope: str,
    shared: bool,
) -> None:
    config = {**cached_config, "cache": {"embeddings": {"ttl_s": 3600, "scope": scope}}}
    client = await gateway_client(aiohttp_client, config)
    await client.post("/v1/embeddings", json=_body(["a secret document"]), headers=ADMIN)
    probe = await client.post("/v1/embeddings", json=_body(["a secret document"]), headers=SEARCH)
    assert probe.status == 200
    assert probe.headers["x-sidegate-cache"] == ("hit" if shared else "miss")


async def test_two_gateway_processes_share_the_redis_cache(
    tmp_path: Path,
    cached_config: dict[str, Any],
    meridian: Upstream,
    unused_tcp_port_factory: Any,
) -> None:
    async with redis_database(11) as url:
        config = {
            **cached_config,
            "cache": {"embeddings": {"ttl_s": 3600, "backend": "redis", "redis_url": url}},
        }
        path = tmp_path / "sidegate.yaml"
        write_yaml(path, config)
        ports = unused_tcp_port_factory(), unused_tcp_port_factory()
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with (
            serve(path, ports[0], tmp_path / "a", headers=ADMIN) as first,
            serve(path, ports[1], tmp_path / "b", headers=ADMIN) as second,
        ):
            response, body = await first.post("/v1/embeddings", _body(["shared", "across"]))
            assert response.headers["x-sidegate-cache"] == "miss"
            calls = meridian.state.count("/v1/embeddings")
            response, again = await second.post("/v1/embeddings", _body(["across", "shared"]))
            assert response.headers["x-sidegate-cache"] == "hit"
            assert meridian.state.count("/v1/embeddings") == calls
            assert again["data"][0]["embedding"] == body["data"][1]["embedding"]


async def test_redis_down_the_request_still_goes_upstream(
    make_gateway: GatewayFactory, meridian: Upstream, unused_tcp_port: int
) -> None:
    cache = {
        "embeddings": {
            "backend": "redis",
            "redis_url": f"redis://127.0.0.1:{unused_tcp_port}/0",
        }
    }
    client = await make_gateway(cache=cache)
    for _ in range(2):
        response = await client.post("/v1/embeddings", json=_body(["still answers"]))
        assert response.status == 200
        assert response.headers["x-sidegate-cache"] == "miss"
    assert meridian.state.count("/v1/embeddings") == 2


async def test_upstream_errors_are_not_cached(
    make_gateway: GatewayFactory, meridian: Upstream
) -> None:
    client = await make_gateway(cache={"embeddings": {}})
    meridian.state.script(Fault(status=500), path="/v1/embeddings")
    assert (await client.post("/v1/embeddings", json=_body(["x"]))).status == 500
    retry = await client.post("/v1/embeddings", json=_body(["x"]))
    assert retry.status == 200
    assert retry.headers["x-sidegate-cache"] == "miss"
