"""``python -m bench.embeddings_cache``: a fully cached 16-item embeddings request vs forwarding it.

Runs the built-in mock Meridian (``sidegate mock meridian``, whose vectors are per item) and
``sidegate serve`` with the in-process embeddings cache, each pinned to its own CPU, and sends the
same 16 × 1536-dimension request sequentially: first with ``Cache-Control: no-store`` (every item
forwarded, nothing cached), then again after one warming request (every item a hit). It prints, per
case, the gateway process's CPU milliseconds per request (``/proc`` utime + stime) and the client's
p50 / p99 latency, for both ``encoding_format`` values; and the bytes the cache holds per vector.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml

from bench.procstat import cpu_ms_per_request, sample_cpu
from bench.stats import percentile

KEY = "sg-bench-embeddings-cache-key-000000000000000"
SIDEGATE = Path(sys.executable).with_name("sidegate")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(upstream: int, port: int) -> dict[str, object]:
    from sidegate.middlewares.api_keys import hash_key

    return {
        "server": {"host": "127.0.0.1", "port": port, "watch_config": False},
        "store": {"kind": "memory"},
        "upstreams": {
            "meridian": {
                "kind": "meridian",
                "base_url": f"http://127.0.0.1:{upstream}",
                "keys": [{"id": "bench", "secret": "sk-bench"}],
                "models": ["meridian-embed-3"],
            }
        },
        "auth": {"api_keys": [{"id": "bench", "team": "bench", "hash": hash_key(KEY)}]},
        "teams": {"bench": {}},
        "retry": {"max_attempts": 1},
        "cache": {"embeddings": {"ttl_s": 3600}},
    }


@contextlib.asynccontextmanager
async def _processes(directory: Path, pin: bool) -> AsyncIterator[tuple[str, int]]:
    upstream, port = _port(), _port()
    config = directory / "sidegate.yaml"
    config.write_text(yaml.safe_dump(_config(upstream, port)))
    pin_mock = ["taskset", "-c", "1"] if pin else []
    pin_gate = ["taskset", "-c", "0"] if pin else []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    mock = await asyncio.create_subprocess_exec(
        *pin_mock, str(SIDEGATE), "mock", "meridian", "--port", str(upstream), **quiet
    )
    gate = await asyncio.create_subprocess_exec(
        *pin_gate,
        str(SIDEGATE),
        "serve",
        "--config",
        str(config),
        "--log-level",
        "warning",
        **quiet,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/readyz") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError("sidegate did not become ready")
                await asyncio.sleep(0.1)
        yield url, gate.pid
    finally:
        for proc in (gate, mock):
            proc.terminate()
        for proc in (gate, mock):
            await asyncio.wait_for(proc.wait(), timeout=10)


async def _case(
    session: aiohttp.ClientSession,
    url: str,
    pid: int,
    body: dict[str, object],
    cached: bool,
    n: int,
) -> dict[str, float | None]:
    headers = {"Authorization": f"Bearer {KEY}"}
    if not cached:
        headers["Cache-Control"] = "no-store"
    else:
        async with session.post(f"{url}/v1/embeddings", json=body, headers=headers) as warm:
            await warm.read()
    latencies: list[float] = []
    before = sample_cpu(pid)
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(f"{url}/v1/embeddings", json=body, headers=headers) as response:
            await response.read()
            expected = "hit" if cached else "miss"
            if response.status != 200 or response.headers.get("x-sidegate-cache") != expected:
                raise RuntimeError(f"unexpected answer {response.status}")
        latencies.append((time.perf_counter() - started) * 1000.0)
    after = sample_cpu(pid)
    return {
        "cpu_ms": cpu_ms_per_request(before, after, n),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


async def _bytes_per_vector() -> float:
    from sidegate.middlewares.embeddings_cache import MemoryVectorCache

    cache = MemoryVectorCache(1 << 30)
    vector = bytes(1536 * 4)
    await cache.set_many({os.urandom(32): vector for _ in range(100)}, 3600)
    return cache.bytes_held / 100


async def _run(n: int, pin: bool) -> None:
    items = [f"document {i}: " + "lorem ipsum dolor sit amet " * 8 for i in range(16)]
    directory = Path(tempfile.mkdtemp(prefix="sidegate-bench-emb-"))
    try:
        async with _processes(directory, pin) as (url, pid), aiohttp.ClientSession() as session:
            rows = []
            for encoding in ("float", "base64"):
                body = {
                    "model": "meridian-embed-3",
                    "input": items,
                    "dimensions": 1536,
                    "encoding_format": encoding,
                }
                for cached in (False, True):
                    result = await _case(session, url, pid, body, cached, n)
                    rows.append((encoding, "fully cached" if cached else "forwarded", result))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"16 items x 1536 dimensions, {n} sequential requests per case")
    print(f"{'encoding':<9}{'case':<14}{'gateway CPU ms/req':>20}{'p50 ms':>9}{'p99 ms':>9}")
    for encoding, case, result in rows:
        cpu, p50, p99 = result["cpu_ms"], result["p50"], result["p99"]
        print(f"{encoding:<9}{case:<14}{cpu or 0:>20.3f}{p50 or 0:>9.2f}{p99 or 0:>9.2f}")
    print(f"bytes held per cached 1536-dimension vector: {await _bytes_per_vector():,.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings_cache", description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args()
    asyncio.run(_run(args.requests, pin=not args.no_pin and shutil.which("taskset") is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
