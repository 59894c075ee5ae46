"""An existing aiohttp app that mounts sidegate under /llm next to its own routes.

python examples/mounted_app.py        # then: curl localhost:8000/llm/v1/models
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

import sidegate.proxy

DEMO = Path(__file__).with_name("demo.yaml")


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"app": "mine"})


def make_app(config_path: Path = DEMO) -> web.Application:
    app = web.Application()
    app.router.add_get("/hello", hello)
    sidegate.proxy.setup(app, config_path, prefix="/llm")
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=8000)
