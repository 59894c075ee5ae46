"""Retry, key rotation, idempotency and rate-limit headers, end to end through the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.proxy import create_app, reload_config
from sidegate.proxy.mock import Fault
from tests.conftest import ADMIN, AiohttpClient, GatewayFactory, Upstream

Client = TestClient[web.Request, web.Application]
CHAT = {"model": "meridian-1", "messages": [{"role": "user", "content": "hi"}]}
COMPLETE = {"service_id": "llm.general.v1", "messages": [{"role": "user", "content": "hi"}]}
FAST_RETRY = {"max_attempts": 3, "base_delay_s": 0, "max_delay_s": 0, "deadline_s": 5}


def _keys(*ids: str) -> list[dict[str, str]]:
    return [{"id": key_id, "secret": f"sk-{key_id}-0123456789abcdef"} for key_id in ids]


def _bearer(key_id: str) -> str:
    return f"Bearer sk-{key_id}-0123456789abcdef"


def _with_keys(config: dict[str, Any], upstream: str, *ids: str, **extra: Any) -> dict[str, Any]:
    upstreams = dict(config["upstreams"])
    upstreams[upstream] = {**upstreams[upstream], "keys": _keys(*ids), **extra}
    return upstreams


@pytest.fixture
async def two_keys(make_gateway: GatewayFactory, gateway_config: dict[str, Any]) -> Client:
    upstreams = _with_keys(gateway_config, "meridian", "a", "b")
    return await make_gateway(upstreams=upstreams, retry=FAST_RETRY)


async def test_a_429_on_one_key_is_retried_at_once_on_another(
    two_keys: Client, meridian: Upstream
) -> None:
    meridian.state.script(Fault(status=429, retry_after=30), path="/v1/chat/completions")
    response = await two_keys.post("/v1/chat/completions", json=CHAT)
    # Waiting 30 s would overrun the 5 s deadline and return the 429: a 200 means no wait.
    assert response.status == 200
    assert response.headers["x-sidegate-attempts"] == "2"
    assert "x-should-retry" not in response.headers
    first, second = meridian.state.received[-2:]
    assert first.headers["Authorization"] == _bearer("a")
    assert second.headers["Authorization"] == _bearer("b")
    assert first.body == second.body


async def test_all_keys_cooling_down_is_a_429_with_the_earliest_retry_after(
    two_keys: Client, meridian: Upstream
) -> None:
    meridian.state.script(
        Fault(status=429, retry_after=40),
        Fault(status=429, retry_after=30),
        path="/v1/chat/completions",
    )
    response = await two_keys.post("/v1/chat/completions", json=CHAT)
    assert response.status == 429
    assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert meridian.state.count("/v1/chat/completions") == 2
    again = await two_keys.post("/v1/chat/completions", json=CHAT)
    assert again.status == 429
    assert (await again.json())["error"]["code"] == "upstream_rate_limited"
    assert meridian.state.count("/v1/chat/completions") == 2


async def test_a_401_quarantines_the_key_and_shows_it(two_keys: Client, meridian: Upstream) -> None:
    meridian.state.script(Fault(status=401), path="/v1/chat/completions")
    refused = await two_keys.post("/v1/chat/completions", json=CHAT)
    assert refused.status == 401
    assert refused.headers["x-sidegate-attempts"] == "1"
    for _ in range(3):
        assert (await two_keys.post("/v1/chat/completions", json=CHAT)).status == 200
    used = [r.headers["Authorization"] for r in meridian.state.received[-3:]]
    assert used == [_bearer("b")] * 3
    ready = await (await two_keys.get("/readyz")).json()
    states = {key["id"]: key["state"] for key in ready["keys"]["meridian"]}
    assert states == {"a": "quarantined", "b": "active"}
    metrics = await (await two_keys.get("/metrics")).text()
    assert (
        'sidegate_upstream_key_state{key="a",state="quarantined",upstream="meridian"} 1.0'
        in metrics
    )
    assert "sk-a-0123456789abcdef" not in metrics


async def test_503s_are_retried_and_a_give_up_says_do_not_retry(
    two_keys: Client, meridian: Upstream
) -> None:
    meridian.state.script(Fault(status=503), path="/v1/chat/completions")
    recovered = await two_keys.post("/v1/chat/completions", json=CHAT)
    assert recovered.status == 200
    assert recovered.headers["x-sidegate-attempts"] == "2"
    meridian.state.script(*[Fault(status=503)] * 3, path="/v1/chat/completions")
    failed = await two_keys.post("/v1/chat/completions", json=CHAT)
    assert failed.status == 503
    assert failed.headers["x-sidegate-attempts"] == "3"
    assert failed.headers["x-should-retry"] == "false"
    metrics = await (await two_keys.get("/metrics")).text()
    assert 'sidegate_upstream_retries_total{failure="503"} 3.0' in metrics


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_4xx_are_never_retried(
    two_keys: Client, meridian: Upstream, status: int
) -> None:
    meridian.state.script(Fault(status=status), path="/v1/chat/completions")
    response = await two_keys.post("/v1/chat/completions", json=CHAT)
    assert response.status == status
    assert meridian.state.count("/v1/chat/completions") == 1


async def test_a_stream_cut_after_two_events_is_not_retried(
    two_keys: Client, meridian: Upstream
) -> None:
    meridian.state.script(Fault(reset_after_events=2), path="/v1/chat/completions")
    response = await two_keys.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert meridian.state.count("/v1/chat/completions") == 1


async def test_a_retried_meivan_post_carries_one_generated_idempotency_key_and_one_key(
    make_gateway: GatewayFactory, gateway_config: dict[str, Any], meivan: Upstream
) -> None:
    upstreams = _with_keys(gateway_config, "meivan", "m1", "m2")
    gateway = await make_gateway(upstreams=upstreams, retry=FAST_RETRY)
    meivan.state.script(Fault(status=503), Fault(status=503), path="/v1/complete")
    response = await gateway.post("/v1/complete", json=COMPLETE)
    assert response.status == 200
    attempts = meivan.state.received[-3:]
    idempotency = {r.headers["Idempotency-Key"] for r in attempts}
    assert len(idempotency) == 1
    assert len(idempotency.pop()) == 36
    assert len({r.headers["Authorization"] for r in attempts}) == 1
    own = await gateway.post("/v1/complete", json=COMPLETE, headers={"Idempotency-Key": "mine-1"})
    assert own.status == 200
    assert meivan.state.received[-1].headers["Idempotency-Key"] == "mine-1"


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        [("Idempotency-Key", "x" * 256)],
    ],
)
async def test_bad_idempotency_keys_are_400(
    two_keys: Client, meridian: Upstream, headers: list[tuple[str, str]]
) -> None:
    from multidict import CIMultiDict

    response = await two_keys.post(
        "/v1/chat/completions", json=CHAT, headers=CIMultiDict([*ADMIN.items(), *headers])
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_idempotency_key"
    assert meridian.state.count() == 0


async def test_a_key_added_by_reload_is_used_without_restart(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    tmp_path: Path,
    meridian: Upstream,
) -> None:
    path = tmp_path / "sidegate.yaml"
    config = {**gateway_config, "upstreams": _with_keys(gateway_config, "meridian", "a")}
    path.write_text(yaml.safe_dump(config))
    app = create_app(path)
    client = await aiohttp_client(app, headers=ADMIN)
    await client.post("/v1/chat/completions", json=CHAT)
    assert meridian.state.received[-1].headers["Authorization"] == _bearer("a")
    config["upstreams"] = _with_keys(gateway_config, "meridian", "a", "b")
    path.write_text(yaml.safe_dump(config))
    assert await reload_config(app)
    for _ in range(2):
        await client.post("/v1/chat/completions", json=CHAT)
    used = {r.headers["Authorization"] for r in meridian.state.received[-2:]}
    assert used == {_bearer("a"), _bearer("b")}


RATELIMIT = [
    f"x-ratelimit-{f}-{k}" for f in ("limit", "remaining", "reset") for k in ("requests", "tokens")
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["passthrough", "team", "strip"])
async def test_rate_limit_header_modes_on_json_and_sse(
    make_gateway: GatewayFactory,
    gateway_config: dict[str, Any],
    meridian: Upstream,
    mode: str,
    stream: bool,
) -> None:
    upstreams = _with_keys(gateway_config, "meridian", "a", "b")
    gateway = await make_gateway(upstreams=upstreams, rate_limit_headers={"mode": mode})
    for _ in range(2):  # both keys have been seen once
        await gateway.post("/v1/chat/completions", json=CHAT)
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": stream}, headers={"x-request-id": mode}
    )
    await response.read()
    assert response.headers["x-request-id"] == mode  # streamed or not, the response is stamped
    present = [name for name in RATELIMIT if name in response.headers]
    if mode == "strip":
        assert present == []
        return
    assert present == RATELIMIT
    limit = int(response.headers["x-ratelimit-limit-requests"])
    remaining = int(response.headers["x-ratelimit-remaining-requests"])
    upstream_limit = meridian.state.rate.limit_requests
    if mode == "passthrough":
        assert limit == upstream_limit
    else:  # the aggregate over the upstream's two healthy keys
        assert limit == 2 * upstream_limit
    assert 0 <= remaining <= limit


async def test_every_429_carries_a_retry_after_consistent_with_its_body(
    gateway: Client, meridian: Upstream
) -> None:
    meridian.state.script(
        Fault(status=429, body=b'{"error": {"type": "rate_limit_exceeded"}, "retry-after": 7}'),
        path="/v1/chat/completions",
    )
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
