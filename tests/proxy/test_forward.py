"""Forwarding: headers both ways, credentials, request ids, errors and timeouts."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.helpers import parse_content_type
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from sidegate.config.models import SidegateConfig
from sidegate.proxy.app import create_app
from sidegate.proxy.headers import UpstreamRequest, downstream_headers, media_type
from sidegate.proxy.mock import Fault
from sidegate.proxy.state import STATE_KEY
from tests.conftest import (
    ADMIN,
    ADMIN_KEY,
    MERIDIAN_SECRET,
    AiohttpClient,
    AiohttpServer,
    GatewayFactory,
    Upstream,
    base_config,
    is_random_hex,
)

Client = TestClient[web.Request, web.Application]
CHAT = {"model": "meridian-1", "messages": [{"role": "user", "content": "hello there"}]}


async def test_client_credentials_are_replaced_and_hop_by_hop_stripped(
    gateway: Client, meridian: Upstream
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            "Authorization": f"Bearer {ADMIN_KEY}",
            "api-key": "client-api-key",
            "x-api-key": "client-x-api-key",
            "Cookie": "session=abc",
            "Connection": "keep-alive, X-Hop-Named",
            "X-Hop-Named": "drop me",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Custom": "kept",
            "X-Forwarded-For": "203.0.113.7",
        },
    )
    assert response.status == 200
    headers = meridian.state.received[-1].headers
    assert headers["Authorization"] == f"Bearer {MERIDIAN_SECRET}"
    assert headers.getall("Authorization") == [f"Bearer {MERIDIAN_SECRET}"]
    for name in ("api-key", "x-api-key", "Cookie", "X-Hop-Named", "Keep-Alive", "TE"):
        assert name not in headers, name
    assert "Proxy-Authorization" not in headers
    assert headers["X-Custom"] == "kept"
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"


async def test_request_id_is_taken_sent_upstream_and_returned(
    gateway: Client, meridian: Upstream
) -> None:
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-abc-123"}
    )
    assert response.headers["x-request-id"] == "req-abc-123"
    assert meridian.state.received[-1].headers["x-request-id"] == "req-abc-123"
    generated = await gateway.post("/v1/chat/completions", json=CHAT)
    request_id = generated.headers["x-request-id"]
    assert is_random_hex(request_id, 12)
    assert meridian.state.received[-1].headers["x-request-id"] == request_id
    error = await gateway.get("/v1/nothing")
    assert is_random_hex(error.headers["x-request-id"], 12)


async def test_upstream_errors_pass_through_unchanged(gateway: Client, meridian: Upstream) -> None:
    meridian.state.script(Fault(status=429, retry_after=2), path="/v1/chat/completions")
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 429
    assert response.headers["Retry-After"] == "2"
    assert "x-ratelimit-remaining-requests" in response.headers
    body = await response.json()
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert body["retry-after"] == 2


async def test_rate_limit_headers_pass_through_on_success(
    gateway: Client, meridian: Upstream
) -> None:
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    for name in ("limit", "remaining", "reset"):
        for kind in ("requests", "tokens"):
            assert f"x-ratelimit-{name}-{kind}" in response.headers


def test_downstream_headers_drop_each_listed_name_in_any_case_however_often() -> None:
    upstream = CIMultiDict(
        [
            ("CONTENT-LENGTH", "3"),
            ("date", "a"),
            ("X-Kept", "k"),
            ("Date", "b"),
            ("Keep-Alive", "timeout=5"),
            ("Connection", "close, X-Gone"),
            ("x-gone", "1"),
            ("Server", "s"),
            ("content-encoding", "gzip"),
            ("TRANSFER-ENCODING", "chunked"),
            ("x-kept", "again"),
        ]
    )
    kept = downstream_headers(CIMultiDictProxy(upstream))
    assert list(kept.items()) == [("X-Kept", "k"), ("x-kept", "again")]


async def _custom_upstream(
    aiohttp_server: AiohttpServer, handler: Any
) -> tuple[TestServer, dict[str, Any]]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return server, base_config(str(server.make_url("")).rstrip("/"), "http://127.0.0.1:9")


@pytest.mark.parametrize(
    "value",
    [
        "text/event-stream",
        "Text/Event-Stream; charset=utf-8",
        " text/event-stream ;x=y",
        "text/event-streams",
        "application/json; x=text/event-stream",
        "application/json",
        "",
        "nonsense",
    ],
)
def test_the_media_type_is_what_aiohttp_reads_for_the_types_sidegate_asks_about(value: str) -> None:
    # media_type() skips aiohttp's parser (which copies the parameters too); for every type
    # sidegate compares against, the answer must be aiohttp's own.
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": value}))
    theirs = parse_content_type(value)[0]
    for wanted in ("text/event-stream", "application/json", "multipart/form-data"):
        assert (media_type(headers) == wanted) is (theirs == wanted), (value, wanted)
    assert media_type(CIMultiDictProxy(CIMultiDict())) == ""  # no header: no type


async def test_upstream_hop_by_hop_response_headers_are_stripped(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(
            body=b'{"ok": true}',
            content_type="application/json",
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "secret-ish",
                "Keep-Alive": "timeout=1",
                "Proxy-Authenticate": "Basic",
                "Upgrade": "h2c",
                "X-Kept": "yes",
            },
        )
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    _, config = await _custom_upstream(aiohttp_server, handler)
    client = await aiohttp_client(create_app(SidegateConfig.model_validate(config)), headers=ADMIN)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate", "Upgrade"):
        assert name not in response.headers, name
    assert response.headers["X-Kept"] == "yes"
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_upstream_cookies_are_not_kept_between_requests(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    """One upstream session serves every caller: a cookie an upstream sets (a load balancer's
    affinity cookie, say) goes to the client that got it, and is never sent upstream again on
    anyone's behalf. The upstream is named by host name, as real ones are (aiohttp's cookie jar
    ignores cookies from IP addresses, so an address would not show it)."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Cookie"))
        response = web.Response(body=b'{"ok": true}', content_type="application/json")
        response.set_cookie("affinity", f"caller-{len(seen)}", path="/")
        return response

    server, config = await _custom_upstream(aiohttp_server, handler)
    config["upstreams"]["meridian"]["base_url"] = f"http://localhost:{server.port}"
    client = await aiohttp_client(create_app(SidegateConfig.model_validate(config)), headers=ADMIN)
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status == 200
        assert "affinity=caller-" in response.headers["Set-Cookie"]
    assert seen == [None, None, None]


