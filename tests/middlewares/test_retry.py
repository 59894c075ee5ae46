"""The retry client middleware against the mock upstreams, on a fake clock: nothing sleeps."""

from __future__ import annotations

import socket
from email.utils import formatdate
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from sidegate.config.resilience import RetryConfig
from sidegate.middlewares.outbound import Outbound, outbound_scope
from sidegate.middlewares.retry import (
    InvalidIdempotencyKey,
    RetryBudget,
    mutating_request,
    retry_middleware,
)
from sidegate.proxy.mock import Fault
from tests.conftest import Upstream
from tests.middlewares.test_outbound_support import CHAT, FakeClock, session

CHAT_PATH = "/v1/chat/completions"
COMPLETE = {"service_id": "llm.general.v1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def chat(
    client: aiohttp.ClientSession, upstream: Upstream, headers: dict[str, str] | None = None
) -> tuple[int, bytes, CIMultiDict[str], Outbound]:
    sent = {"Authorization": "Bearer k", "Content-Type": "application/json", **(headers or {})}
    with outbound_scope() as outbound:
        async with client.post(
            upstream.url + CHAT_PATH, data=orjson.dumps(CHAT), headers=sent
        ) as response:
            body = await response.read()
            return response.status, body, CIMultiDict(response.headers), outbound


@pytest.mark.parametrize("rng", [0.0, 0.5, 0.999, None])
async def test_503_then_200_waits_within_the_jitter_window(
    meridian: Upstream, clock: FakeClock, rng: float | None
) -> None:
    meridian.state.script(Fault(status=503))
    async with session(clock, rng=rng) as client:
        status, _, _, outbound = await chat(client, meridian)

    assert status == 200
    assert outbound.attempts == 2
    assert len(clock.sleeps) == 1
    assert 0.0 <= clock.sleeps[0] < 0.25
    if rng is not None:
        assert clock.sleeps[0] == pytest.approx(rng * 0.25)
    first, second = meridian.state.received
    assert first.body == second.body == orjson.dumps(CHAT)
    assert outbound.response_headers() == {"x-sidegate-attempts": "2"}


async def test_backoff_doubles_up_to_max_delay(meridian: Upstream, clock: FakeClock) -> None:
    meridian.state.script(*[Fault(status=503)] * 5)
    async with session(clock, rng=1.0, max_attempts=6, base_delay_s=1, max_delay_s=5) as client:
        status, _, _, outbound = await chat(client, meridian)

    assert status == 200
    assert clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert outbound.waits == clock.sleeps


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 500])
async def test_other_failures_get_one_attempt(
    meridian: Upstream, clock: FakeClock, status: int
) -> None:
    meridian.state.script(Fault(status=status))
    async with session(clock) as client:
        got, _, _, outbound = await chat(client, meridian)

    assert got == status
    assert meridian.state.count() == 1
    assert clock.sleeps == []
    assert outbound.attempts == 1
    assert not outbound.gave_up


async def test_retry_after_seconds_is_waited_for(meridian: Upstream, clock: FakeClock) -> None:
    meridian.state.script(Fault(status=429, retry_after=2))
    async with session(clock) as client:
        status, *_ = await chat(client, meridian)

    assert status == 200
    assert clock.sleeps == [2.0]
    assert meridian.state.count() == 2


async def test_retry_after_beyond_the_deadline_answers_at_once(
    meridian: Upstream, clock: FakeClock
) -> None:
    meridian.state.script(Fault(status=429, retry_after=30))
    async with session(clock, deadline_s=10) as client:
        status, body, headers, outbound = await chat(client, meridian)

    assert status == 429
    assert headers["Retry-After"] == "30"
    assert orjson.loads(body)["retry-after"] == 30
    assert clock.sleeps == []
    assert meridian.state.count() == 1
    assert (outbound.stop_reason, outbound.gave_up) == ("deadline", False)
    assert "x-should-retry" not in outbound.response_headers()


async def test_http_date_retry_after(meridian: Upstream, clock: FakeClock) -> None:
    when = formatdate(clock.now + 5, usegmt=True)
    meridian.state.script(Fault(status=503, headers={"Retry-After": when}))
    async with session(clock) as client:
        status, *_ = await chat(client, meridian)

    assert status == 200
    assert clock.sleeps == [pytest.approx(5.0, abs=1.0)]


async def test_retry_after_ms(meridian: Upstream, clock: FakeClock) -> None:
    meridian.state.script(Fault(status=429, headers={"retry-after-ms": "1500"}))
    async with session(clock) as client:
        status, *_ = await chat(client, meridian)

    assert status == 200
    assert clock.sleeps == [1.5]


