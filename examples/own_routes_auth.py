"""sidegate's auth middleware on an app's own routes, without the gateway.

    python examples/own_routes_auth.py
    curl -H 'Authorization: Bearer sg-demo-local-mock-only-not-a-secret-0000000000' \\
         localhost:8001/whoami
"""

from __future__ import annotations

from aiohttp import web

from sidegate.middlewares.api_keys import ApiKey, ApiKeyTable, hash_key
from sidegate.middlewares.auth import auth_middleware
from sidegate.middlewares.contract import PRINCIPAL_KEY
from sidegate.middlewares.errors import error_middleware

DEMO_KEY = "sg-demo-local-mock-only-not-a-secret-0000000000"


async def whoami(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL_KEY]
    return web.json_response({"team": principal.team, "key": principal.key_id})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    keys = ApiKeyTable([ApiKey("demo", "demo", hash_key(DEMO_KEY))])
    app = web.Application(
        middlewares=[
            error_middleware,
            auth_middleware(api_keys=keys, exempt=lambda request: request.path == "/health"),
        ]
    )
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=8001)