async def test_unreachable_upstream_is_502(
    make_gateway: GatewayFactory, gateway_config: dict[str, Any], unused_tcp_port: int
) -> None:
    upstreams = dict(gateway_config["upstreams"])
    upstreams["meridian"] = {
        **upstreams["meridian"],
        "base_url": f"http://127.0.0.1:{unused_tcp_port}",
    }
    gateway = await make_gateway(upstreams=upstreams)
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_unreachable"
    assert "meridian" in error["message"]


@pytest.mark.parametrize(
    ("timeouts", "code"),
    [({"read_s": 0.2}, "upstream_read_timeout"), ({"total_s": 0.2}, "upstream_timeout")],
)
async def test_timeouts_are_504_and_say_which(
    make_gateway: GatewayFactory,
    gateway_config: dict[str, Any],
    meridian: Upstream,
    timeouts: dict[str, float],
    code: str,
) -> None:
    upstreams = dict(gateway_config["upstreams"])
    upstreams["meridian"] = {**upstreams["meridian"], "timeouts": timeouts}
    gateway = await make_gateway(upstreams=upstreams)
    meridian.state.script(Fault(delay_s=5.0), path="/v1/chat/completions")
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 504
    assert (await response.json())["error"]["code"] == code


def test_connect_timeouts_are_named_as_such() -> None:
    from sidegate.middlewares.contract import Vendor
    from sidegate.proxy.forward import _upstream_failure
    from sidegate.proxy.runtime import UpstreamTarget

    target = UpstreamTarget(
        "meridian",
        Vendor.MERIDIAN,
        "http://127.0.0.1:9",
        "primary",
        (),
        aiohttp.ClientTimeout(total=60, sock_connect=3, sock_read=30),
    )
    error = _upstream_failure(target, aiohttp.ConnectionTimeoutError())
    assert (error.status, error.code) == (504, "upstream_connect_timeout")
    assert "3" in error.message


