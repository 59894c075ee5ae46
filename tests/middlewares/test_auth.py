"""auth_middleware alone on a bare aiohttp app: API keys, headers, Principal, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.middlewares.api_keys import ApiKey, ApiKeyTable, hash_key, new_key
from sidegate.middlewares.auth import auth_middleware
from sidegate.middlewares.contract import PRINCIPAL_KEY
from sidegate.middlewares.errors import error_middleware
from tests.conftest import AiohttpClient

Client = TestClient[web.Request, web.Application]
PEPPER = b"pepper-0123456789abcdef"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
GOOD = new_key()
PEPPERED = new_key()
EXPIRED = new_key()
DISABLED = new_key()
NARROW = new_key()
STRANGER = new_key()


def _table() -> ApiKeyTable:
    return ApiKeyTable(
        [
            ApiKey("good", "search", hash_key(GOOD), roles=frozenset({"admin"})),
            ApiKey("peppered", "search", hash_key(PEPPERED, PEPPER)),
            ApiKey("expired", "search", hash_key(EXPIRED), expires=NOW - timedelta(seconds=1)),
            ApiKey("disabled", "search", hash_key(DISABLED), disabled=True),
            ApiKey("narrow", "search", hash_key(NARROW), models=frozenset({"meridian-1", "x"})),
            ApiKey("stranger", "elsewhere", hash_key(STRANGER)),
        ],
        pepper=PEPPER,
    )


async def whoami(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL_KEY]
    return web.json_response(
        {
            "team": principal.team,
            "key_id": principal.key_id,
            "roles": sorted(principal.roles),
            "models": sorted(principal.models) if principal.models is not None else None,
        }
    )


async def opened(request: web.Request) -> web.Response:
    return web.Response(text="open")


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    app = web.Application(
        middlewares=[
            error_middleware,
            auth_middleware(
                api_keys=_table(),
                teams={"search": frozenset({"meridian-1", "fast"})},
                clock=lambda: NOW,
            ),
        ]
    )
    app.router.add_get("/whoami", whoami)
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {GOOD}"},
        {"Authorization": f"bearer   {GOOD}"},
        {"api-key": GOOD},
        {"x-api-key": GOOD},
    ],
)
async def test_a_valid_key_in_any_accepted_header_yields_the_principal(
    client: Client, headers: dict[str, str]
) -> None:
    response = await client.get("/whoami", headers=headers)
    assert response.status == 200
    assert await response.json() == {
        "team": "search",
        "key_id": "good",
        "roles": ["admin"],
        "models": ["fast", "meridian-1"],
    }


async def test_peppered_hashes_and_key_model_subsets(client: Client) -> None:
    peppered = await client.get("/whoami", headers={"Authorization": f"Bearer {PEPPERED}"})
    assert (await peppered.json())["key_id"] == "peppered"
    narrow = await client.get("/whoami", headers={"Authorization": f"Bearer {NARROW}"})
    assert (await narrow.json())["models"] == ["meridian-1"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "No API key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
        ({"Authorization": "Bearer "}, "Bearer"),
        ({"Authorization": f"Bearer {GOOD}x"}, "not valid"),
        ({"Authorization": "Bearer sk-not-ours-at-all"}, "not valid"),
        ({"Authorization": f"Bearer {EXPIRED}"}, "expired"),
        ({"Authorization": f"Bearer {DISABLED}"}, "disabled"),
        ({"Authorization": "Bearer a.b.c"}, "not valid"),
    ],
)
async def test_refusals_are_401_with_www_authenticate_and_never_echo_the_key(
    client: Client, headers: dict[str, str], message: str
) -> None:
    response = await client.get("/whoami", headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="sidegate"'
    error = (await response.json())["error"]
    assert error["code"] == "invalid_api_key"
    assert message in error["message"]
    text = await response.text()
    presented = next(iter(headers.values()), "").removeprefix("Bearer ").strip()
    if presented:
        assert presented not in text


async def test_a_key_of_an_unconfigured_team_is_403(client: Client) -> None:
    response = await client.get("/whoami", headers={"x-api-key": STRANGER})
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "team_not_allowed"


async def test_exempt_routes_need_no_key(aiohttp_client: AiohttpClient) -> None:
    app = web.Application(
        middlewares=[
            error_middleware,
            auth_middleware(api_keys=_table(), exempt=lambda r: r.path == "/open"),
        ]
    )
    app.router.add_get("/open", opened)
    app.router.add_get("/whoami", whoami)
    client = await aiohttp_client(app)
    assert (await client.get("/open")).status == 200
    assert (await client.get("/whoami")).status == 401


def test_keys_are_high_entropy_and_prefixed() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("sg-") and len(k) == 46 for k in keys)
    assert hash_key(GOOD).startswith("sha256:")
    assert hash_key(GOOD, PEPPER).startswith("hmac-sha256:")
    assert hash_key(GOOD) != hash_key(GOOD, PEPPER)
