"""Knock-outs: what a part of sidegate costs, measured as the CPU saved by running without it.

``python -m bench.knockout PART[,PART...] -- SERVE-ARGS`` runs ``sidegate serve SERVE-ARGS`` as
shipped (the same event loop, logging and garbage-collector settings) with the named parts taken
out once the config is active. A part is one of:

- ``access_log``: the app middleware that assigns the request id, logs (and counts) a line and
  stamps responses with x-request-id and the rate-limit headers (replaced by the error
  middleware, which it also is: errors keep their envelope);
- a policy of the config's chain: ``auth``, ``routing``, ``embeddings_cache``, ``limits``,
  ``ratelimit_headers``;
- an upstream client middleware: ``retry``, ``key_rotation``.

A part the config's chain does not have stops start-up (RuntimeError). What runs is not a
usable gateway: a part knocked out no longer does its work (``routing`` and ``auth`` cannot go,
the handler needs both), and a reload brings the whole chain back. ``bench/knockouts.sh``
measures each knock-out against the floor and sidegate as shipped, interleaved. Counting
instructions (``instructions.sh``) says how much work a part is; this says what it costs on the
CPU, which for sidegate's code runs well above what its instruction count suggests.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

from aiohttp import web

from sidegate.middlewares.errors import error_middleware
from sidegate.proxy import app as gateway
from sidegate.proxy import cli
from sidegate.proxy.state import STATE_KEY

__all__ = ["APP_PARTS", "knock_out", "main"]

APP_PARTS = ("access_log",)
_ACCESS_LOG = "access_log_middleware.<locals>.access_log"
_NEEDED = frozenset({"auth", "routing"})


def knock_out(app: web.Application, parts: Collection[str]) -> None:
    """Take ``parts`` out of the gateway ``app`` (made by ``create_app``, not started yet)."""
    if "access_log" in parts:  # the errors' envelope stays: what the access log also does
        index = next(i for i, m in enumerate(app.middlewares) if m.__qualname__ == _ACCESS_LOG)
        app.middlewares[index] = error_middleware
    chain_parts = set(parts) - set(APP_PARTS)

    async def drop(app: web.Application) -> None:  # runs once the config is active
        state = app[STATE_KEY]
        active = state.active
        assert active is not None
        policies = dict(zip(active.names, active.policies, strict=False))
        clients = dict(zip(active.names[len(policies) :], active.client_middlewares, strict=True))
        missing = chain_parts - policies.keys() - clients.keys()
        if missing:
            raise RuntimeError(f"this config's chain has no {', '.join(sorted(missing))}")
        kept = {name: p for name, p in policies.items() if name not in chain_parts}
        kept_clients = {name: c for name, c in clients.items() if name not in chain_parts}
        state.active = dataclasses.replace(
            active,
            policies=tuple(kept.values()),
            client_middlewares=tuple(kept_clients.values()),
            names=(*kept, *kept_clients),
            _chains={},
        )

    if chain_parts:
        app.on_startup.append(drop)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    parts = frozenset(part for part in args[0].split(",") if part)
    if parts & _NEEDED:
        print(f"knockout: {', '.join(sorted(parts & _NEEDED))} cannot go", file=sys.stderr)
        return 2
    create_app: Callable[..., web.Application] = gateway.create_app

    def knocked(*a: Any, **kw: Any) -> web.Application:
        app = create_app(*a, **kw)
        knock_out(app, parts)
        return app

    cli.create_app = knocked  # serve as shipped, with the parts taken out
    return cli.main(["serve", *args[2:]])


if __name__ == "__main__":
    raise SystemExit(main())
