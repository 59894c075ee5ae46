"""``python -m bench.limits_micro [N] [--sqlite] [--no-calibrate]``: the limits policy alone.

Runs the limits middleware (a team budget and rate limits, a price for ``meridian-1``) over a
leased store (``batch_s: 1``; on SQLite with ``--sqlite``, else in memory) around a handler that
answers the benchmark's chat answer at once, N times after a warm-up, and prints the wall and CPU
microseconds a request. Under valgrind, the difference of two runs' instruction totals over the
difference of their N is the policy's instructions a request (N = 2000, then 4000):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python -m bench.limits_micro 2000 --no-calibrate

Around the timed requests it runs ``python -m bench.calibrate``'s loop and prints both readings:
the microseconds of two VMs, or of two moments of one noisy VM, are only comparable next to how
fast each ran Python then. ``--no-calibrate`` leaves that out (under valgrind it is only time).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from sidegate.config.budgets import Price
from sidegate.middlewares.contract import CALL_KEY, Call, EndpointKind, Principal, Route, Vendor
from sidegate.middlewares.limits import (
    BudgetRule,
    Limits,
    LimitsSettings,
    RateRule,
    limits_middleware,
)
from sidegate.middlewares.pricing import rates
from sidegate.middlewares.store import MemoryStores
from sidegate.middlewares.store.leases import LeasedStores
from sidegate.middlewares.store.sqlite import SqliteStores

from . import calibrate
from .upstream import _chat_body
from .workloads import CHAT_BODY, CHAT_MODEL

_ROUTE = Route(
    "meridian", Vendor.MERIDIAN, EndpointKind.CHAT, "/v1/chat/completions", CHAT_MODEL, CHAT_MODEL
)
_ANSWER = _chat_body()


async def run(
    n: int, *, sqlite: bool = False, warmup: int = 2000, count: bool = False
) -> tuple[float, float, int | None]:
    """Wall and CPU microseconds a request over ``n`` requests; with ``count``, the ledger entries
    the store holds afterwards (each request, warm-up included, charged once). Counting reads the
    ledger, so the command line does not: its instructions would mix with the policy's."""
    settings = LimitsSettings(
        teams={"bench": Limits(BudgetRule(10**18, "monthly"), RateRule(10**8, 10**11))},
        prices={CHAT_MODEL: rates(Price(input=Decimal("2.50"), output=Decimal("10.00")))},
    )
    with tempfile.TemporaryDirectory() as directory:
        inner = (
            await SqliteStores.open(str(Path(directory) / "limits.db"))
            if sqlite
            else MemoryStores()
        )
        stores = LeasedStores(inner, batch_s=1)
        middleware = limits_middleware(settings, stores)
        principal = Principal("bench", "bench")

        async def handler(request: Any) -> web.StreamResponse:
            request[CALL_KEY].upstream_status = 200
            return web.Response(body=_ANSWER, content_type="application/json")

        async def one() -> None:
            call = Call("bench", _ROUTE, CHAT_BODY, "application/json", principal)
            await middleware({CALL_KEY: call}, handler)  # type: ignore[arg-type]

        for _ in range(warmup):
            await one()
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            await one()
            if i % 1000 == 0:
                await asyncio.sleep(0)  # let the lease writer run
        await stores.meter.flush(final=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        entries = None
        if count:
            since = datetime.now(UTC) - timedelta(days=1)
            entries = len(await stores.ledger.query("bench", since, since + timedelta(days=2)))
        await stores.close()
    return wall / n * 1e6, cpu / n * 1e6, entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits_micro", description=__doc__)
    parser.add_argument("requests", type=int, nargs="?", default=20_000)
    parser.add_argument("--sqlite", action="store_true", help="the SQLite store, not memory")
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="leave out the calibration readings before and after",
    )
    args = parser.parse_args(argv)
    before = calibrate.measure() if args.calibrate else None
    wall, cpu, _ = asyncio.run(run(args.requests, sqlite=args.sqlite))
    n = args.requests
    line = f"limits policy: {wall:.2f} us wall, {cpu:.2f} us CPU a request ({n} requests)"
    if before is not None:
        after = calibrate.measure()
        line += f"; python -m bench.calibrate read {before:.1f} ms before, {after:.1f} ms after"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
