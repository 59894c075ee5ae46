"""Meivan's Idempotency-Key: generated once, sent on every attempt, with one upstream key."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.retry import mutating_request
from sidegate.proxy.mock import Fault
from tests.conftest import Upstream
from tests.middlewares.test_outbound_support import FakeClock, pool, session

COMPLETE = {"service_id": "llm.general.v1", "messages": [{"role": "user", "content": "hi"}]}


async def complete(
    client: aiohttp.ClientSession,
    upstream: Upstream,
    outbound: Outbound | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Outbound]:
    with outbound_scope(outbound) as current:
        async with client.post(
            upstream.url + "/v1/complete", json=COMPLETE, headers=headers
        ) as response:
            await response.read()
            return response.status, current


def sent(upstream: Upstream, name: str) -> list[str]:
    return [value for r in upstream.state.received for value in r.headers.getall(name, [])]


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_a_retried_post_carries_one_generated_key_and_one_upstream_key(
    meivan: Upstream,
) -> None:
    clock = FakeClock()
    keys = pool("a", "b", "c", clock=clock)
    meivan.state.script(Fault(status=503), Fault(status=429, retry_after=3), Fault(status=503))
    async with session(clock, keys, generate=mutating_request, rng=0.0) as client:
        status, outbound = await complete(client, meivan)

    assert status == 200
    assert outbound.attempts == 4
    generated = sent(meivan, "Idempotency-Key")
    assert len(generated) == 4
    assert len(set(generated)) == 1
    assert uuid.UUID(generated[0]).version == 4
    assert (outbound.idempotency_key, outbound.idempotency_key_generated) == (generated[0], True)
    assert sent(meivan, "Authorization") == ["Bearer secret-a"] * 4
    assert outbound.key_ids == ["a"] * 4
    assert clock.sleeps == [0.0, 3.0, 0.0]


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_the_next_request_rotates_as_usual(meivan: Upstream) -> None:
    clock = FakeClock()
    keys = pool("a", "b", clock=clock)
    async with session(clock, keys, generate=mutating_request) as client:
        await complete(client, meivan)
        await complete(client, meivan)

    assert sent(meivan, "Authorization") == ["Bearer secret-a", "Bearer secret-b"]
    first, second = sent(meivan, "Idempotency-Key")
    assert first != second


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_a_clients_key_passes_unchanged_and_pins_the_key(meivan: Upstream) -> None:
    clock = FakeClock()
    keys = pool("a", "b", clock=clock)
    meivan.state.script(Fault(status=502))
    async with session(clock, keys, generate=mutating_request) as client:
        status, outbound = await complete(client, meivan, headers={"Idempotency-Key": "order-42"})

    assert status == 200
    assert sent(meivan, "Idempotency-Key") == ["order-42", "order-42"]
    assert sent(meivan, "Authorization") == ["Bearer secret-a"] * 2
    assert not outbound.idempotency_key_generated


async def test_no_key_is_generated_for_reads_or_when_the_caller_says_no(
    meivan: Upstream,
) -> None:
    clock = FakeClock()
    async with session(clock, generate=mutating_request) as client:
        async with client.get(meivan.url + "/v1/services", headers={"Authorization": "Bearer k"}):
            pass
        status, outbound = await complete(
            client,
            meivan,
            Outbound(generate_idempotency_key=False),
            headers={"Authorization": "Bearer k"},
        )

    assert status == 200
    assert sent(meivan, "Idempotency-Key") == []
    assert outbound.idempotency_key is None


@pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry
async def test_a_pinned_key_cooling_down_is_waited_for_not_replaced(meivan: Upstream) -> None:
    clock = FakeClock()
    keys = pool("a", "b", clock=clock)
    meivan.state.script(Fault(status=429, retry_after=20))
    async with session(clock, keys, generate=mutating_request, rng=0.0, deadline_s=10) as client:
        status, outbound = await complete(client, meivan)

    assert status == 429
    assert (outbound.stop_reason, outbound.key_ids) == ("deadline", ["a"])
    assert keys.has_available()
