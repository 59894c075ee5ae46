"""Retrying upstream requests: backoff with full jitter, server hints, deadline, retry budget.

The retry middleware sits outside key rotation (``ClientSession(middlewares=(retry, keys))``) and
calls the rest of the chain once per attempt with the same request, so every attempt sends the
same body bytes and the same ``Idempotency-Key``.

Which failures are retried (``settings.retry_on``, plus ``retry_on_idempotent`` for requests that
carry an ``Idempotency-Key``): ``connect_error`` (the connection could not be made or timed out
connecting), ``read_timeout`` (no response head within ``sock_read``), ``disconnected`` (the
connection dropped before a response head), and the statuses ``429``, ``500``, ``502``, ``503``,
``504``. Any other status is returned at once, and a response is never retried once returned: a
stream cut mid-way ends the caller's stream. The total timeout of the request spans all attempts
and is never retried.

Before retry ``n`` (1-based) it waits ``max(uniform(0, min(max_delay_s, base_delay_s·2^(n-1))),
hint)`` where the hint is what the upstream asked for (see :func:`~sidegate.middlewares.ratelimits.
retry_hint`) — except after a 429 when key rotation has another key ready: then it retries at
once. If that wait would end past the deadline, the failure is returned (or raised) at once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Protocol

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.client_middlewares import ClientMiddlewareType

from .errors import BadRequest
from .keypool import KeyPool, KeysCoolingDown
from .keys import learn, take_key
from .outbound import OUTBOUND, Outbound
from .ratelimits import response_retry_hint

__all__ = [
    "IDEMPOTENCY_KEY",
    "RETRY_CONDITIONS",
    "InvalidIdempotencyKey",
    "RetryBudget",
    "RetryObserver",
    "RetrySettings",
    "mutating_request",
    "retry_middleware",
]

IDEMPOTENCY_KEY = "Idempotency-Key"
RETRY_CONDITIONS = frozenset(
    {"connect_error", "read_timeout", "disconnected", "429", "500", "502", "503", "504"}
)
_STATUS_FAILURES = {int(c): c for c in RETRY_CONDITIONS if c.isdigit()}
_MAX_KEY_LENGTH = 255
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RetrySettings(Protocol):
    """What the retry middleware reads; ``sidegate.config.resilience.RetryConfig`` is one."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def base_delay_s(self) -> float: ...
    @property
    def max_delay_s(self) -> float: ...
    @property
    def deadline_s(self) -> float: ...
    @property
    def retry_on(self) -> Collection[str]: ...
    @property
    def retry_on_idempotent(self) -> Collection[str]: ...
    @property
    def budget_ratio(self) -> float: ...
    @property
    def budget_min(self) -> int: ...


class RetryObserver(Protocol):
    """Told of every retry and of every retryable failure sidegate stopped retrying (metrics)."""

    def retried(self, failure: str) -> None: ...
    def stopped(self, failure: str, reason: str) -> None: ...


class InvalidIdempotencyKey(BadRequest):
    code = "invalid_idempotency_key"


class RetryBudget:
    """How many requests may be retrying at once: ``max(minimum, int(ratio · in_flight))``.

    ``in_flight`` counts requests inside the middleware, ``retrying`` those holding a retry slot
    (from their first retry to their end), ``rejected`` the retries refused so far.
    """

    def __init__(self, ratio: float, minimum: int) -> None:
        if not 0.0 <= ratio <= 1.0 or minimum < 0:
            raise ValueError("the retry budget needs 0 <= ratio <= 1 and minimum >= 0")
        self.ratio = ratio
        self.minimum = minimum
        self.in_flight = 0
        self.retrying = 0
        self.rejected = 0

    def limit(self) -> int:
        return max(self.minimum, int(self.ratio * self.in_flight))

    @contextmanager
    def track(self) -> Iterator[_Ticket]:
        """Count one request in flight for the block; its ticket may take a retry slot."""
        ticket = self.enter()
        try:
            yield ticket
        finally:
            self.leave(ticket)

    def enter(self) -> _Ticket:
        """Count one request in flight until :meth:`leave` (what :meth:`track` does)."""
        self.in_flight += 1
        return _Ticket(self)

    def leave(self, ticket: _Ticket) -> None:
        self.in_flight -= 1
        if ticket.held:
            self.retrying -= 1