async def test_unparsable_retry_after_falls_back_to_backoff(
    meridian: Upstream, clock: FakeClock
) -> None:
    meridian.state.script(Fault(status=503, headers={"Retry-After": "soon, maybe"}))
    async with session(clock, rng=0.5) as client:
        status, *_ = await chat(client, meridian)

    assert status == 200
    assert clock.sleeps == [0.125]


async def test_meridian_body_retry_after_is_honoured_and_the_body_still_readable(
    meridian: Upstream, clock: FakeClock
) -> None:
    body = b'{"error": {"type": "rate_limit_exceeded", "code": "rate_limit"}, "retry-after": 3}'
    meridian.state.script(*[Fault(status=429, body=body)] * 2)
    async with session(clock, max_attempts=2) as client:
        status, got, _, outbound = await chat(client, meridian)

    assert status == 429
    assert got == body
    assert clock.sleeps == [3.0]
    assert (outbound.attempts, outbound.gave_up, outbound.stop_reason) == (2, True, "max_attempts")
    assert outbound.response_headers()["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("reset", "expected"),
    [("1.5s", 1.5), ("12ms", 0.012), ("2", 2.0), (str(int(FakeClock().now) + 4), 4.0)],
)
async def test_ratelimit_reset_forms(
    meivan: Upstream, clock: FakeClock, reset: str, expected: float
) -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset}
    meivan.state.script(Fault(status=429, headers=headers))
    async with (
        session(clock, rng=0.0) as client,
        client.post(
            meivan.url + "/v1/complete", json=COMPLETE, headers={"Authorization": "Bearer k"}
        ) as response,
    ):
        assert response.status == 200

    assert clock.sleeps == [pytest.approx(expected, abs=1e-6)]


async def test_502_is_retried_only_with_an_idempotency_key(
    meridian: Upstream, clock: FakeClock
) -> None:
    meridian.state.script(Fault(status=502), Fault(status=502))
    async with session(clock) as client:
        plain, *_ = await chat(client, meridian)
        keyed, *_ = await chat(client, meridian, headers={"Idempotency-Key": "abc-1"})

    assert (plain, keyed) == (502, 200)
    assert meridian.state.count() == 3
    assert meridian.state.received[-1].headers["Idempotency-Key"] == "abc-1"


async def test_read_timeout_is_retried_only_with_an_idempotency_key(
    meivan: Upstream, clock: FakeClock
) -> None:
    meivan.state.script(Fault(delay_s=5), Fault(delay_s=5))
    timeout = aiohttp.ClientTimeout(sock_read=0.05)
    url = meivan.url + "/v1/complete"
    async with session(clock) as client:
        with outbound_scope() as plain, pytest.raises(aiohttp.SocketTimeoutError):
            await client.post(
                url, json=COMPLETE, headers={"Authorization": "Bearer k"}, timeout=timeout
            )
        headers = {"Authorization": "Bearer k", "Idempotency-Key": "order-7"}
        with outbound_scope() as keyed:
            async with client.post(url, json=COMPLETE, headers=headers, timeout=timeout) as resp:
                assert resp.status == 200

    assert (plain.attempts, plain.last_failure) == (1, "read_timeout")
    assert keyed.attempts == 2


async def test_connection_failures_are_retried_then_raised(clock: FakeClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with session(clock) as client:
        with outbound_scope() as outbound, pytest.raises(aiohttp.ClientConnectorError):
            await client.get(f"http://127.0.0.1:{port}/v1/models")

    assert outbound.attempts == 4
    assert len(clock.sleeps) == 3
    assert (outbound.last_failure, outbound.gave_up) == ("connect_error", True)


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "one"), ("Idempotency-Key", "two")],
        [("Idempotency-Key", "x" * 256)],
        [("Idempotency-Key", "")],
    ],
)
async def test_invalid_idempotency_key_is_a_400_and_nothing_is_sent(
    meivan: Upstream, clock: FakeClock, headers: list[tuple[str, str]]
) -> None:
    async with session(clock) as client:
        with pytest.raises(InvalidIdempotencyKey) as caught:
            await client.post(meivan.url + "/v1/complete", json=COMPLETE, headers=headers)

    assert (caught.value.status, caught.value.code) == (400, "invalid_idempotency_key")
    assert meivan.state.count() == 0


