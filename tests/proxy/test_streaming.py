"""Streaming: SSE passes through as it arrives; disconnects and upstream resets end promptly."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.config.models import SidegateConfig
from sidegate.proxy.app import create_app
from sidegate.proxy.cli import loop_name
from sidegate.proxy.mock import Fault
from tests.conftest import ADMIN, AiohttpClient, AiohttpServer, Upstream, base_config

Client = TestClient[web.Request, web.Application]
STREAM = {
    "model": "meridian-1",
    "messages": [{"role": "user", "content": "count to ten"}],
    "stream": True,
}


class GatedUpstream:
    """An SSE upstream that sends one event, then waits for the test before the rest."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.first_sent = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.finished = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(b'data: {"n": 1}\n\n')
            self.first_sent.set()
            await self.release.wait()
            for n in range(2, 200):
                await response.write(f'data: {{"n": {n}}}\n\n'.encode())
                await asyncio.sleep(0.01)
            await response.write(b"data: [DONE]\n\n")
            self.finished.set()
        except (ConnectionResetError, asyncio.CancelledError):
            self.client_gone.set()
            raise
        return response


async def _gated(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> tuple[GatedUpstream, Client]:
    upstream = GatedUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handler)
    server = await aiohttp_server(app)
    config = base_config(str(server.make_url("")).rstrip("/"), "http://127.0.0.1:9")
    client = await aiohttp_client(create_app(SidegateConfig.model_validate(config)), headers=ADMIN)
    return upstream, client


async def test_first_event_reaches_the_client_before_the_upstream_sends_the_last(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    upstream, client = await _gated(aiohttp_server, aiohttp_client)
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    first = await asyncio.wait_for(response.content.readline(), timeout=5)
    assert first == b'data: {"n": 1}\n'
    assert not upstream.finished.is_set()
    upstream.release.set()
    rest = await asyncio.wait_for(response.read(), timeout=10)
    assert upstream.finished.is_set()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_closes_the_upstream_connection_promptly(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    upstream, client = await _gated(aiohttp_server, aiohttp_client)
    response = await client.post("/v1/chat/completions", json=STREAM)
    await asyncio.wait_for(response.content.readline(), timeout=5)
    response.close()
    upstream.release.set()
    await asyncio.wait_for(upstream.client_gone.wait(), timeout=5)
    assert not upstream.finished.is_set()


async def test_sse_chunks_pass_through_unchanged(gateway: Client, meridian: Upstream) -> None:
    payload = {**STREAM, "stream_options": {"include_usage": True}}
    response = await gateway.post("/v1/chat/completions", json=payload)
    raw = await response.read()
    events = [line[6:] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text.split()) == meridian.state.stream_chunks


async def test_upstream_reset_mid_stream_cuts_the_client_stream(
    gateway: Client, meridian: Upstream
) -> None:
    meridian.state.script(Fault(reset_after_events=2), path="/v1/chat/completions")
    response = await gateway.post("/v1/chat/completions", json=STREAM)
    assert response.status == 200
    received = b""
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError:
        pass
    else:
        raise AssertionError("the client stream ended cleanly after an upstream reset")
    assert received.count(b"data: ") == 2
    assert b"[DONE]" not in received


async def test_meivan_complete_with_stream_flag_is_answered_as_json(
    gateway: Client, meivan: Upstream
) -> None:
    payload: dict[str, Any] = {
        "service_id": "llm.general.v1",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    response = await gateway.post("/v1/complete", json=payload)
    assert response.status == 200
    assert response.content_type == "application/json"


async def test_this_module_runs_on_the_event_loop_each_test_is_named_for(
    request: pytest.FixtureRequest,
) -> None:
    loop = asyncio.get_running_loop()  # see _ON_BOTH_LOOPS in tests/conftest.py
    assert loop_name(loop) == request.node.callspec.id
