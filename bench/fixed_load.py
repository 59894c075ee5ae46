"""Send a fixed number of requests at a fixed concurrency (``bench/instructions.sh`` uses it).

``python -m bench.fixed_load URL N C [stream]``: N chat requests (streamed with ``stream``) with
the benchmark's key, C at a time; fails on any status but 200.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from .workloads import BENCH_KEY, CHAT_BODY, STREAM_BODY


async def send(url: str, count: int, concurrency: int, stream: bool) -> None:
    body = STREAM_BODY if stream else CHAT_BODY
    headers = {"authorization": f"Bearer {BENCH_KEY}", "content-type": "application/json"}
    left = count
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{url}: {response.status} {await response.text()}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":
    url, count, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    asyncio.run(send(url, count, concurrency, stream=sys.argv[4:] == ["stream"]))