class _Ticket:
    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self.held = False

    def acquire(self) -> bool:
        budget = self.budget
        if not self.held:
            if budget.retrying >= budget.limit():
                budget.rejected += 1
                return False
            budget.retrying += 1
            self.held = True
        return True


def _result(response: ClientResponse | None, error: BaseException | None) -> ClientResponse:
    """What the last attempt ended with: its response, or its error raised again."""
    if error is not None:
        raise error
    assert response is not None
    return response


def mutating_request(request: ClientRequest) -> bool:
    """Whether ``request`` changes state upstream (POST, PUT, PATCH, DELETE)."""
    return request.method.upper() in _MUTATING


def _validate(settings: RetrySettings) -> None:
    if settings.max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if settings.base_delay_s < 0 or settings.max_delay_s < settings.base_delay_s:
        raise ValueError("need 0 <= base_delay_s <= max_delay_s")
    if settings.deadline_s <= 0:
        raise ValueError("deadline_s must be positive")
    unknown = (set(settings.retry_on) | set(settings.retry_on_idempotent)) - RETRY_CONDITIONS
    if unknown:
        raise ValueError(f"unknown retry conditions: {sorted(unknown)}")


def _idempotency_key(request: ClientRequest) -> str | None:
    values = request.headers.getall(IDEMPOTENCY_KEY, [])
    if len(values) > 1:
        raise InvalidIdempotencyKey("Send at most one Idempotency-Key header.")
    if values and not 0 < len(values[0]) <= _MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"The Idempotency-Key header must be 1 to {_MAX_KEY_LENGTH} characters long."
        )
    return values[0] if values else None


def _failure(exc: BaseException) -> str | None:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_error"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "read_timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return None
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientConnectionResetError
        | aiohttp.ClientOSError,
    ):
        return "disconnected"
    return None


