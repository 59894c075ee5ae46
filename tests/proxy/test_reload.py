"""Reload: a valid config is swapped in whole; an invalid one leaves the running config alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from structlog.testing import capture_logs

from sidegate.config.loader import load_config
from sidegate.config.models import SidegateConfig
from sidegate.proxy import create_app, reload_config
from sidegate.proxy.state import STATE_KEY
from tests.conftest import ADMIN, AiohttpClient, AiohttpServer, Upstream, base_config

CHAT = {"model": "meridian-1", "messages": [{"role": "user", "content": "hi"}]}


def _write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


async def _models(client: Any) -> list[str]:
    body = await (await client.get("/v1/models")).json()
    return [model["id"] for model in body["data"]]


async def test_valid_reload_swaps_and_invalid_reload_keeps_the_old_config(
    aiohttp_client: AiohttpClient, meridian: Upstream, meivan: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "sidegate.yaml"
    config = base_config(meridian.url, meivan.url)
    _write(path, config)
    app = create_app(path)
    client = await aiohttp_client(app, headers=ADMIN)
    assert "fresh" not in await _models(client)

    config["models"]["fresh"] = {"upstream": "meridian", "model": "meridian-1"}
    _write(path, config)
    assert await reload_config(app) is True
    assert "fresh" in await _models(client)

    path.write_text(
        path.read_text()
        + "cache:\n  embeddings:\n    ttl_s: zero\n    scopee: team\n"
        + "upstreams_typo: {}\n"
    )
    with capture_logs() as logs:
        assert await reload_config(app) is False
    rejected = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
    assert len(rejected) == 1
    problems = rejected[0]["problems"]
    assert "cache.embeddings.ttl_s" in problems
    assert "cache.embeddings.scopee" in problems
    assert "upstreams_typo" in problems
    assert f"{path}:" in problems
    assert "fresh" in await _models(client)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'sidegate_config_reloads_total{result="applied"} 1.0' in metrics
    assert 'sidegate_config_reloads_total{result="rejected"} 1.0' in metrics


async def test_requests_in_flight_finish_on_the_config_they_started_with(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"served_by": "old"})

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", slow)
    upstream = await aiohttp_server(upstream_app)
    config = base_config(str(upstream.make_url("")).rstrip("/"), "http://127.0.0.1:9")
    path = tmp_path / "sidegate.yaml"
    _write(path, config)
    app = create_app(path)
    client = await aiohttp_client(app, headers=ADMIN)

    in_flight = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await asyncio.wait_for(arrived.wait(), timeout=5)
    config["upstreams"]["meridian"]["models"] = ["meridian-2"]
    config["models"] = {}
    config["teams"]["search"] = {"models": ["meridian-2"]}
    _write(path, config)
    assert await reload_config(app) is True
    release.set()
    response = await asyncio.wait_for(in_flight, timeout=5)
    assert response.status == 200
    assert await response.json() == {"served_by": "old"}
    after = await client.post("/v1/chat/completions", json=CHAT)
    assert after.status == 404
    assert app[STATE_KEY].active is not None
    assert "meridian-2" in app[STATE_KEY].active.runtime.models


async def test_reload_of_an_app_built_from_an_object_is_refused(
    aiohttp_client: AiohttpClient, meridian: Upstream, meivan: Upstream
) -> None:
    app = create_app(SidegateConfig.model_validate(base_config(meridian.url, meivan.url)))
    await aiohttp_client(app)
    with pytest.raises(RuntimeError, match="config file"):
        await reload_config(app)


async def test_an_app_built_from_a_loaded_config_with_its_source_reloads_from_that_file(
    aiohttp_client: AiohttpClient, meridian: Upstream, meivan: Upstream, tmp_path: Path
) -> None:
    """What ``sidegate serve`` does: the file is read once, and the app built from what was read
    (a change made after the read is not picked up until a reload), then reloads from the file."""
    path = tmp_path / "sidegate.yaml"
    config = base_config(meridian.url, meivan.url)
    _write(path, config)
    loaded = load_config(path)
    config["models"]["fresh"] = {"upstream": "meridian", "model": "meridian-1"}
    _write(path, config)  # after the read: the app serves what was read

    app = create_app(loaded, source=path)
    client = await aiohttp_client(app, headers=ADMIN)
    assert "fresh" not in await _models(client)
    assert await reload_config(app) is True
    assert "fresh" in await _models(client)


def test_a_source_beside_a_path_is_refused(tmp_path: Path) -> None:
    """``source`` names the file of a loaded config; beside a path it is a misuse, refused before
    anything is read."""
    path = tmp_path / "absent.yaml"  # never read: the refusal comes first
    with pytest.raises(TypeError, match="source"):
        create_app(path, source=path)
