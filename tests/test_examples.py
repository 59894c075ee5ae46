"""The examples run as documented: the mounted app, and the demo config served from its file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.config import load_config
from sidegate.proxy.app import create_app
from sidegate.proxy.mock import MERIDIAN_MODELS, vector
from sidegate.proxy.mock.embeddings import canonical_items
from tests.conftest import DEMO, AiohttpClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_CONFIG = EXAMPLES / "demo.yaml"
DEMO_MERIDIAN_IDS = {
    "meridian-1",
    "meridian-1-turbo",
    "meridian-embed-3",
    "meridian-whisper-1",
    "meridian-image-1",
    "fast",
}
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hello mounted world"}]}
ENVELOPE_FIELDS = {"type", "message", "param", "code"}

Client = TestClient[web.Request, web.Application]


def _load_example(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sidegate_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture
def mounted_app() -> ModuleType:
    return _load_example("mounted_app")


@pytest.fixture
async def mounted(mounted_app: ModuleType, aiohttp_client: AiohttpClient) -> Client:
    app = mounted_app.make_app()
    assert isinstance(app, web.Application)
    return await aiohttp_client(app, headers=DEMO)


def _embedding(text: str, dimensions: int) -> list[float]:
    """What the mock embeds ``text`` as: the vector of its canonical item."""
    [(item, _)] = canonical_items(text)
    return vector(item, dimensions)


def _assert_envelope(body: Any, code: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == ENVELOPE_FIELDS
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


# -- examples/mounted_app.py -----------------------------------------------------------------------


async def test_mounted_app_serves_its_own_route(mounted: Client) -> None:
    response = await mounted.get("/hello")
    assert response.status == 200
    assert await response.json() == {"app": "mine"}
    assert "x-request-id" not in response.headers  # sidegate's middlewares stay under /llm


async def test_mounted_app_lists_the_demo_models_under_the_prefix(mounted: Client) -> None:
    response = await mounted.get("/llm/v1/models")
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    assert {model["id"] for model in body["data"]} == DEMO_MERIDIAN_IDS
    assert response.headers["x-request-id"]


async def test_mounted_app_forwards_a_chat_completion(mounted: Client) -> None:
    response = await mounted.post("/llm/v1/chat/completions", json=CHAT)
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "meridian-1-turbo"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["total_tokens"] > 0


async def test_mounted_app_health_under_the_prefix(mounted: Client) -> None:
    response = await mounted.get("/llm/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    ready = await mounted.get("/llm/readyz")
    assert ready.status == 200
    assert (await ready.json())["upstreams"] == ["meivan", "meridian"]


async def test_a_sidegate_error_under_the_prefix_is_an_envelope(mounted: Client) -> None:
    response = await mounted.post(
        "/llm/v1/chat/completions", json={**CHAT, "model": "no-such-model"}
    )
    assert response.status == 404
    assert response.content_type == "application/json"
    error = _assert_envelope(await response.json(), "model_not_found")
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "no-such-model" in error["message"]


async def test_an_unknown_path_under_the_prefix_is_a_sidegate_404(mounted: Client) -> None:
    response = await mounted.get("/llm/v1/nothing-here")
    assert response.status == 404
    _assert_envelope(await response.json(), "not_found")


async def test_the_apps_own_404_is_not_touched_by_sidegate(mounted: Client) -> None:
    response = await mounted.get("/nothing-here")
    assert response.status == 404
    assert response.content_type == "text/plain"
    assert await response.text() == "404: Not Found"
    assert "x-request-id" not in response.headers


async def test_mounted_app_passes_through_to_a_named_upstream(mounted: Client) -> None:
    response = await mounted.get("/llm/upstreams/meridian/v1/models")
    assert response.status == 200
    body = await response.json()
    assert {model["id"] for model in body["data"]} == set(MERIDIAN_MODELS)


# -- examples/demo.yaml ----------------------------------------------------------------------------


def test_demo_config_loads() -> None:
    config = load_config(DEMO_CONFIG)
    assert set(config.upstreams) == {"meridian", "meivan"}
    assert all(upstream.mock for upstream in config.upstreams.values())
    assert all(upstream.base_url is None for upstream in config.upstreams.values())
    assert config.store.kind == "memory"
    assert config.models["fast"].upstream == "meridian"
    assert config.models["fast"].model == "meridian-1-turbo"
    assert config.models["general"].upstream == "meivan"
    assert config.models["general"].model == "llm.general.v1"


@pytest.fixture
async def demo(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app(DEMO_CONFIG), headers=DEMO)


async def test_demo_serves_chat(demo: Client) -> None:
    response = await demo.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    body = await response.json()
    assert body["model"] == "meridian-1-turbo"
    assert body["choices"][0]["message"]["content"]


async def test_demo_serves_meridian_embeddings(demo: Client) -> None:
    response = await demo.post(
        "/v1/embeddings",
        json={"model": "meridian-embed-3", "input": ["alpha", "beta"], "dimensions": 16},
    )
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == _embedding("alpha", 16)
    assert body["data"][1]["embedding"] == _embedding("beta", 16)
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    assert body["model"] == "meridian-embed-3"


async def test_demo_serves_meivan_embeddings(demo: Client) -> None:
    response = await demo.post(
        "/v1/embeddings", json={"service_id": "embed.text.v1", "input": "alpha", "dimensions": 16}
    )
    assert response.status == 200
    body = await response.json()
    assert [item["embedding"] for item in body["data"]] == [_embedding("alpha", 16)]


async def test_demo_lists_meivan_services(demo: Client) -> None:
    response = await demo.get("/v1/services")
    assert response.status == 200
    body = await response.json()
    assert body["next_cursor"] is None
    services = {service["service_id"]: service for service in body["data"]}
    assert set(services) == {"llm.general.v1", "embed.text.v1", "general"}
    assert services["llm.general.v1"]["capabilities"] == ["chat", "json_mode"]
    assert services["llm.general.v1"]["max_context_tokens"] == 128000
    assert services["llm.general.v1"]["regions"] == ["us-east-1", "eu-west-1"]
    assert services["general"]["provider"] == "meivan"


async def test_demo_serves_meivan_complete(demo: Client) -> None:
    response = await demo.post(
        "/v1/complete",
        json={"service_id": "general", "messages": [{"role": "user", "content": "hi there"}]},
    )
    assert response.status == 200
    body = await response.json()
    assert body["id"].startswith("cmp_")
    assert body["model"] == "general-v1"  # the mock names llm.general.v1, so the alias was renamed
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["total_tokens"] > 0


async def test_demo_passes_through_to_a_named_upstream(demo: Client) -> None:
    response = await demo.get("/upstreams/meridian/v1/models")
    assert response.status == 200
    body = await response.json()
    assert {model["id"] for model in body["data"]} == set(MERIDIAN_MODELS)


async def test_demo_meivan_service_is_not_a_chat_model(demo: Client) -> None:
    response = await demo.post("/v1/chat/completions", json={**CHAT, "model": "general"})
    assert response.status == 400
    error = _assert_envelope(await response.json(), "model_not_supported")
    assert error["param"] == "model"


# -- examples/own_routes_auth.py -------------------------------------------------------------------


async def test_auth_middleware_alone_protects_an_apps_own_routes(
    aiohttp_client: AiohttpClient,
) -> None:
    example = _load_example("own_routes_auth")
    client = await aiohttp_client(example.make_app())
    assert (await client.get("/health")).status == 200
    refused = await client.get("/whoami")
    assert refused.status == 401
    assert (await refused.json())["error"]["code"] == "invalid_api_key"
    allowed = await client.get("/whoami", headers=DEMO)
    assert await allowed.json() == {"team": "demo", "key": "demo"}


# -- examples/direct_client.py ---------------------------------------------------------------------


async def test_direct_client_rotates_keys_and_retries_on_its_own_session(
    aiohttp_server: Any,
) -> None:
    from sidegate.proxy.mock import MOCK_STATE, Fault, meridian_app

    example = _load_example("direct_client")
    app = meridian_app()
    server = await aiohttp_server(app)
    state = app[MOCK_STATE]
    state.script(Fault(status=429, retry_after=30), path="/v1/chat/completions")
    base = str(server.make_url("")).rstrip("/")
    retry = example.Retry(base_delay_s=0, max_delay_s=0, deadline_s=5)
    async with example.make_session(["sk-one", "sk-two"], retry=retry) as session:
        reply, outbound = await example.chat(session, base, "hello")
    assert reply
    assert outbound.attempts == 2
    assert outbound.key_ids == ["key-0", "key-1"]
    assert [r.headers["Authorization"] for r in state.received] == [
        "Bearer sk-one",
        "Bearer sk-two",
    ]
