"""Per-team (and per-key) rate limits and budgets that cannot be overspent.

Before a request goes upstream it must pass the requests- and tokens-per-minute windows and
**reserve** an upper bound of its cost (see :func:`sidegate.middlewares.pricing.estimate`) in the
store, atomically against the period's limit: concurrent requests cannot together reserve more
than the budget, on one process or many sharing a store. After the response the reservation
becomes the actual cost (one ledger entry); an upstream error releases it; a stream the client
left is charged for what was streamed. So the spend of a period never exceeds its limit: each
admitted request reserved at least its cost, with one documented exception — a request whose
``max_tokens`` is absent and whose model has no ``max_output_tokens`` is bounded by
``default_max_output_tokens``, which the model may exceed.

When the store cannot be reached, a budgeted (or rate-limited) request is refused with 503 unless
its rule says ``fail_open``. A commit that fails is retried in the background, not dropped.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import types
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .contract import CALL_KEY, Call, EndpointKind
from .errors import SidegateError
from .ids import random_hex
from .pricing import (
    Estimate,
    Rates,
    SseUsage,
    Usage,
    cost,
    estimate,
    nano_to_usd,
    token_usage_at_end,
)
from .pricing import usage_from_response as usage_in
from .ratelimits import RateLimits
from .store import (
    Admission,
    BudgetHold,
    LedgerEntry,
    RateDecision,
    Scope,
    Settlement,
    Stores,
    StoreUnavailable,
    WindowAdjustment,
    WindowHit,
    period_key,
)

__all__ = [
    "TEAM_LIMITS_KEY",
    "BudgetRule",
    "Limits",
    "LimitsSettings",
    "RateRule",
    "limits_middleware",
]

log = structlog.get_logger(__name__)

TEAM_LIMITS_KEY = web.RequestKey("sidegate_team_limits", RateLimits)
_COMMIT_RETRIES = (0.1, 0.5, 2.0, 5.0, 15.0, 30.0, 60.0)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class BudgetRule:
    limit_nano: int
    period: str
    fail_open: bool = False


@dataclass(frozen=True, slots=True)
class RateRule:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    fail_open: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    budget: BudgetRule | None = None
    rate: RateRule | None = None


@dataclass(frozen=True)
class LimitsSettings:
    """Everything the policy needs, built once per config.

    ``prices`` is keyed by public model name (aliases included) and upstream model id.
    """

    teams: Mapping[str, Limits]
    keys: Mapping[tuple[str, str], Limits] = field(default_factory=dict)
    prices: Mapping[str, Rates] = field(default_factory=dict)
    passthrough_reserve_nano: int = 1_000_000_000
    default_max_output_tokens: int | None = 4096
    reservation_ttl_s: int = 900

    @property
    def enforces_anything(self) -> bool:
        """Whether the policy can do anything: a team or key has a budget or a rate limit, or a
        model has a price (then every request goes to the ledger). Without, the chain leaves the
        policy out."""
        return bool(self.teams or self.keys or self.prices)


class QuotaExceeded(SidegateError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class RateLimited(SidegateError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


def limits_middleware(
    settings: LimitsSettings,
    stores: Stores,
    *,
    pending: set[asyncio.Task[None]] | None = None,
    clock: Callable[[], float] = time.time,
) -> Middleware:
    """Enforce ``settings`` on every routed request (one with a Call and a Principal).

    Commits that must be retried run as tasks in ``pending``; await them before closing the
    store (the gateway does so at shutdown).
    """
    pending = set() if pending is None else pending
    plans: dict[tuple[str, str | None], _Plan] = {}

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        call = request.get(CALL_KEY)
        principal = call.principal if call is not None else None
        if call is None or principal is None:
            return await handler(request)
        who = (principal.team, principal.key_id)
        plan = plans.get(who)
        if plan is None:
            if len(plans) >= _PLANS_MAX:
                plans.clear()
            plan = plans[who] = _Plan.of(principal.team, principal.key_id, settings)
        prices = _prices_for(call, settings.prices)
        if not plan.rules and prices is None:
            return await handler(request)
        metered = _Metered(call, prices, settings, stores, clock, pending)
        limits_seen = await metered.admit(plan)
        if limits_seen is not None:
            request[TEAM_LIMITS_KEY] = limits_seen
        try:
            response = await handler(request)
        except BaseException:
            if call.ended == "client_disconnected":  # cancelled mid-stream: charge what was sent
                await asyncio.shield(metered.settle(None))
            else:
                await asyncio.shield(metered.release())
            raise
        settling = _started(metered.settle(response))
        if not isinstance(settling, _Done):  # else nothing to wait for: no shield, no trip
            await asyncio.shield(settling)
        return response

    return limits


_KIND_NAMES = {kind: kind.value for kind in EndpointKind}
_PLANS_MAX = 10_000
"""Principals whose :class:`_Plan` is kept (the plans are rebuilt when there are more)."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What every request of one principal (team, key) is checked against, made once:
    ``rules`` in order (the team's, then the key's), the rate windows they hit (each rule's
    requests, then tokens, with the amount a request counts when fixed), the budgets they hold,
    and whether a store outage lets the request through (every rule fails open)."""

    rules: tuple[tuple[Scope, Limits], ...]
    windows: tuple[tuple[Scope, str, int, int | None], ...]
    budgets: tuple[tuple[Scope, BudgetRule], ...]
    fail_open: bool

    @classmethod
    def of(cls, team: str, key_id: str | None, settings: LimitsSettings) -> _Plan:
        found = [(Scope(team), settings.teams.get(team))]
        if key_id is not None:
            found.append((Scope(team, key_id), settings.keys.get((team, key_id))))
        rules = tuple((scope, rule) for scope, rule in found if rule is not None)
        windows: list[tuple[Scope, str, int, int | None]] = []
        budgets: list[tuple[Scope, BudgetRule]] = []
        fail_open = True
        for scope, rule in rules:
            if rule.rate is not None:
                fail_open = fail_open and rule.rate.fail_open
                if (limit := rule.rate.requests_per_minute) is not None:
                    windows.append((scope, "requests", limit, min(1, limit)))
                if (limit := rule.rate.tokens_per_minute) is not None:
                    windows.append((scope, "tokens", limit, None))  # the estimate's tokens
        for scope, rule in rules:
            if rule.budget is not None:
                fail_open = fail_open and rule.budget.fail_open
                budgets.append((scope, rule.budget))
        return cls(rules, tuple(windows), tuple(budgets), fail_open)


class _Metered:
    """One request's reservations and rate-window hits, from admission to settlement."""

    def __init__(
        self,
        call: Call,
        prices: Rates | None,
        settings: LimitsSettings,
        stores: Stores,
        clock: Callable[[], float],
        pending: set[asyncio.Task[None]],
    ) -> None:
        self.call = call
        self.prices = prices
        self.settings = settings
        self.stores = stores
        self.clock = clock
        self.pending = pending
        self.kind = call.route.kind
        self.kind_name = _KIND_NAMES[self.kind]  # .value is a Python-level descriptor on 3.11
        self.estimate = self._estimate()
        call.cost_estimate_nano_usd = self.estimate.cost_nano
        self.reservation_id = random_hex(16)  # never the client's x-request-id
        self.reserved: list[tuple[Scope, str]] = []
        self.token_windows: list[tuple[Scope, int, float]] = []
        self.sse: SseUsage | None = None

    def _estimate(self) -> Estimate:
        if self.kind is EndpointKind.PASSTHROUGH or self.prices is None:
            return Estimate(0, 0, 0, self.settings.passthrough_reserve_nano)
        body: Mapping[str, Any] = self.call.json if self.kind is not EndpointKind.AUDIO else {}
        return estimate(
            self.kind_name,
            body,
            self.prices,
            default_max_output_tokens=self.settings.default_max_output_tokens,
        )

    async def admit(self, plan: _Plan) -> RateLimits | None:
        """Pass every rate window and reserve every budget in one store operation, or refuse."""
        tokens, cost_nano = self.estimate.tokens, self.estimate.cost_nano
        hits = tuple(
            WindowHit(scope, name, limit, min(tokens, limit) if amount is None else amount)
            for scope, name, limit, amount in plan.windows
        )
        holds: tuple[BudgetHold, ...] = ()
        day = 0
        if plan.budgets:
            day = math.floor(self.clock() / 86_400)
            holds = tuple(
                BudgetHold(scope, _period(rule.period, day)[0], rule.limit_nano, cost_nano)
                for scope, rule in plan.budgets
            )
        admission: Admission | None = None
        if hits or holds:
            try:
                admission = await self._admit(hits, holds)
            except StoreUnavailable:
                if not plan.fail_open:
                    raise
                log.warning("limits_store_unavailable", team=plan.rules[0][0].team, fail_open=True)
            if admission is not None:
                self._refuse_unless(admission, hits, holds, plan, day)
                self.reserved = [(hold.scope, hold.period) for hold in holds]
                self.token_windows = [
                    (hit.scope, hit.amount, decision.window_start)
                    for hit, decision in zip(hits, admission.windows, strict=True)
                    if hit.name == "tokens"
                ]
        self._watch_stream()
        return _seen(hits, admission.windows) if hits and admission is not None else None

    async def _admit(self, hits: tuple[WindowHit, ...], holds: tuple[BudgetHold, ...]) -> Admission:
        """The store's admission; one the caller no longer waits for is undone when it lands."""
        meter = self.stores.meter
        ttl = self.settings.reservation_ttl_s
        admitting = _started(meter.admit(hits, holds, self.reservation_id, ttl))
        if isinstance(admitting, _Done):  # answered at once: nothing to wait for or undo
            return admitting.value
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            admitting.add_done_callback(functools.partial(self._undo, hits, holds))
            raise

    def _undo(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        admitting: asyncio.Future[Admission],
    ) -> None:
        if admitting.cancelled() or admitting.exception() or not admitting.result().admitted:
            return
        undo = Settlement(
            reservation_id=self.reservation_id,
            budgets=tuple((hold.scope, hold.period) for hold in holds),
            adjustments=tuple(
                WindowAdjustment(hit.scope, hit.name, -hit.amount, decision.window_start)
                for hit, decision in zip(hits, admitting.result().windows, strict=True)
            ),
        )
        self._in_background(self._settle_or_log(undo))

    def _refuse_unless(
        self,
        admission: Admission,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        plan: _Plan,
        day: int,
    ) -> None:
        """Raise the refusal the admission reports, if it refused."""
        if admission.admitted:
            return
        if len(admission.reservations) == 0:
            hit, decision = hits[len(admission.windows) - 1], admission.windows[-1]
            wait = max(1, math.ceil(decision.reset_at - self.clock()))
            raise RateLimited(
                f"Team {hit.scope.team!r} is over its {hit.limit} {hit.name} per minute; "
                f"retry in {wait} s.",
                headers={"Retry-After": str(wait)},
            )
        index = len(admission.reservations) - 1
        scope, result = holds[index].scope, admission.reservations[index]
        rule = plan.budgets[index][1]
        resets = _period(rule.period, day)[1]  # the period the hold was made in
        who = f"Key {scope.key_id!r}" if scope.key_id else f"Team {scope.team!r}"
        when = f"; the {rule.period} budget resets at {resets:%Y-%m-%dT%H:%M:%SZ}" if resets else ""
        raise QuotaExceeded(
            f"{who} has ${_usd(result.remaining)} of its "
            f"${_usd(rule.limit_nano)} {rule.period} budget left; this request may "
            f"cost up to ${_usd(self.estimate.cost_nano)}{when}.",
            headers={"x-should-retry": "false"},
        )

    def _watch_stream(self) -> None:
        call = self.call
        if not (call.stream and self.kind is EndpointKind.CHAT):
            return
        self.sse = SseUsage()
        hide = _ask_for_usage(call)
        call.stream_filter = _UsageFilter(self.sse, hide)

    async def release(self) -> None:
        """Give back every reservation and the tokens counted in advance."""
        if self.reserved or self.token_windows:
            await self._settle_or_log(
                Settlement(
                    reservation_id=self.reservation_id,
                    budgets=tuple(self.reserved),
                    adjustments=self._adjustments(0),
                )
            )
        self.reserved = []

    async def settle(self, response: web.StreamResponse | None) -> None:
        """Turn the reservations into the actual cost, or release them on an upstream error.

        Without reservations (a team with no budget) the entry goes to the ledger alone.
        """
        call = self.call
        status = call.upstream_status
        if status is None:
            status = response.status if response is not None else 500
        if status >= 400 or (call.ended == "upstream_broken" and not self._streamed_text()):
            await self.release()
            return
        usage = self._usage(response)
        actual = self._cost(usage)
        call.cost_nano_usd = actual
        if usage is not None:
            call.usage = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "images": usage.images,
            }
        settlement = Settlement(
            reservation_id=self.reservation_id,
            budgets=tuple(self.reserved),
            cost_nano=actual,
            entries=(self._entry(usage, actual),),
            adjustments=self._adjustments(usage.total_tokens if usage is not None else 0),
        )
        self.reserved = []
        if not settlement.budgets:
            await self._settle_or_log(settlement)
            return
        try:
            await self.stores.meter.settle(settlement)
        except StoreUnavailable:
            log.warning("commit_retry", team=_call_team(call), request_id=self.reservation_id)
            self._in_background(self._retry(settlement))

    def _streamed_text(self) -> bool:
        return self.sse is not None and self.sse.text_bytes > 0

    def _usage(self, response: web.StreamResponse | None) -> Usage | None:
        if self.sse is not None:
            return self.sse.partial_usage(self.estimate.prompt_tokens)
        body = response.body if isinstance(response, web.Response) else None
        if not isinstance(body, bytes):
            return None
        at_end = token_usage_at_end(self.kind, body)  # a long answer (embeddings): no parse
        if at_end is not None:
            return at_end
        payload = self.call.answer_json(body)
        if self.kind is EndpointKind.PASSTHROUGH:
            return usage_in("passthrough", payload) if isinstance(payload, dict) else None
        request = self.call.json if self.kind is EndpointKind.IMAGES else None
        return usage_in(self.kind_name, payload, request)

    def _cost(self, usage: Usage | None) -> int:
        if self.kind is EndpointKind.PASSTHROUGH:
            if usage is None or usage.total_tokens == 0:
                return 0
            model = self.prices
            return cost(usage, model, "passthrough") if model else self.estimate.cost_nano
        if usage is None or self.prices is None:
            return self.estimate.cost_nano
        return cost(usage, self.prices, self.kind_name)

    def _entry(self, usage: Usage | None, actual: int) -> LedgerEntry:
        call = self.call
        principal = call.principal
        assert principal is not None
        return LedgerEntry(
            timestamp=datetime.fromtimestamp(self.clock(), UTC),
            team=principal.team,
            key_id=principal.key_id,
            upstream=call.route.upstream,
            model=call.route.public_model or call.route.upstream_path,
            kind=self.kind_name,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            images=usage.images if usage else 0,
            cost_nano=actual,
            request_id=call.request_id,
        )

    def _adjustments(self, actual_tokens: int) -> tuple[WindowAdjustment, ...]:
        """Correct the tokens counted in advance to ``actual_tokens``; once only."""
        windows, self.token_windows = self.token_windows, []
        return tuple(
            WindowAdjustment(scope, "tokens", actual_tokens - counted, window_start)
            for scope, counted, window_start in windows
        )

    async def _settle_or_log(self, settlement: Settlement) -> None:
        """Settle without retrying (a release, or a ledger entry without a budget)."""
        try:
            await self.stores.meter.settle(settlement)
        except StoreUnavailable:
            log.warning("settle_failed", team=_call_team(self.call), request_id=self.reservation_id)

    async def _retry(self, settlement: Settlement) -> None:
        """Retry a commit the store refused, with backoff; it is idempotent."""
        team = _call_team(self.call)
        for delay in _COMMIT_RETRIES:
            await asyncio.sleep(delay)
            try:
                await self.stores.meter.settle(settlement)
                return
            except StoreUnavailable:
                log.warning("commit_retry", team=team, request_id=self.reservation_id)
        log.error(
            "commit_failed",
            team=team,
            request_id=self.reservation_id,
            cost_nano=settlement.cost_nano,
        )

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


