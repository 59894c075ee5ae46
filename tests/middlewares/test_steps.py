"""Steps: policies that act only before the handler, run in one coroutine by ``compose``, and
as ordinary middlewares on an app of one's own."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidegate.middlewares.errors import BadRequest, error_middleware
from sidegate.middlewares.steps import StepMiddleware, compose
from tests.conftest import AiohttpClient

TRAIL = web.RequestKey("trail", list)


def _step(name: str, *, wait: bool = False, fail: bool = False) -> StepMiddleware:
    def step(request: web.Request) -> Awaitable[None] | None:
        request[TRAIL].append(name)
        if fail:
            raise BadRequest(f"{name} refused")
        return asyncio.sleep(0) if wait else None

    return StepMiddleware(step)


def _around(name: str) -> Middleware:
    @web.middleware
    async def around(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[TRAIL].append(f"{name}>")
        response = await handler(request)
        request[TRAIL].append(f"<{name}")
        return response

    return around


async def _handler(request: web.Request) -> web.StreamResponse:
    request[TRAIL].append("handler")
    return web.Response(text=",".join(request[TRAIL]))


@web.middleware
async def _start_trail(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[TRAIL] = []
    return await handler(request)


def _policies() -> list[Middleware]:
    return [
        _step("auth"),
        _step("routing", wait=True),
        _around("limits"),
        _step("mark"),
    ]


async def test_composed_steps_run_in_order_as_the_same_middlewares_would(
    aiohttp_client: AiohttpClient,
) -> None:
    composed = compose(_policies(), _handler)

    async def via_compose(request: web.Request) -> web.StreamResponse:
        return await composed(request)

    plain = web.Application(middlewares=[_start_trail, *_policies()])
    plain.router.add_get("/", _handler)
    fused = web.Application(middlewares=[_start_trail])
    fused.router.add_get("/", via_compose)
    answers = []
    for app in (plain, fused):
        client = await aiohttp_client(app)
        answers.append(await (await client.get("/")).text())
    assert answers == ["auth,routing,limits>,mark,handler"] * 2


def test_runs_of_steps_share_one_coroutine_and_other_middlewares_keep_theirs() -> None:
    composed = compose(_policies(), _handler)
    # Outermost: the run of auth and routing, one coroutine function around the rest.
    assert inspect.iscoroutinefunction(composed)
    assert composed.__qualname__ == "_after.<locals>.run"
    assert compose([], _handler) is _handler
    only_around = compose([_around("limits")], _handler)
    assert only_around.func.__qualname__ == "_around.<locals>.around"  # type: ignore[attr-defined]


async def test_a_step_that_fails_stops_the_chain_there(aiohttp_client: AiohttpClient) -> None:
    policies = [_step("auth"), _step("routing", fail=True), _step("mark")]
    composed = compose(policies, _handler)
    trails: list[list[str]] = []

    async def via_compose(request: web.Request) -> web.StreamResponse:
        trails.append(request[TRAIL])
        return await composed(request)

    app = web.Application(middlewares=[error_middleware, _start_trail])
    app.router.add_get("/", via_compose)
    client = await aiohttp_client(app)
    response = await client.get("/")
    assert response.status == 400
    assert (await response.json())["error"]["message"] == "routing refused"
    assert trails == [["auth", "routing"]]


@pytest.mark.parametrize("wait", [False, True])
async def test_a_step_is_an_ordinary_middleware_on_its_own(
    aiohttp_client: AiohttpClient, wait: bool
) -> None:
    app = web.Application(middlewares=[_start_trail, _step("auth", wait=wait)])
    app.router.add_get("/", _handler)
    client = await aiohttp_client(app)
    assert await (await client.get("/")).text() == "auth,handler"
