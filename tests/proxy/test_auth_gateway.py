"""Auth in the gateway: every route needs a caller, allowlists hold, secrets never leave."""

from __future__ import annotations

import io
import re
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.config.models import SidegateConfig
from sidegate.middlewares.api_keys import hash_key
from sidegate.proxy.app import create_app, held_secrets
from sidegate.proxy.logs import configure_logging
from sidegate.proxy.mock import Fault
from tests.conftest import (
    ADMIN,
    ADMIN_KEY,
    MEIVAN_SECRET,
    MERIDIAN_SECRET,
    SEARCH,
    SEARCH_KEY,
    AiohttpClient,
    AiohttpServer,
    GatewayFactory,
    Upstream,
    base_config,
)

Client = TestClient[web.Request, web.Application]
OPEN = {("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/readyz"), ("HEAD", "/readyz")}
CHAT = {"model": "meridian-1", "messages": [{"role": "user", "content": "hi"}]}


def _routes(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, concrete path) the app serves, from its router; not the refusals: the
    catch-all 404 resource, and a resource's ``*`` route beside its own methods (405)."""
    walked = []
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if resource.canonical == "/{tail}" or (route.method == "*" and len(resource) > 1):
            continue
        info = resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        path = path.replace("{name}", "meridian").replace("{tail}", "models")
        methods = ["GET", "POST", "PUT", "DELETE"] if route.method == "*" else [route.method]
        walked += [(method, path) for method in methods]
    return walked


@pytest.mark.parametrize("metrics_role", [None, "ops"])
async def test_every_route_requires_auth_except_the_open_ones(
    aiohttp_client: AiohttpClient, gateway_config: dict[str, Any], metrics_role: str | None
) -> None:
    config = {**gateway_config, "auth": {**gateway_config["auth"], "metrics_role": metrics_role}}
    app = create_app(SidegateConfig.model_validate(config))
    client = await aiohttp_client(app)
    routes = _routes(app)
    assert len(routes) >= 16
    open_routes = OPEN | (
        {("GET", "/metrics"), ("HEAD", "/metrics")} if not metrics_role else set()
    )
    for method, path in routes:
        response = await client.request(method, path, json={"model": "meridian-1"})
        if (method, path) in open_routes:
            assert response.status == 200, (method, path)
        else:
            assert response.status == 401, (method, path, response.status)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="sidegate"'
            if method != "HEAD":
                assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert open_routes <= set(routes)


async def test_metrics_behind_a_role(
    make_gateway: GatewayFactory, gateway_config: dict[str, Any]
) -> None:
    auth = {**gateway_config["auth"], "metrics_role": "admin"}
    gateway = await make_gateway(auth=auth)
    assert (await gateway.get("/metrics")).status == 200
    refused = await gateway.get("/metrics", headers=SEARCH)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "role_required"


async def test_a_key_restricted_to_some_models_cannot_call_another(
    gateway: Client, meridian: Upstream
) -> None:
    allowed = await gateway.post("/v1/chat/completions", json=CHAT, headers=SEARCH)
    assert allowed.status == 200
    via_alias = {**CHAT, "model": "fast"}
    assert (
        await gateway.post("/v1/chat/completions", json=via_alias, headers=SEARCH)
    ).status == 200
    refused = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "meridian-1-turbo"}, headers=SEARCH
    )
    assert refused.status == 403
    error = (await refused.json())["error"]
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    meivan = await gateway.post(
        "/v1/complete",
        json={"service_id": "general", "messages": [{"role": "user", "content": "x"}]},
        headers=SEARCH,
    )
    assert meivan.status == 403
    assert (await meivan.json())["error"]["param"] == "service_id"
    assert meridian.state.count("/v1/chat/completions") == 2


async def test_two_teams_see_different_models_and_services(gateway: Client) -> None:
    async def ids(path: str, headers: dict[str, str], field: str) -> list[str]:
        body = await (await gateway.get(path, headers=headers)).json()
        return [item[field] for item in body["data"]]

    assert await ids("/v1/models", SEARCH, "id") == ["meridian-1", "meridian-embed-3", "fast"]
    assert len(await ids("/v1/models", ADMIN, "id")) == 7
    assert await ids("/v1/services", SEARCH, "service_id") == ["embed.text.v1"]
    assert await ids("/v1/services", ADMIN, "service_id") == [
        "llm.general.v1",
        "embed.text.v1",
        "general",
    ]


