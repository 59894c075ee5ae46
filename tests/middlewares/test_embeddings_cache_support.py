"""What the embeddings-cache tests share: a bare app (stand-in routing → the cache → a handler
forwarding to the mock upstreams), a client helper, an observer that counts, a fake clock."""

from __future__ import annotations

import base64
from array import array
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy
from redis.asyncio import Redis

from sidegate.middlewares.contract import (
    CALL_KEY,
    Call,
    EndpointKind,
    Principal,
    Route,
    Vendor,
    parse_object,
)
from sidegate.middlewares.errors import error_middleware
from sidegate.proxy.mock import vector, vector_base64
from tests.conftest import fresh_redis as shared_fresh_redis
from tests.conftest import redis_client as shared_redis_client
from tests.conftest import redis_url

REDIS_URL = redis_url(12)
EMBED = "meridian-embed-3"
SERVICE = "embed.text.v1"
URLS: web.AppKey[dict[str, str]] = web.AppKey("test_upstream_urls", dict)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("test_session", aiohttp.ClientSession)
CALLS: web.AppKey[list[Call]] = web.AppKey("test_calls", list)
_PATHS = {"/v1/embeddings": EndpointKind.EMBEDDINGS, "/v1/chat/completions": EndpointKind.CHAT}


def expected(text: str, dimensions: int = 1536) -> list[float]:
    """The mock's vector for ``text``: what the upstream answers for it."""
    return vector(b"s" + text.encode(), dimensions)


def expected_base64(text: str, dimensions: int = 1536) -> str:
    return vector_base64(b"s" + text.encode(), dimensions)


def floats_of(text: str) -> list[float]:
    """A base64 embedding decoded to its float32 values."""
    values = array("f")
    values.frombytes(base64.b64decode(text))
    return values.tolist()


def tokens(*texts: str) -> int:
    """The mock's usage for ``texts``: one token per started four characters."""
    return sum((len(text) + 3) // 4 for text in texts)


@web.middleware
async def stand_in_routing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing, reduced: ``service_id`` means Meivan, ``model`` Meridian; ``x-team`` the team."""
    body = await request.read()
    payload = parse_object(body)
    vendor = Vendor.MEIVAN if "service_id" in payload else Vendor.MERIDIAN
    model = payload["service_id" if vendor is Vendor.MEIVAN else "model"]
    route = Route(vendor.value, vendor, _PATHS[request.path], request.path, model, model)
    call = Call("req-1", route, body, "application/json", _json=payload)
    call.principal = Principal(team=request.headers.get("x-team", "search"))
    request[CALL_KEY] = call
    request.app[CALLS].append(call)
    return await handler(request)


async def forward(request: web.Request) -> web.StreamResponse:
    """The handler: the Call's body to its upstream, the answer back as a ``web.Response``."""
    call = request[CALL_KEY]
    url = request.app[URLS][call.route.upstream] + call.route.upstream_path
    headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    async with request.app[SESSION].post(url, data=call.body, headers=headers) as upstream:
        body = await upstream.read()
        call.upstream_status = upstream.status
        return web.Response(status=upstream.status, body=body, content_type=upstream.content_type)


async def _session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        yield


def gateway_app(
    urls: Mapping[str, str], cache: Middleware, *, inner: Sequence[Middleware] = ()
) -> web.Application:
    """A bare application: errors → stand-in routing → ``cache`` → ``inner`` → forward."""
    app = web.Application(middlewares=[error_middleware, stand_in_routing, cache, *inner])
    app[URLS] = dict(urls)
    app[CALLS] = []
    app.cleanup_ctx.append(_session)
    for path in _PATHS:
        app.router.add_post(path, forward)
    return app


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any

    @property
    def cache(self) -> tuple[str | None, str | None]:
        return self.headers.get("x-sidegate-cache"), self.headers.get("x-sidegate-cache-hits")

    def vectors(self) -> list[Any]:
        data = self.body["data"]
        assert [entry["index"] for entry in data] == list(range(len(data)))
        return [entry["embedding"] for entry in data]


Client = TestClient[web.Request, web.Application]


async def embed(
    client: Client,
    items: Any,
    *,
    team: str = "search",
    headers: Mapping[str, str] | None = None,
    model: str = EMBED,
    **fields: Any,
) -> Reply:
    """POST /v1/embeddings with ``items`` as ``input``; ``service_id`` for a Meivan model."""
    name = "service_id" if model == SERVICE else "model"
    payload = {name: model, "input": items, **fields}
    response = await client.post(
        "/v1/embeddings", json=payload, headers={"x-team": team, **(headers or {})}
    )
    async with response:
        return Reply(response.status, response.headers, await response.json())


@dataclass
class Counts:
    """An EmbeddingsCacheObserver that adds everything up."""

    hits: int = 0
    misses: int = 0
    saved_items: int = 0
    evictions: int = 0
    held_bytes: list[int] = field(default_factory=list)

    def hit(self, items: int) -> None:
        self.hits += items

    def missed(self, items: int) -> None:
        self.misses += items

    def saved(self, items: int) -> None:
        self.saved_items += items

    def evicted(self, entries: int) -> None:
        self.evictions += entries

    def held(self, bytes_held: int) -> None:
        self.held_bytes.append(bytes_held)


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def redis_client(url: str = REDIS_URL) -> Redis:
    """A client that fails fast: no retries, a short connect timeout."""
    return shared_redis_client(url)


async def fresh_redis() -> Redis:
    """A client of the flushed test database (12), or skip (fail under CI=true) without Redis."""
    return await shared_fresh_redis(REDIS_URL)