async def test_a_255_character_key_passes_unchanged(meivan: Upstream, clock: FakeClock) -> None:
    key = "k" * 255
    async with (
        session(clock, generate=mutating_request) as client,
        client.post(
            meivan.url + "/v1/complete",
            json=COMPLETE,
            headers={"Authorization": "Bearer k", "Idempotency-Key": key},
        ) as response,
    ):
        assert response.status == 200

    assert meivan.state.received[0].headers.getall("Idempotency-Key") == [key]


async def test_works_without_a_caller_outbound(meridian: Upstream, clock: FakeClock) -> None:
    meridian.state.script(Fault(status=503))
    async with (
        session(clock) as client,
        client.get(meridian.url + "/v1/models", headers={"Authorization": "Bearer k"}) as response,
    ):
        assert response.status == 200

    assert meridian.state.count() == 2


def test_settings_are_validated() -> None:
    class Bad:
        max_attempts = 3
        base_delay_s = 0.1
        max_delay_s = 1.0
        deadline_s = 10.0
        retry_on = ("429", "418")
        retry_on_idempotent = ()
        budget_ratio = 0.2
        budget_min = 3

    with pytest.raises(ValueError, match="418"):
        retry_middleware(Bad())
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(1.5, 3)


def test_config_defaults_and_int_conditions() -> None:
    config = RetryConfig.model_validate({"retry_on": [429, "connect_error"]})

    assert config.retry_on == ["429", "connect_error"]
    assert RetryConfig().retry_on == ["connect_error", "429", "503"]
    assert RetryConfig().retry_on_idempotent == ["502", "504", "read_timeout", "disconnected"]
    with pytest.raises(ValueError, match="retry_on"):
        RetryConfig.model_validate({"retry_on": [404]})
    with pytest.raises(ValueError, match="max_delay_s"):
        RetryConfig(base_delay_s=2, max_delay_s=1)


class _Seen:
    """A retry observer that keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def retried(self, failure: str) -> None:
        self.events.append(("retried", failure))

    def stopped(self, failure: str, reason: str) -> None:
        self.events.append(("stopped", failure, reason))


class _CountingBudget(RetryBudget):
    """A retry budget that counts the requests entering it."""

    entered = 0

    def enter(self) -> Any:
        self.entered += 1
        return super().enter()


@pytest.mark.parametrize(
    ("fault", "stopped", "last_failure"),
    [
        (Fault(status=503), [("stopped", "503", "max_attempts")], "503"),
        (Fault(status=502), [], None),  # retried only with an Idempotency-Key: not a stop
        (Fault(status=400), [], None),
        (None, [], None),
    ],
    ids=["503", "502-unkeyed", "400", "200"],
)
async def test_one_attempt_reports_as_the_last_attempt_of_many_does(
    meridian: Upstream,
    clock: FakeClock,
    fault: Fault | None,
    stopped: list[tuple[str, ...]],
    last_failure: str | None,
) -> None:
    # max_attempts: 1 does not enter the retry budget; what it records must be what the last of
    # several attempts records.
    results = []
    for attempts in (1, 2):
        seen, budget = _Seen(), _CountingBudget(0.2, 3)
        if fault is not None:
            meridian.state.script(fault, fault)
        async with session(clock, max_attempts=attempts, observer=seen, budget=budget) as client:
            status, _, _, outbound = await chat(client, meridian)
        results.append((status, outbound.last_failure, outbound.gave_up, outbound.stop_reason))
        assert [event for event in seen.events if event[0] == "stopped"] == stopped
        assert outbound.attempts == (attempts if stopped else 1)
        assert (budget.in_flight, budget.retrying) == (0, 0)
        assert budget.entered == (0 if attempts == 1 else 1)  # one attempt takes no budget share

    one, two = results
    assert one[:2] == two[:2] == (fault.status if fault else 200, last_failure)
    assert one[3] == two[3] == ("max_attempts" if stopped else None)
    assert (one[2], two[2]) == (False, bool(stopped))  # gave up: only after a retry


async def test_one_attempt_stops_on_a_connection_failure_and_raises(clock: FakeClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    seen = _Seen()
    async with session(clock, max_attempts=1, observer=seen) as client:
        with outbound_scope() as outbound, pytest.raises(aiohttp.ClientConnectorError):
            await client.get(f"http://127.0.0.1:{port}/v1/models")

    assert (outbound.attempts, outbound.last_failure) == (1, "connect_error")
    assert outbound.gave_up is False
    assert seen.events == [("stopped", "connect_error", "max_attempts")]
    assert clock.sleeps == []