async def test_passthrough_needs_the_admin_role(gateway: Client, meridian: Upstream) -> None:
    refused = await gateway.get("/upstreams/meridian/v1/models", headers=SEARCH)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "admin_required"
    assert (await gateway.get("/upstreams/meridian/v1/models", headers=ADMIN)).status == 200
    assert meridian.state.count() == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [({"expires": "2020-01-01T00:00:00Z"}, "expired"), ({"disabled": True}, "disabled")],
)
async def test_expired_and_disabled_keys_are_refused(
    make_gateway: GatewayFactory,
    gateway_config: dict[str, Any],
    change: dict[str, Any],
    message: str,
) -> None:
    keys = [dict(key) for key in gateway_config["auth"]["api_keys"]]
    keys[1].update(change)
    gateway = await make_gateway(auth={"api_keys": keys})
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=SEARCH)
    assert response.status == 401
    assert message in (await response.json())["error"]["message"]


async def test_a_debug_cycle_with_upstream_errors_logs_no_secret(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    meridian: Upstream,
    meivan: Upstream,
    log_output: io.StringIO,
) -> None:
    async def echo_credentials(request: web.Request) -> web.Response:
        body = {"error": {"message": f"Incorrect key {request.headers['Authorization']}"}}
        return web.json_response(body, status=401)

    leaky = web.Application()
    leaky.router.add_route("*", "/{tail:.*}", echo_credentials)
    leaky_server = await aiohttp_server(leaky)
    config = base_config(meridian.url, meivan.url)
    config["upstreams"]["leaky"] = {
        "kind": "meridian",
        "base_url": str(leaky_server.make_url("")),
        "keys": [{"id": "leaky-key", "secret": "sk-leaky-upstream-secret-42"}],
        "models": ["leaky-1"],
    }
    app = create_app(SidegateConfig.model_validate(config))
    configure_logging(
        "debug", "json", secrets=lambda: held_secrets(app), stream=log_output, cache=False
    )
    client = await aiohttp_client(app)

    meridian.state.script(Fault(status=429, retry_after=1), Fault(status=500), Fault(status=503))
    for headers in (ADMIN, SEARCH, {"x-api-key": ADMIN_KEY}, {"api-key": SEARCH_KEY}):
        await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    await client.post("/v1/chat/completions", json={**CHAT, "model": "leaky-1"}, headers=ADMIN)
    await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": ADMIN_KEY + "x"})
    await client.get("/upstreams/meivan/v1/usage", headers=ADMIN)
    structlog.get_logger("test").debug("headers", authorization=f"Bearer {ADMIN_KEY}")

    output = log_output.getvalue()
    lines = [orjson.loads(line) for line in output.splitlines()]
    assert any(line.get("event") == "upstream_error" for line in lines)
    assert any(line.get("status") == 401 for line in lines)
    for secret in (
        ADMIN_KEY,
        SEARCH_KEY,
        MERIDIAN_SECRET,
        MEIVAN_SECRET,
        "sk-leaky-upstream-secret-42",
        hash_key(ADMIN_KEY).split(":")[1],
    ):
        assert secret not in output
    assert re.search(r"sg-[A-Za-z0-9_-]{16,}", output) is None
    assert "[redacted]" in output


async def test_jwt_callers_through_the_gateway(
    make_gateway: GatewayFactory, gateway_config: dict[str, Any], meridian: Upstream
) -> None:
    import time

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    auth = {
        **gateway_config["auth"],
        "jwt": {
            "issuer": "https://idp.example/",
            "audience": "sidegate",
            "algorithms": ["RS256"],
            "public_key": public_pem,
            "team_claim": "org.team",
            "roles_claim": "realm_access.roles",
        },
    }
    gateway = await make_gateway(auth=auth)

    def token(**claims: Any) -> dict[str, str]:
        payload = {
            "iss": "https://idp.example/",
            "aud": "sidegate",
            "sub": "alice",
            "exp": int(time.time()) + 300,
            **claims,
        }
        return {"Authorization": f"Bearer {jwt.encode(payload, private, algorithm='RS256')}"}

    search = token(org={"team": "search"}, realm_access={"roles": ["user"]})
    models = await (await gateway.get("/v1/models", headers=search)).json()
    assert [m["id"] for m in models["data"]] == ["meridian-1", "meridian-embed-3", "fast"]
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=search)).status == 200
    refused = await gateway.get("/upstreams/meridian/v1/models", headers=search)
    assert refused.status == 403
    admin = token(org={"team": "platform"}, realm_access={"roles": ["admin"]})
    assert (await gateway.get("/upstreams/meridian/v1/models", headers=admin)).status == 200
    stranger = await gateway.get("/v1/models", headers=token(org={"team": "nobody"}))
    assert stranger.status == 403
    expired = await gateway.get(
        "/v1/models", headers=token(org={"team": "search"}, exp=int(time.time()) - 600)
    )
    assert expired.status == 401
    assert (await expired.json())["error"]["code"] == "invalid_token"
    assert "invalid_token" in expired.headers["WWW-Authenticate"]
