"""``python -m bench.embeddings_cache``: a fully cached 16-item embeddings request vs forwarding it.

Runs the built-in mock Meridian (``sidegate mock meridian``, whose vectors are per item) and
``sidegate serve`` with the in-process embeddings cache, each pinned to its own CPU, and sends a
16 × 1536-dimension request sequentially: first with ``Cache-Control: no-store`` (every item
forwarded, nothing cached), then again after one warming request in the same format (every item a
hit), then after one warming request in the other format (a hit on a vector kept the other way).
It does so for both ``encoding_format`` values, with the gateway keeping float answers each way
(``cache.embeddings.float_answers``: ``text``, the default, and ``float32``), and prints per case
the gateway process's CPU milliseconds per request (``/proc`` utime + stime), the client's p50 /
p99 latency, and the bytes the cache holds per vector in each form.
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

from bench.procstat import TICKS_PER_S, cpu_ms_per_request, sample_cpu
from bench.stats import percentile

KEY = "sg-bench-embeddings-cache-key-000000000000000"
SIDEGATE = Path(sys.executable).with_name("sidegate")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(upstream: int, port: int, float_answers: str) -> dict[str, object]:
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
        "cache": {"embeddings": {"ttl_s": 3600, "float_answers": float_answers}},
    }


@contextlib.asynccontextmanager
async def _processes(
    directory: Path, pin: bool, float_answers: str
) -> AsyncIterator[tuple[str, int]]:
    upstream, port = _port(), _port()
    config = directory / "sidegate.yaml"
    config.write_text(yaml.safe_dump(_config(upstream, port, float_answers)))
    pin_mock = ["taskset", "-c", "1"] if pin else []
    pin_gate = ["taskset", "-c", "0"] if pin else []
    quiet = subprocess.DEVNULL
    mock = await asyncio.create_subprocess_exec(
        *pin_mock,
        str(SIDEGATE),
        "mock",
        "meridian",
        "--port",
        str(upstream),
        stdout=quiet,
        stderr=quiet,
    )
    gate = await asyncio.create_subprocess_exec(
        *pin_gate,
        str(SIDEGATE),
        "serve",
        "--config",
        str(config),
        "--log-level",
        "warning",
        stdout=quiet,
        stderr=quiet,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            # Both must listen: the gateway is ready before the mock may be (was a 502 at times).
            for ready, name in (
                (f"{url}/readyz", "sidegate"),
                (f"http://127.0.0.1:{upstream}/", "the mock"),
            ):
                deadline = time.monotonic() + 30
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(ready) as response:
                            if response.status < 500:
                                break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not become ready")
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
    warm: dict[str, object] | None,
    n: int,
) -> dict[str, float | None]:
    """``n`` requests of ``body``: forwarded (``warm`` None), else hits after ``warm``."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if warm is None:
        headers["Cache-Control"] = "no-store"
    else:
        async with session.post(f"{url}/v1/embeddings", json=warm, headers=headers) as warming:
            await warming.read()
    latencies: list[float] = []
    before = sample_cpu(pid)
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(f"{url}/v1/embeddings", json=body, headers=headers) as response:
            await response.read()
            expected = "miss" if warm is None else "hit"
            if response.status != 200 or response.headers.get("x-sidegate-cache") != expected:
                detail = (await response.read())[:300]
                raise RuntimeError(f"unexpected answer {response.status}: {detail!r}")
        latencies.append((time.perf_counter() - started) * 1000.0)
    after = sample_cpu(pid)
    return {
        "cpu_ms": cpu_ms_per_request(before, after, n),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


DEFAULT_REQUESTS = 2000  # a case: enough that one CPU tick is worth little a request


def tick_ms_a_request(n: int, ticks_per_s: int = TICKS_PER_S) -> float:
    """What one CPU tick is worth a request over ``n`` requests (the kernel counts a process's
    CPU in whole ticks)."""
    return 1000.0 / ticks_per_s / n


def resolution_note(n: int, ticks_per_s: int = TICKS_PER_S) -> str:
    """What one CPU tick is worth a request over ``n`` requests: two cases closer than that are
    not told apart."""
    return (
        f"CPU is counted in ticks of {1000.0 / ticks_per_s:g} ms: "
        f"{tick_ms_a_request(n, ticks_per_s):.3f} ms a request over {n} "
        "requests; cases closer than that are not told apart"
    )


async def _bytes_per_vector(keep_text: bool) -> float:
    from sidegate.middlewares.embeddings_cache import MemoryVectorCache
    from sidegate.middlewares.embeddings_cache_codec import stored
    from sidegate.proxy.mock import vector

    cache = MemoryVectorCache(1 << 30)
    entries = {}
    for i in range(100):
        kept = stored(vector(b"s%d" % i, 1536), keep_text=keep_text)
        assert kept is not None
        entries[os.urandom(32)] = kept
    await cache.set_many(entries, 3600)
    return cache.bytes_held / 100


def _body(encoding: str, items: list[str]) -> dict[str, object]:
    return {
        "model": "meridian-embed-3",
        "input": items,
        "dimensions": 1536,
        "encoding_format": encoding,
    }


async def _run(n: int, pin: bool) -> None:
    rows = []
    for float_answers in ("text", "float32"):
        directory = Path(tempfile.mkdtemp(prefix="sidegate-bench-emb-"))
        try:
            async with (
                _processes(directory, pin, float_answers) as (url, pid),
                aiohttp.ClientSession() as session,
            ):
                for encoding, other in (("float", "base64"), ("base64", "float")):
                    items = [
                        f"{encoding} {i}: " + "lorem ipsum dolor sit amet " * 8 for i in range(16)
                    ]
                    crossed = [f"x{item}" for item in items]  # stored by the other encoding
                    for case, body, warm in (
                        ("forwarded", _body(encoding, items), None),
                        ("cached", _body(encoding, items), _body(encoding, items)),
                        (f"cached as {other}", _body(encoding, crossed), _body(other, crossed)),
                    ):
                        result = await _case(session, url, pid, body, warm, n)
                        rows.append((float_answers, encoding, case, result))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"16 items x 1536 dimensions, {n} sequential requests per case")
    print(resolution_note(n))
    print(
        f"{'float_answers':<14}{'encoding':<9}{'case':<18}{'gateway CPU ms/req':>19}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
    )
    for float_answers, encoding, case, result in rows:
        cpu, p50, p99 = result["cpu_ms"], result["p50"], result["p99"]
        print(
            f"{float_answers:<14}{encoding:<9}{case:<18}{cpu or 0:>19.3f}{p50 or 0:>9.2f}"
            f"{p99 or 0:>9.2f}"
        )
    text, float32 = await _bytes_per_vector(True), await _bytes_per_vector(False)
    print(
        f"bytes held per cached 1536-dimension vector: {float32:,.0f} as float32, "
        f"{text:,.0f} as text (the mock's numbers)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings_cache", description=__doc__)
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"per case (default {DEFAULT_REQUESTS}: "
        f"{tick_ms_a_request(DEFAULT_REQUESTS):g} ms a tick here)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args()
    asyncio.run(_run(args.requests, pin=not args.no_pin and shutil.which("taskset") is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