class _Done(Generic[_T]):
    """What :func:`_started` gives for work that finished without waiting: its result."""

    __slots__ = ("value",)

    def __init__(self, value: _T) -> None:
        self.value = value


def _started(work: Coroutine[Any, Any, _T]) -> _Done[_T] | asyncio.Task[_T]:
    """``work`` run at once up to its first wait, like :func:`asyncio.ensure_future` but eager:
    when it finishes without waiting (the memory store, or a leased meter answering from its
    lease) its result comes back as a :class:`_Done`, and neither a task, a future nor a trip
    round the event loop is spent on it. Otherwise a task carries it on from where it stopped.
    Until then it runs synchronously in the caller, so no cancellation can reach it there. An
    exception it raises before waiting is raised here."""
    try:
        waiting = work.send(None)
    except StopIteration as finished:
        return _Done(finished.value)
    return asyncio.get_running_loop().create_task(_carry_on(work, waiting))


async def _carry_on(work: Coroutine[Any, Any, _T], waiting: Any) -> _T:
    return await _resumed(work, waiting)


@types.coroutine
def _resumed(work: Coroutine[Any, Any, _T], waiting: Any) -> Generator[Any, None, _T]:
    """Go on with ``work``, suspended on ``waiting``, as the task running it would have: wait for
    the same thing, then resume it with what the task sends (or throws) in."""
    while True:
        try:
            yield waiting
        except BaseException as exc:  # cancelled (or closed) while waiting: ``work`` decides
            resume = functools.partial(work.throw, exc)
        else:
            resume = functools.partial(work.send, None)
        try:
            waiting = resume()
        except StopIteration as finished:
            return finished.value  # type: ignore[no-any-return]


