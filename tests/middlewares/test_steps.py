"""Steps: policies that act only before the handler, run in one coroutine by ``compose``, and
as ordinary middlewares on an app of one's own."""

from __future__ import annotations

import asyncio
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


async def test_steps_that_finish_at_once_add_no_frame_and_the_rest_share_one(
    aiohttp_client: AiohttpClient,
) -> None:
    frames: dict[str, str] = {}

    def run_of(*policies: Middleware) -> Handler:
        composed = compose(list(policies), _handler)

        async def via_compose(request: web.Request) -> web.StreamResponse:
            awaitable = composed(request)  # what the caller awaits
            frames[request.path] = awaitable.cr_code.co_qualname  # type: ignore[attr-defined]
            return await awaitable

        return via_compose

    app = web.Application(middlewares=[_start_trail])
    # Steps that finish at once: the caller awaits the handler's own coroutine.
    app.router.add_get("/at-once", run_of(_step("auth"), _step("mark")))
    # A step that waits: it and the steps after it run in one coroutine.
    app.router.add_get("/waits", run_of(_step("auth"), _step("routing", wait=True), _step("mark")))
    # A middleware that is not a step keeps its own coroutine, inside the run.
    app.router.add_get("/around", run_of(_step("auth"), _around("limits")))
    client = await aiohttp_client(app)
    texts = [await (await client.get(path)).text() for path in ("/at-once", "/waits", "/around")]
    assert texts == ["auth,mark,handler", "auth,routing,mark,handler", "auth,limits>,handler"]
    assert frames == {
        "/at-once": "_handler",
        "/waits": "_resume",
        "/around": "_around.<locals>.around",
    }
    assert compose([], _handler) is _handler


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
