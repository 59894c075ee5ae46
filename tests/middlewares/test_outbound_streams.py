"""A response is never retried once returned: a stream cut mid-way ends the caller's stream."""

from __future__ import annotations

import aiohttp
import pytest

from sidegate.middlewares.outbound import outbound_scope
from sidegate.proxy.mock import Fault
from tests.conftest import Upstream
from tests.middlewares.test_outbound_support import CHAT, FakeClock, pool, session

pytestmark = pytest.mark.usefixtures("rotation")  # key rotation apart, and in retry


async def collect(response: aiohttp.ClientResponse, events: list[bytes]) -> None:
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(line)


async def test_sse_reset_after_two_events_is_not_retried(meridian: Upstream) -> None:
    clock = FakeClock()
    keys = pool("a", "b", clock=clock)
    meridian.state.script(Fault(reset_after_events=2))
    events: list[bytes] = []
    async with session(clock, keys) as client:
        with outbound_scope() as outbound:
            async with client.post(
                meridian.url + "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers={"Idempotency-Key": "stream-1"},
            ) as response:
                assert response.status == 200
                assert response.content_type == "text/event-stream"
                with pytest.raises(aiohttp.ClientPayloadError):
                    await collect(response, events)

    assert len(events) == 2
    assert meridian.state.count() == 1
    assert (outbound.attempts, outbound.waits, clock.sleeps) == (1, [], [])


async def test_a_complete_stream_passes_through_untouched(meridian: Upstream) -> None:
    clock = FakeClock()
    async with (
        session(clock, pool("a", clock=clock)) as client,
        client.post(
            meridian.url + "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as response,
    ):
        body = await response.read()

    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: ") == meridian.state.stream_chunks + 3
