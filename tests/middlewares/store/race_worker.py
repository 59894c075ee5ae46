"""A worker process for the multi-process proofs: ``python race_worker.py KIND WHERE NAME N``.

Opens the shared store (a sqlite path or a Redis URL), prints ``ready``, waits for a line on
stdin, then races N reservations of 10 nano-USD against a limit of 100 and commits each admitted
one at 10 with a ledger entry. Prints the admitted ids as JSON.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import orjson

from sidegate.middlewares.store import LedgerEntry, Scope, open_stores

SCOPE = Scope("race")
PERIOD = "total"


async def main(kind: str, where: str, name: str, count: int) -> None:
    stores = await open_stores(kind, path=where, url=where)  # type: ignore[arg-type]
    try:
        await stores.ping()
        print("ready", flush=True)
        sys.stdin.readline()
        ids = [f"{name}-{i}" for i in range(count)]
        results = await asyncio.gather(
            *(stores.budgets.reserve(SCOPE, PERIOD, 100, 10, rid, 60) for rid in ids)
        )
        admitted = [rid for rid, result in zip(ids, results, strict=True) if result.admitted]
        for rid in admitted:
            entry = LedgerEntry(
                timestamp=datetime.now(UTC),
                team=SCOPE.team,
                key_id=None,
                upstream="meridian",
                model="meridian-1",
                kind="chat",
                cost_nano=10,
                request_id=rid,
            )
            await stores.budgets.commit(SCOPE, PERIOD, rid, 10, entry)
        print(orjson.dumps(admitted).decode(), flush=True)
    finally:
        await stores.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
