"""An app that calls Meridian directly, with sidegate's retry and key rotation on its own session.

MERIDIAN_KEYS=sk-1,sk-2 python examples/direct_client.py https://api.meridian.so
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

import aiohttp

from sidegate.middlewares.keys import KeyPools, KeySpec, PoolSpec, key_rotation_middleware
from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.retry import retry_middleware


@dataclass(frozen=True)
class Retry:
    """Retry settings (any object with these attributes; sidegate's RetryConfig is one)."""

    max_attempts: int = 4
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    deadline_s: float = 60.0
    retry_on: tuple[str, ...] = ("connect_error", "429", "503")
    retry_on_idempotent: tuple[str, ...] = ("502", "504", "read_timeout", "disconnected")
    budget_ratio: float = 0.2
    budget_min: int = 3


def make_session(keys: list[str], *, retry: Retry = Retry()) -> aiohttp.ClientSession:
    """A session whose requests to the "meridian" upstream rotate over ``keys`` and retry."""
    pools = KeyPools()
    pools.rebuild({"meridian": PoolSpec([KeySpec(f"key-{n}", k) for n, k in enumerate(keys)])})
    return aiohttp.ClientSession(
        middlewares=(retry_middleware(retry), key_rotation_middleware(pools.resolve))
    )


async def chat(session: aiohttp.ClientSession, base_url: str, prompt: str) -> tuple[str, Outbound]:
    """One chat completion; returns the reply and what the middlewares did."""
    body = {"model": "meridian-1", "messages": [{"role": "user", "content": prompt}]}
    with outbound_scope(Outbound(upstream="meridian")) as outbound:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            reply = await response.json()
    return reply["choices"][0]["message"]["content"], outbound


async def main(base_url: str) -> None:
    async with make_session(os.environ["MERIDIAN_KEYS"].split(",")) as session:
        reply, outbound = await chat(session, base_url, "hello")
        print(reply, f"({outbound.attempts} attempt(s), key {outbound.key_id})")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
