"""Path normalisation: nothing the client writes can reach an upstream path outside /v1."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.middlewares.errors import BadRequest
from sidegate.proxy.paths import normalise_path
from tests.conftest import ADMIN_KEY, Upstream

Client = TestClient[web.Request, web.Application]

ATTACKS = [
    "/v1/../v1/models",
    "/v1/%2e%2e/admin",
    "/v1/%2E%2E/admin",
    "//v1/models",
    "/v1//models",
    "/upstreams/meridian/v1/../../admin",
    "/upstreams/meridian/v1/%2e%2e/%2e%2e/admin",
    "/upstreams/meridian/v1/a%2f..%2f..%2fadmin",
    "/upstreams/meridian/v1/a%2F..%2Fadmin",
    "/upstreams/meridian/v1/models%3Fx=1",
    "/upstreams/meridian/v1/models%23frag",
    "/upstreams/meridian/v1/a%5c..%5cadmin",
    "/upstreams/meridian/v1/./models",
    "/upstreams/meridian/v1/%00",
    "/upstreams/meridian//v1/models",
    "/upstreams/meridian/v1/a\\..\\admin",
]


async def _raw_status(client: Client, method: str, target: str) -> int:
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            f"Authorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize("target", ATTACKS)
async def test_traversal_and_smuggling_never_reach_an_upstream(
    gateway: Client, meridian: Upstream, meivan: Upstream, target: str
) -> None:
    status = await _raw_status(gateway, "GET", target)
    assert status in (400, 404)
    outside = [r.path for r in meridian.state.received if not r.path.startswith("/v1/")]
    assert outside == []
    assert meridian.state.count() == 0


async def test_a_clean_passthrough_path_is_forwarded_as_is(
    gateway: Client, meridian: Upstream
) -> None:
    status = await _raw_status(gateway, "GET", "/upstreams/meridian/v1/models?x=%2F")
    assert status == 200
    assert meridian.state.received[-1].path == "/v1/models"
    assert meridian.state.received[-1].query == {"x": "/"}


@pytest.mark.parametrize(
    "path", ["/v1/../x", "/v1/%2e%2E/x", "//v1", "/v1/a%2fb", "/v1/a%3Fb", "/a/./b", "/v1/%0d"]
)
def test_normalise_path_refuses(path: str) -> None:
    with pytest.raises(BadRequest):
        normalise_path(path)


@pytest.mark.parametrize(
    "path", ["/v1/models", "/upstreams/m/v1/services/llm.general.v1", "/v1/x%20y", "/v1/x/"]
)
def test_normalise_path_keeps_clean_paths(path: str) -> None:
    assert normalise_path(path + "?q=1") == path