def _call_team(call: Call) -> str | None:
    return call.principal.team if call.principal is not None else None


def _seen(hits: tuple[WindowHit, ...], windows: tuple[RateDecision, ...]) -> RateLimits:
    """The first rate-limited scope's windows, as rate-limit headers show them."""
    first = hits[0].scope
    seen: dict[str, tuple[int, int, float]] = {}
    for hit, decision in zip(hits, windows, strict=True):
        if hit.scope != first:
            break
        seen[hit.name] = (hit.limit, decision.remaining, decision.reset_at)
    return RateLimits(*seen.get("requests", _UNSEEN), *seen.get("tokens", _UNSEEN))


_UNSEEN = (None, None, None)


@functools.lru_cache(maxsize=64)
def _period(period: str, day: int) -> tuple[str, datetime | None]:
    """:func:`period_key` of ``period`` on UTC day number ``day`` (days since the epoch): periods
    change only at midnight UTC, so one computation serves a whole day."""
    return period_key(period, datetime.fromtimestamp(day * 86_400, UTC))  # type: ignore[arg-type]


class _UsageFilter:
    """Reads a chat stream's usage as it passes; hides the usage chunk sidegate asked for."""

    def __init__(self, sse: SseUsage, hide: bool) -> None:
        self.sse = sse
        self.hide = hide

    def feed(self, chunk: bytes) -> bytes:
        if self.hide:
            return self.sse.strip(chunk)
        self.sse.feed(chunk)
        return chunk

    def close(self) -> bytes:
        return self.sse.flush() if self.hide else b""


