"""Shared fixtures: real mock upstreams on loopback and a sidegate in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from select import POLLIN, poll
from typing import Any

import pytest
import structlog
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidegate.config.models import SidegateConfig
from sidegate.middlewares.api_keys import hash_key
from sidegate.proxy.app import create_app
from sidegate.proxy.mock import MOCK_STATE, MockState, meivan_app, meridian_app

MERIDIAN_SECRET = "sk-upstream-meridian-0123456789abcdef"
MEIVAN_SECRET = "mv-upstream-meivan-0123456789abcdef"
ADMIN_KEY = "sg-test-admin-key-000000000000000000000000000001"
SEARCH_KEY = "sg-test-search-key-00000000000000000000000000002"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SEARCH = {"Authorization": f"Bearer {SEARCH_KEY}"}
DEMO_KEY = "sg-demo-local-mock-only-not-a-secret-0000000000"  # examples/demo.yaml
DEMO = {"Authorization": f"Bearer {DEMO_KEY}"}
SEARCH_MODELS = ["meridian-1", "fast", "meridian-embed-3", "embed.text.v1"]


# `sidegate serve` runs on uvloop, the other tests on asyncio's loop (an app that mounts sidegate
# brings its own); these modules, which pass requests, streams, disconnects and failures through
# the gateway, run on both.
_ON_BOTH_LOOPS = frozenset(
    {
        "tests.proxy.test_forward",
        "tests.proxy.test_streaming",
        "tests.proxy.test_resilience",
        "tests.proxy.test_openai_sdk",
    }
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in _ON_BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}  # one factory: test names stay as they are


@dataclass
class Upstream:
    server: TestServer
    state: MockState

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def meridian(aiohttp_server: AiohttpServer) -> Upstream:
    app = meridian_app()
    return Upstream(await aiohttp_server(app), app[MOCK_STATE])


@pytest.fixture
async def meivan(aiohttp_server: AiohttpServer) -> Upstream:
    app = meivan_app()
    return Upstream(await aiohttp_server(app), app[MOCK_STATE])


def is_random_hex(value: str, size: int) -> bool:
    """Whether ``value`` is what ``random_hex(size)`` hands out (a generated request id is
    ``random_hex(12)``): ``size`` bytes in lowercase hex, nothing else."""
    return re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value) is not None


def base_config(meridian_url: str, meivan_url: str) -> dict[str, Any]:
    """Both vendors, three aliases, the memory store; an admin key and a narrower team's key."""
    return {
        "store": {"kind": "memory"},
        "retry": {"max_attempts": 1},  # the resilience tests turn retries on
        "auth": {
            "api_keys": [
                {
                    "id": "admin",
                    "team": "platform",
                    "hash": hash_key(ADMIN_KEY),
                    "roles": ["admin"],
                },
                {"id": "search-prod", "team": "search", "hash": hash_key(SEARCH_KEY)},
            ]
        },
        "teams": {"platform": {}, "search": {"models": SEARCH_MODELS}},
        "server": {"watch_config": False},
        "upstreams": {
            "meridian": {
                "kind": "meridian",
                "base_url": meridian_url,
                "keys": [{"id": "primary", "secret": MERIDIAN_SECRET}],
                "models": [
                    "meridian-1",
                    "meridian-1-turbo",
                    "meridian-embed-3",
                    "meridian-whisper-1",
                    "meridian-image-1",
                ],
            },
            "meivan": {
                "kind": "meivan",
                "base_url": meivan_url,
                "keys": [{"id": "main", "secret": MEIVAN_SECRET}],
                "models": [
                    {
                        "id": "llm.general.v1",
                        "capabilities": ["chat", "json_mode"],
                        "max_context_tokens": 128000,
                        "regions": ["us-east-1"],
                    },
                    {"id": "embed.text.v1", "capabilities": ["embeddings"]},
                ],
            },
        },
        "models": {
            "fast": {"upstream": "meridian", "model": "meridian-1-turbo"},
            "whisper": {"upstream": "meridian", "model": "meridian-whisper-1"},
            "general": {"upstream": "meivan", "model": "llm.general.v1"},
        },
    }


GatewayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def gateway_config(meridian: Upstream, meivan: Upstream) -> dict[str, Any]:
    return base_config(meridian.url, meivan.url)


@pytest.fixture
def make_gateway(aiohttp_client: AiohttpClient, gateway_config: dict[str, Any]) -> GatewayFactory:
    """Start sidegate (a real server on loopback) and return a client for it.

    Keyword arguments are merged into the top level of the base config.
    """

    async def make(**overrides: Any) -> TestClient[web.Request, web.Application]:
        return await gateway_client(aiohttp_client, {**gateway_config, **overrides})

    return make


async def gateway_client(
    aiohttp_client: AiohttpClient, config: dict[str, Any], headers: dict[str, str] = ADMIN
) -> TestClient[web.Request, web.Application]:
    """sidegate for ``config`` on loopback, and a client that sends ``headers`` (the admin key)."""
    return await aiohttp_client(create_app(SidegateConfig.model_validate(config)), headers=headers)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> TestClient[web.Request, web.Application]:
    return await make_gateway()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def redis_url(db: int) -> str:
    """The local Redis's database ``db``, moved down by ``SIDEGATE_TEST_REDIS_SHIFT`` (default 0)
    so that two test runs on one machine can use disjoint databases."""
    shift = int(os.environ.get("SIDEGATE_TEST_REDIS_SHIFT", "0"))
    return f"redis://127.0.0.1:6379/{db - shift}"


def redis_client(url: str) -> Redis:
    """A Redis client that fails fast: no retries, a short connect timeout."""
    return Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)


async def fresh_redis(url: str) -> Redis:
    """A client of the flushed database at ``url``; skip the test if Redis is unreachable.

    Under ``CI=true`` an unreachable Redis fails the test instead: CI must run the Redis tests.
    """
    client = redis_client(url)
    try:
        await client.ping()
    except RedisError as exc:
        await client.aclose()
        reason = f"Redis at {url} is unreachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the redis tests must run)")
        pytest.skip(reason)
    await client.flushdb()
    return client


@contextlib.asynccontextmanager
async def redis_database(db: int) -> AsyncIterator[str]:
    """The URL of flushed database ``db`` of the local Redis, flushed again afterwards."""
    url = redis_url(db)
    client = await fresh_redis(url)
    try:
        yield url
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """A buffer to pass to ``configure_logging(stream=...)``; structlog's and the root logger's
    configuration are put back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    yield buffer
    structlog.reset_defaults()
    root.handlers[:], level = saved
    root.setLevel(level)


class Exits:
    """Processes to see end (Linux): a pidfd of each, opened now, while they run (one already
    gone counts as ended). :meth:`wait` blocks until they have all exited, on the pidfds, with no
    polling; call it off the event loop (``asyncio.to_thread``)."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._fds: dict[int, int] = {}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                self._fds[os.pidfd_open(pid)] = pid

    def wait(self, timeout_s: float) -> list[int]:
        """The pids still running after ``timeout_s`` (none: all exited); closes the pidfds."""
        poller = poll()
        for fd in self._fds:
            poller.register(fd, POLLIN)
        waiting = dict(self._fds)
        deadline = time.monotonic() + timeout_s
        try:
            while waiting and (left := deadline - time.monotonic()) > 0:
                for fd, _ in poller.poll(left * 1000):
                    poller.unregister(fd)
                    del waiting[fd]
            return sorted(waiting.values())
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds = {}
