"""The floor: a minimal aiohttp reverse proxy, what any gateway costs at the least.

One ``ClientSession``, with sidegate's default connect, read and total timeouts (a proxy
without a read timeout would be no fair floor: aiohttp re-arms that timer on every chunk); every
request is forwarded with its method, path, query, body and headers
(less hop-by-hop ones) and the answer is streamed back as it arrives. No auth, no routing, no log.

``python -m bench.passthrough --port 9301 --upstream http://127.0.0.1:9300 [--loop uvloop]``
(asyncio's own event loop unless asked: the issue's floor; uvloop to compare loop with loop);
``--reuse-port`` lets several copies share the port (``python -m bench.copies``).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

__all__ = ["main", "make_app"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_UPSTREAM = web.AppKey("upstream", str)


async def _forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    body = await request.read()
    url = request.app[_UPSTREAM] + request.path_qs
    session = request.app[_SESSION]
    async with session.request(
        request.method, url, data=body, headers=headers, allow_redirects=False
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _HOP and name.lower() != "content-length":
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(upstream: str) -> web.Application:
    """The passthrough app forwarding to ``upstream`` (a base URL without a trailing slash)."""

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1024)
        timeout = aiohttp.ClientTimeout(total=600, sock_connect=10, sock_read=120)  # sidegate's
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=timeout
        ) as client:
            app[_SESSION] = client
            yield

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9301)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9300")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--reuse-port", action="store_true", help="bind with SO_REUSEPORT")
    args = parser.parse_args(argv)
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
        reuse_port=args.reuse_port or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