def _prices_for(call: Call, prices: Mapping[str, Rates]) -> Rates | None:
    """The price of the call's model: its public name, its upstream id, or what a passthrough
    body names."""
    if not prices:
        return None
    route = call.route
    names: tuple[str | None, ...] = (route.public_model, route.upstream_model)
    if route.kind is EndpointKind.PASSTHROUGH:
        names = _named_model(call)
    return next((prices[n] for n in names if n is not None and n in prices), None)


def _named_model(call: Call) -> tuple[str | None, ...]:
    """The model or service a passthrough body names, if it is a JSON object that names one."""
    if not call.body.lstrip().startswith(b"{"):
        return ()
    try:
        payload = orjson.loads(call.body)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(payload, dict):
        return ()
    return tuple(v for v in (payload.get("model"), payload.get("service_id")) if isinstance(v, str))


def _ask_for_usage(call: Call) -> bool:
    """Make the upstream send its final usage chunk; True when the client did not ask for it."""
    payload = call.json
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if options is None:
        brace = call.body.index(b"{")
        rest = call.body[brace + 1 :].lstrip()
        separator = b"" if rest.startswith(b"}") else b","
        call.body = (
            call.body[: brace + 1]
            + b'"stream_options":{"include_usage":true}'
            + separator
            + call.body[brace + 1 :]
        )
    else:
        call.body = orjson.dumps({**payload, "stream_options": merged})
    payload["stream_options"] = merged
    return True


def _usd(nano: int) -> str:
    """``1500000`` → ``0.0015``; ``0`` → ``0``."""
    text = f"{nano_to_usd(nano):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