async def test_multipart_audio_is_forwarded_byte_identical(
    gateway: Client, meridian: Upstream, tmp_path: Any
) -> None:
    audio = bytes(range(256)) * 64 + b"\r\n--not-a-boundary\r\n"
    form = aiohttp.FormData()
    form.add_field("file", audio, filename="clip.wav", content_type="audio/wav")
    form.add_field("model", "meridian-whisper-1")
    form.add_field("language", "en")
    writer = form()
    sent = bytearray()

    class Sink:
        async def write(self, data: bytes) -> None:
            sent.extend(data)

    await writer.write(Sink())  # type: ignore[arg-type]
    response = await gateway.post(
        "/v1/audio/transcriptions", data=bytes(sent), headers={"Content-Type": writer.content_type}
    )
    assert response.status == 200, await response.text()
    assert "text" in await response.json()
    received = meridian.state.received[-1]
    assert received.body == bytes(sent)
    assert received.headers["Content-Type"] == writer.content_type


async def test_multipart_alias_is_renamed_in_place(gateway: Client, meridian: Upstream) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
    form.add_field("model", "whisper")
    response = await gateway.post("/v1/audio/transcriptions", data=form)
    assert response.status == 200
    body = meridian.state.received[-1].body
    assert b"\r\n\r\nmeridian-whisper-1\r\n" in body
    assert b"\r\n\r\nwhisper\r\n" not in body


async def test_gateway_sessions_are_independent_per_app(
    aiohttp_client: AiohttpClient, meridian: Upstream, meivan: Upstream
) -> None:
    config = SidegateConfig.model_validate(base_config(meridian.url, meivan.url))
    first = await aiohttp_client(create_app(config), headers=ADMIN)
    second = await aiohttp_client(create_app(config), headers=ADMIN)
    responses = await asyncio.gather(
        first.post("/v1/chat/completions", json=CHAT),
        second.post("/v1/chat/completions", json=CHAT),
    )
    assert [r.status for r in responses] == [200, 200]
    assert meridian.state.count("/v1/chat/completions") == 2


async def test_the_client_user_agent_passes_through_and_none_is_made_up(
    gateway: Client, meridian: Upstream
) -> None:
    await gateway.post("/v1/chat/completions", json=CHAT, headers={"User-Agent": "my-sdk/1.2"})
    assert meridian.state.received[-1].headers.getall("User-Agent") == ["my-sdk/1.2"]
    await gateway.post("/v1/chat/completions", json=CHAT, skip_auto_headers=["User-Agent"])
    received = meridian.state.received[-1].headers
    assert "User-Agent" not in received
    assert "gzip" in received["Accept-Encoding"]  # aiohttp's other automatic headers stay


async def test_dropped_request_headers_are_matched_whatever_their_case(
    gateway: Client, meridian: Upstream
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"X-API-KEY": "client-x-api-key", "COOKIE": "session=abc", "X-Kept": "yes"},
    )
    assert response.status == 200
    headers = meridian.state.received[-1].headers
    assert "x-api-key" not in headers
    assert "cookie" not in headers
    assert headers["X-Kept"] == "yes"


async def test_a_gateway_without_a_config_answers_503_not_ready(gateway: Client) -> None:
    state = gateway.app[STATE_KEY]
    active, state.active = state.active, None
    try:
        response = await gateway.post("/v1/chat/completions", json=CHAT)
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "not_ready"
        assert (await gateway.get("/healthz")).status == 200  # bypasses the policies
    finally:
        state.active = active


async def test_the_upstream_request_class_never_makes_up_a_user_agent(
    aiohttp_server: AiohttpServer,
) -> None:
    seen: list[CIMultiDictProxy[str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.headers)
        return web.Response()

    app = web.Application()
    app.router.add_get("/", echo)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession(request_class=UpstreamRequest) as session:
        for skip in (None, ["Accept-Encoding"]):  # aiohttp's fast path, and its skipping one
            async with session.get(server.make_url("/"), skip_auto_headers=skip):
                pass
        async with session.get(server.make_url("/"), headers={"User-Agent": "sdk/1"}):
            pass
    assert [h.get("User-Agent") for h in seen] == [None, None, "sdk/1"]
    assert ["Accept-Encoding" in h for h in seen] == [True, False, True]
