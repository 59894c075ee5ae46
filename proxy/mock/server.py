"""Running a mock on a real socket, for tests and benchmarks that need a URL."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from .meivan import meivan_app
from .meridian import meridian_app
from .state import MockState

__all__ = ["start_mock"]


async def start_mock(
    vendor: Literal["meridian", "meivan"],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    state: MockState | None = None,
) -> tuple[web.AppRunner, str, MockState]:
    """Serve the ``vendor`` mock on ``host:port`` (0 picks a free port).

    Returns the runner (``await runner.cleanup()`` stops it), the base URL without ``/v1``
    (``http://127.0.0.1:PORT``) and the state it records into (``state`` or a fresh one).
    Access logging is off so the mock stays cheap under benchmark load.
    """
    state = MockState() if state is None else state
    app = meridian_app(state) if vendor == "meridian" else meivan_app(state)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    netloc = f"[{host}]" if ":" in host else host
    return runner, f"http://{netloc}:{bound}", state
