"""Knock-outs: what a part of sidegate costs, measured as the CPU saved by running without it.

``python -m bench.knockout PART[,PART...] -- SERVE-ARGS`` runs ``sidegate serve SERVE-ARGS`` as
shipped (the same event loop, logging and garbage-collector settings) with the named parts taken
out once the config is active. A part is one of:

- ``access_log``: what every route's handler is bound in, which assigns the request id, logs
  (and counts) a line and stamps responses with x-request-id and the rate-limit headers
  (replaced by the error middleware, which it also is: errors keep their envelope);
- a policy of the config's chain: ``auth``, ``routing``, ``embeddings_cache``, ``limits``,
  ``ratelimit_headers``;
- a part of the upstream client middleware: ``retry``, ``key_rotation`` (one middleware in the
  gateway, retry running key rotation's part; either left alone runs as its own middleware).

A part the config's chain does not have stops start-up (RuntimeError). What runs is not a
usable gateway: a part knocked out no longer does its work (``routing`` and ``auth`` cannot go,
the handler needs both), and a reload brings the whole chain back. Without ``key_rotation`` no
upstream key is sent (the pool puts it on each attempt): the upstream refuses (the benchmark's
mock answers 401), and what is measured is that refusal, not the work left; ``knockouts.sh``
says so when answers are not 2xx. ``bench/knockouts.sh``
measures each knock-out against the floor and sidegate as shipped, interleaved. Counting
instructions (``instructions.sh``) says how much work a part is; this says what it costs on the
CPU, which for sidegate's code runs well above what its instruction count suggests.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Collection, Sequence
from typing import Any
from unittest import mock

from aiohttp import web

from sidegate.middlewares.access_log import AccessLogMiddleware, access_log_middleware
from sidegate.middlewares.errors import error_middleware
from sidegate.proxy import app as gateway
from sidegate.proxy import cli, reload
from sidegate.proxy.state import STATE_KEY

__all__ = ["APP_PARTS", "create_knocked_out", "main"]

APP_PARTS = ("access_log",)
_NEEDED = frozenset({"auth", "routing"})


def create_knocked_out(parts: Collection[str], *args: Any, **kwargs: Any) -> web.Application:
    """``create_app(*args, **kwargs)`` with ``parts`` taken out."""
    access_log = _errors_only if "access_log" in parts else access_log_middleware
    # the errors' envelope stays when the access log goes: what the access log also is
    with mock.patch.object(gateway, "access_log_middleware", access_log):
        app = gateway.create_app(*args, **kwargs)
    chain_parts = set(parts) - set(APP_PARTS)

    async def drop(app: web.Application) -> None:  # runs once the config is active
        state = app[STATE_KEY]
        active = state.active
        assert active is not None
        policies = dict(zip(active.names, active.policies, strict=False))
        clients = active.names[len(policies) :]
        missing = chain_parts - policies.keys() - set(clients)
        if missing:
            raise RuntimeError(f"this config's chain has no {', '.join(sorted(missing))}")
        kept = {name: p for name, p in policies.items() if name not in chain_parts}
        kept_clients, client_middlewares = reload.client_middlewares(
            active.runtime.config, state, leave_out=chain_parts
        )
        state.active = dataclasses.replace(
            active,
            policies=tuple(kept.values()),
            client_middlewares=client_middlewares,
            names=(*kept, *kept_clients),
            _chains={},
        )

    if chain_parts:
        app.on_startup.append(drop)
    return app


def _errors_only(**_: object) -> AccessLogMiddleware:
    """The access log knocked out: what is left of it is the error middleware (which takes the
    endpoint a route binds, and ignores it)."""
    return error_middleware


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    parts = frozenset(part for part in args[0].split(",") if part)
    if parts & _NEEDED:
        print(f"knockout: {', '.join(sorted(parts & _NEEDED))} cannot go", file=sys.stderr)
        return 2
    # as shipped, less the parts
    with mock.patch.object(cli, "create_app", functools.partial(create_knocked_out, parts)):
        return cli.main(["serve", *args[2:]])


if __name__ == "__main__":
    raise SystemExit(main())