def retry_middleware(
    settings: RetrySettings,
    *,
    generate_idempotency_key: Callable[[ClientRequest], bool] | None = None,
    budget: RetryBudget | None = None,
    observer: RetryObserver | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
    keys: Callable[[ClientRequest], KeyPool | None] | None = None,
) -> ClientMiddlewareType:
    """A client middleware that retries as the module docstring says.

    ``generate_idempotency_key(request)`` (or ``Outbound.generate_idempotency_key`` when set)
    decides whether a request without an ``Idempotency-Key`` gets a generated one (a UUID4)
    before its first attempt; a client's key passes unchanged. Two ``Idempotency-Key`` headers,
    or one longer than 255 characters, raise :class:`InvalidIdempotencyKey` (400) unsent.

    ``budget`` (one per middleware unless shared) limits concurrent retrying requests; a request
    over it stops with its last failure. With ``max_attempts`` 1 a request cannot retry: it does
    not enter the budget (nor count towards its in-flight share). Progress and outcome are
    recorded on the current :class:`~sidegate.middlewares.outbound.Outbound`. ``clock`` measures
    the deadline, ``wall_clock`` reads HTTP-dates and unix resets, ``sleep`` waits, ``rng`` draws
    the jitter.

    ``keys`` makes it rotate upstream keys as well: each attempt goes with a key of
    ``keys(request)``'s pool, exactly as :func:`~sidegate.middlewares.keys.key_rotation_middleware`
    with the same ``resolve`` just inside it would send it (:func:`~.keys.take_key` before the
    attempt, :func:`~.keys.learn` after its answer), in this middleware's coroutine. The gateway
    runs the two so: a coroutine fewer on the stack of every upstream exchange.
    """
    _validate(settings)
    shared = RetryBudget(settings.budget_ratio, settings.budget_min) if budget is None else budget
    always = frozenset(settings.retry_on)
    idempotent = always | frozenset(settings.retry_on_idempotent)

    def backoff(attempt: int, hint: float | None) -> float:
        ceiling = min(settings.max_delay_s, settings.base_delay_s * 2.0 ** (attempt - 1))
        return max(rng() * ceiling, hint or 0.0)

    def stop_reason(wait: float, outbound: Outbound, ticket: _Ticket) -> str | None:
        assert outbound.deadline is not None
        if clock() + wait > outbound.deadline:
            return "deadline"
        return None if ticket.acquire() else "budget"

    def stop(outbound: Outbound, failure: str, reason: str) -> None:
        outbound.stop_reason = reason
        outbound.over_budget = reason == "budget"
        outbound.gave_up = outbound.over_budget or outbound.attempts > 1
        if observer is not None:
            observer.stopped(failure, reason)

    def begin(request: ClientRequest, outbound: Outbound) -> frozenset[str]:
        """Before the first attempt: the Idempotency-Key and the deadline; what is retried."""
        key = _idempotency_key(request)
        wanted = outbound.generate_idempotency_key
        if wanted is None:
            wanted = generate_idempotency_key is not None and generate_idempotency_key(request)
        if key is None and wanted:
            reuse = outbound.idempotency_key if outbound.idempotency_key_generated else None
            key = request.headers[IDEMPOTENCY_KEY] = reuse or str(uuid.uuid4())
            outbound.idempotency_key_generated = True
        outbound.idempotency_key = key
        if outbound.deadline is None:
            outbound.deadline = clock() + settings.deadline_s
        return idempotent if key is not None else always

    async def retry(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        outbound = OUTBOUND.get()
        token = None
        if outbound is None:  # no caller's Outbound: one of our own for this request
            outbound = Outbound()
            token = OUTBOUND.set(outbound)
        ticket = None
        try:
            conditions = begin(request, outbound)
            final = settings.max_attempts
            if final > 1:  # only a request that may retry counts in the budget
                ticket = shared.enter()
            pool = keys(request) if keys is not None else None
            for attempt in range(1, final + 1):
                response: ClientResponse | None = None
                error: BaseException | None = None
                hint: float | None = None
                try:
                    if pool is None:
                        response = await handler(request)
                    else:  # key rotation's part (the middleware it would be is inside)
                        key = take_key(pool, request, outbound)
                        response = await handler(request)
                        learning = learn(pool, key, response, outbound)
                        if learning is not None:
                            await learning
                except KeysCoolingDown as exc:
                    error, failure, hint = exc, "429", exc.retry_after
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outbound.attempts += 1
                    found = _failure(exc)
                    outbound.last_failure = found
                    if found is None or found not in conditions:
                        raise
                    error, failure = exc, found
                else:
                    outbound.attempts += 1
                    found = _STATUS_FAILURES.get(response.status)
                    if found is None or found not in conditions:
                        return response
                    failure = found
                outbound.last_failure = failure
                if attempt >= final:  # no wait to work out: the upstream's hint is not read
                    stop(outbound, failure, "max_attempts")
                    return _result(response, error)
                ready = False
                if response is not None:
                    hint = await response_retry_hint(response, wall_clock())
                    ready = response.status == 429 and outbound.other_key_ready
                wait = 0.0 if ready else backoff(attempt, hint)
                assert ticket is not None  # a retry is possible: the request entered the budget
                reason = stop_reason(wait, outbound, ticket)
                if reason is not None:
                    stop(outbound, failure, reason)
                    return _result(response, error)
                if response is not None:
                    response.release()
                if observer is not None:
                    observer.retried(failure)
                outbound.waits.append(wait)
                await sleep(wait)
            raise AssertionError("unreachable: the last attempt always stops")
        finally:
            if ticket is not None:
                shared.leave(ticket)
            if token is not None:
                OUTBOUND.reset(token)

    return retry
