"""Routing: every endpoint of both vendors reaches the upstream that serves its model."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN_KEY, MEIVAN_SECRET, MERIDIAN_SECRET, GatewayFactory, Upstream

Client = TestClient[web.Request, web.Application]


async def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


async def test_chat_goes_to_meridian_with_the_upstream_key(
    gateway: Client, meridian: Upstream, meivan: Upstream
) -> None:
    payload = {"model": "meridian-1", "messages": [{"role": "user", "content": "hi"}]}
    response = await gateway.post("/v1/chat/completions", json=payload)
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "meridian-1"
    assert meridian.state.count("/v1/chat/completions") == 1
    assert meivan.state.count() == 0
    received = meridian.state.received[-1]
    assert received.headers["Authorization"] == f"Bearer {MERIDIAN_SECRET}"
    assert orjson.loads(received.body) == payload


async def test_alias_is_renamed_in_the_forwarded_bytes_and_nothing_else(
    gateway: Client, meridian: Upstream
) -> None:
    raw = (
        b'{"messages": [{"role": "user", "content": "say \\"model\\": \\"fast\\""}],\n'
        b' "model" :  "fast", "temperature": 0.70, "x": {"model": "fast"}}'
    )
    response = await gateway.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status == 200
    assert (await response.json())["model"] == "meridian-1-turbo"
    expected = raw.replace(b'"model" :  "fast"', b'"model" :  "meridian-1-turbo"')
    assert meridian.state.received[-1].body == expected


async def test_unaliased_body_is_forwarded_byte_identical(
    gateway: Client, meridian: Upstream
) -> None:
    raw = (
        b'{"model":"meridian-1",'
        b'"messages":[{"role":"user","content":"\\u00e9t\\u00e9"}],"temperature":1.0}'
    )
    response = await gateway.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status == 200
    assert meridian.state.received[-1].body == raw


async def test_meivan_complete_is_routed_by_service_id(
    gateway: Client, meridian: Upstream, meivan: Upstream
) -> None:
    payload = {"service_id": "general", "messages": [{"role": "user", "content": "Draft."}]}
    response = await gateway.post("/v1/complete", json=payload)
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["role"] == "assistant"
    received = meivan.state.received[-1]
    assert orjson.loads(received.body)["service_id"] == "llm.general.v1"
    assert received.headers["Authorization"] == f"Bearer {MEIVAN_SECRET}"
    assert meridian.state.count() == 0


@pytest.mark.parametrize(
    ("payload", "vendor"),
    [
        ({"model": "meridian-embed-3", "input": ["a", "b"]}, "meridian"),
        ({"service_id": "embed.text.v1", "input": ["a", "b"]}, "meivan"),
    ],
)
async def test_embeddings_exist_on_both_vendors_and_route_by_field(
    gateway: Client,
    meridian: Upstream,
    meivan: Upstream,
    payload: dict[str, Any],
    vendor: str,
) -> None:
    response = await gateway.post("/v1/embeddings", json=payload)
    assert response.status == 200
    assert [item["index"] for item in (await response.json())["data"]] == [0, 1]
    target, other = (meridian, meivan) if vendor == "meridian" else (meivan, meridian)
    assert target.state.count("/v1/embeddings") == 1
    assert other.state.count() == 0


async def test_images_are_routed(gateway: Client, meridian: Upstream) -> None:
    payload = {"model": "meridian-image-1", "prompt": "a lake", "n": 2, "size": "1024x1024"}
    response = await gateway.post("/v1/images/generations", json=payload)
    assert response.status == 200
    assert len((await response.json())["data"]) == 2
    assert meridian.state.count("/v1/images/generations") == 1


@pytest.mark.parametrize(
    ("path", "payload", "param", "code"),
    [
        ("/v1/chat/completions", {"messages": []}, "model", "invalid_request"),
        ("/v1/complete", {"messages": []}, "service_id", "invalid_request"),
        ("/v1/embeddings", {"input": "x"}, "model", "invalid_request"),
        ("/v1/chat/completions", {"model": 3, "messages": []}, "model", "invalid_request"),
        (
            "/v1/embeddings",
            {"model": "meridian-embed-3", "service_id": "embed.text.v1", "input": "x"},
            "service_id",
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            {"model": "general", "messages": []},
            "model",
            "model_not_supported",
        ),
        (
            "/v1/complete",
            {"service_id": "meridian-1", "messages": []},
            "service_id",
            "model_not_supported",
        ),
        (
            "/v1/embeddings",
            {"model": "embed.text.v1", "input": "x"},
            "model",
            "model_not_supported",
        ),
    ],
)
async def test_missing_or_misplaced_model_field_is_400_with_param(
    gateway: Client,
    meridian: Upstream,
    meivan: Upstream,
    path: str,
    payload: dict[str, Any],
    param: str,
    code: str,
) -> None:
    error = await _error(await gateway.post(path, json=payload), 400)
    assert error["param"] == param
    assert error["code"] == code
    assert meridian.state.count() == meivan.state.count() == 0


async def test_unknown_model_is_404(gateway: Client, meridian: Upstream) -> None:
    payload = {"model": "gpt-nope", "messages": []}
    error = await _error(await gateway.post("/v1/chat/completions", json=payload), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert meridian.state.count() == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"model"'])
async def test_malformed_json_is_400(gateway: Client, meridian: Upstream, raw: bytes) -> None:
    response = await gateway.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    error = await _error(response, 400)
    assert error["code"] == "invalid_json"
    assert meridian.state.count() == 0


async def test_wrong_media_type_is_415(gateway: Client, meridian: Upstream) -> None:
    response = await gateway.post(
        "/v1/chat/completions", data=b"model=meridian-1", headers={"Content-Type": "text/plain"}
    )
    await _error(response, 415)
    form = await gateway.post("/v1/audio/transcriptions", json={"model": "meridian-whisper-1"})
    await _error(form, 415)
    assert meridian.state.count() == 0


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("Application/JSON ; charset=utf-8", 200),  # the media type is case-insensitive
        ("application/json;foo=bar;charset=utf-8", 200),
        ("application/jsonx", 415),
        ("application/json-patch+json", 415),
        ("text/plain; x=application/json", 415),
        ("", 415),
    ],
)
async def test_the_media_type_is_read_as_aiohttp_reads_it(
    gateway: Client, meridian: Upstream, content_type: str, status: int
) -> None:
    body = orjson.dumps({"model": "meridian-1", "messages": [{"role": "user", "content": "x"}]})
    response = await gateway.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": content_type}
    )
    assert response.status == status, await response.text()
    if status == 415:
        error = await _error(response, 415)
        expected = content_type.partition(";")[0].strip().lower() or "an empty type"
        if not content_type:  # aiohttp's reading of no header
            expected = "application/octet-stream"
        assert error["message"].endswith(f"not {expected}.")
        assert meridian.state.count() == 0
    else:
        assert meridian.state.received[-1].headers["Content-Type"] == content_type
        assert meridian.state.received[-1].body == body


async def test_a_body_in_pieces_is_read_whole_and_the_connection_kept(
    gateway: Client, meridian: Upstream
) -> None:
    # Content-Length, the body sent in three writes: read whole, then a second request on the
    # same connection (the first was read to its end, so aiohttp keeps the connection).
    body = orjson.dumps(
        {"model": "meridian-1", "messages": [{"role": "user", "content": "y" * 3000}]}
    )
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        for _ in range(2):
            writer.write(head + body[:100])
            await writer.drain()
            writer.write(body[100:2000])
            await writer.drain()
            writer.write(body[2000:])
            await writer.drain()
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                assert name.lower() != "connection" or "close" not in value.lower()
            answer = orjson.loads(await reader.readexactly(length))
            assert answer["object"] == "chat.completion"
            assert meridian.state.received[-1].body == body
    finally:
        writer.close()
    assert meridian.state.count("/v1/chat/completions") == 2


async def test_body_over_the_limit_is_413_before_any_upstream_call(
    make_gateway: GatewayFactory, meridian: Upstream
) -> None:
    gateway = await make_gateway(server={"max_body_bytes": 1000, "watch_config": False})
    big = orjson.dumps(
        {"model": "meridian-1", "messages": [{"role": "user", "content": "x" * 2000}]}
    )
    error = await _error(
        await gateway.post(
            "/v1/chat/completions", data=big, headers={"Content-Type": "application/json"}
        ),
        413,
    )
    assert error["code"] == "request_too_large"

    async def chunks() -> Any:
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    chunked = await gateway.post(
        "/v1/chat/completions", data=chunks(), headers={"Content-Type": "application/json"}
    )
    await _error(chunked, 413)
    assert meridian.state.count() == 0


async def test_unknown_path_is_404_and_wrong_method_405(gateway: Client) -> None:
    error = await _error(await gateway.get("/v1/nothing-here"), 404)
    assert error["code"] == "not_found"
    response = await gateway.get("/v1/chat/completions")
    error = await _error(response, 405)
    assert error["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


async def test_gateway_usage_is_answered_locally_and_validates_its_query(
    gateway: Client, meridian: Upstream
) -> None:
    error = await _error(await gateway.get("/v1/usage"), 400)
    assert error["param"] == "from"
    assert meridian.state.count() == 0


async def test_models_are_listed_from_config(gateway: Client, meridian: Upstream) -> None:
    response = await gateway.get("/v1/models")
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    ids = [model["id"] for model in body["data"]]
    assert ids == [
        "meridian-1",
        "meridian-1-turbo",
        "meridian-embed-3",
        "meridian-whisper-1",
        "meridian-image-1",
        "fast",
        "whisper",
    ]
    assert all(model["object"] == "model" for model in body["data"])
    assert meridian.state.count() == 0


async def test_services_are_listed_with_cursor_pagination(
    make_gateway: GatewayFactory, gateway_config: dict[str, Any], meivan: Upstream
) -> None:
    services = [{"id": f"svc.{n:02d}.v1", "capabilities": ["chat"]} for n in range(25)]
    upstreams = dict(gateway_config["upstreams"])
    upstreams["meivan"] = {**upstreams["meivan"], "models": services}
    gateway = await make_gateway(upstreams=upstreams, models={})
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        body = await (await gateway.get("/v1/services", params=params)).json()
        seen += [service["service_id"] for service in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [service["id"] for service in services]
    assert pages == 3
    first = (await (await gateway.get("/v1/services")).json())["data"][0]
    assert first == {
        "service_id": "svc.00.v1",
        "provider": "meivan",
        "capabilities": ["chat"],
        "max_context_tokens": None,
        "regions": [],
    }
    assert meivan.state.count() == 0


@pytest.mark.parametrize(
    ("params", "param"),
    [({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"cursor": "zz"}, "cursor")],
)
async def test_bad_pagination_is_400(gateway: Client, params: dict[str, str], param: str) -> None:
    error = await _error(await gateway.get("/v1/services", params=params), 400)
    assert error["param"] == param


async def test_passthrough_forwards_any_path_to_the_named_upstream(
    gateway: Client, meridian: Upstream, meivan: Upstream
) -> None:
    response = await gateway.get(
        "/upstreams/meivan/v1/usage",
        params={"from": "2025-01-01T00:00:00Z", "to": "2025-01-31T00:00:00Z"},
    )
    assert response.status == 200
    received = meivan.state.received[-1]
    assert received.path == "/v1/usage"
    assert received.query["from"] == "2025-01-01T00:00:00Z"
    assert received.headers["Authorization"] == f"Bearer {MEIVAN_SECRET}"
    missing = await gateway.get("/upstreams/nobody/v1/usage")
    assert (await _error(missing, 404))["code"] == "upstream_not_found"
    assert meridian.state.count() == 0


async def test_body_fields_never_choose_the_upstream(gateway: Client, meridian: Upstream) -> None:
    payload = {
        "model": "meridian-1",
        "messages": [{"role": "user", "content": "hi"}],
        "api_base": "http://169.254.169.254/",
        "base_url": "http://evil.example/",
    }
    response = await gateway.post(
        "/v1/chat/completions", json=payload, headers={"Host": "evil.example"}
    )
    assert response.status == 200
    assert meridian.state.count("/v1/chat/completions") == 1
    assert meridian.state.received[-1].headers["Host"] == meridian.url.split("//")[1]
