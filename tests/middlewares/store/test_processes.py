"""The budget holds across processes: two workers race on one sqlite file, and on one Redis."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from sidegate.middlewares.store import BudgetStatus, Scope, Stores, open_stores
from tests.middlewares.store.conftest import REDIS_URL, fresh_redis

WORKER = Path(__file__).with_name("race_worker.py")


async def race(kind: str, where: str, workers: int = 2, each: int = 10) -> list[str]:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            kind,
            where,
            f"w{n}",
            str(each),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(workers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line == b"ready\n", line
        outputs = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate(b"go\n") for proc in procs)), 30
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    admitted: list[str] = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        admitted += orjson.loads(out)
    return admitted


async def check(stores: Stores, admitted: list[str]) -> None:
    ledger = await stores.ledger.query(
        "race", datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    )
    assert len(admitted) == 10
    assert {name.split("-")[0] for name in admitted} <= {"w0", "w1"}
    assert await stores.budgets.status(Scope("race"), "total") == BudgetStatus(100, 0)
    assert sorted(e.request_id for e in ledger) == sorted(admitted)
    assert sum(e.cost_nano for e in ledger) == 100


async def test_two_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    stores = await open_stores("sqlite", path=path)
    try:
        await check(stores, await race("sqlite", path))
    finally:
        await stores.close()


@pytest.mark.redis
async def test_two_processes_on_one_redis() -> None:
    client = await fresh_redis()
    await client.aclose()
    stores = await open_stores("redis", url=REDIS_URL)
    try:
        await check(stores, await race("redis", REDIS_URL))
    finally:
        await stores.close()
