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
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .contract import CALL_KEY, Call, EndpointKind
from .errors import SidegateError
from .pricing import Estimate, Rates, SseUsage, Usage, cost, estimate, nano_to_usd
from .pricing import usage_from_response as usage_in
from .ratelimits import RateLimits
from .store import LedgerEntry, Scope, Stores, StoreUnavailable, period_key

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

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        call = request.get(CALL_KEY)
        principal = call.principal if call is not None else None
        if call is None or principal is None:
            return await handler(request)
        rules = [(Scope(principal.team), settings.teams.get(principal.team))]
        if principal.key_id is not None:
            key_rules = settings.keys.get((principal.team, principal.key_id))
            rules.append((Scope(principal.team, principal.key_id), key_rules))
        active = [(scope, rule) for scope, rule in rules if rule is not None]
        prices = _prices_for(call, settings.prices)
        if not active and prices is None:
            return await handler(request)
        metered = _Metered(call, prices, settings, stores, clock, pending)
        limits_seen = await metered.admit(active)
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
        await asyncio.shield(metered.settle(response))
        return response

    return limits


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
        self.estimate = self._estimate()
        call.cost_estimate_nano_usd = self.estimate.cost_nano
        self.reservation_id = uuid.uuid4().hex  # never the client's x-request-id
        self.reserved: list[tuple[Scope, str]] = []
        self.token_windows: list[tuple[Scope, int, float]] = []
        self.sse: SseUsage | None = None

    def _estimate(self) -> Estimate:
        if self.kind is EndpointKind.PASSTHROUGH or self.prices is None:
            return Estimate(0, 0, 0, self.settings.passthrough_reserve_nano)
        body: Mapping[str, Any] = self.call.json if self.kind is not EndpointKind.AUDIO else {}
        return estimate(
            self.kind.value,
            body,
            self.prices,
            default_max_output_tokens=self.settings.default_max_output_tokens,
        )

    async def admit(self, rules: list[tuple[Scope, Limits]]) -> RateLimits | None:
        """Pass every rate window and reserve every budget, or undo what was taken and refuse."""
        seen: RateLimits | None = None
        try:
            for scope, rule in rules:
                if rule.rate is not None:
                    limits = await self._rate(scope, rule.rate)
                    seen = limits if seen is None else seen
            for scope, rule in rules:
                if rule.budget is not None:
                    await self._reserve(scope, rule.budget)
        except BaseException:
            await asyncio.shield(self.release())
            raise
        self._watch_stream()
        return seen

    async def _rate(self, scope: Scope, rule: RateRule) -> RateLimits | None:
        now = self.clock()
        limits = RateLimits()
        checks = [
            ("requests", rule.requests_per_minute, 1),
            ("tokens", rule.tokens_per_minute, self.estimate.tokens),
        ]
        for name, limit, amount in checks:
            if limit is None:
                continue
            try:
                decision = await self.stores.rates.hit(scope, name, limit, min(amount, limit))
            except StoreUnavailable:
                if rule.fail_open:
                    log.warning("rate_limit_store_unavailable", team=scope.team, fail_open=True)
                    return None
                raise
            if name == "tokens":
                self.token_windows.append((scope, min(amount, limit), decision.window_start))
            if not decision.allowed:
                wait = max(1, math.ceil(decision.reset_at - now))
                raise RateLimited(
                    f"Team {scope.team!r} is over its {limit} {name} per minute; "
                    f"retry in {wait} s.",
                    headers={"Retry-After": str(wait)},
                )
            if name == "requests":
                seen = RateLimits(limit, decision.remaining, decision.reset_at)
            else:
                seen = RateLimits(
                    limit_tokens=limit,
                    remaining_tokens=decision.remaining,
                    reset_tokens=decision.reset_at,
                )
            limits = limits.merged(seen)
        return limits

    async def _reserve(self, scope: Scope, rule: BudgetRule) -> None:
        now = datetime.fromtimestamp(self.clock(), UTC)
        period, resets = period_key(rule.period, now)  # type: ignore[arg-type]
        try:
            result = await self.stores.budgets.reserve(
                scope,
                period,
                rule.limit_nano,
                self.estimate.cost_nano,
                self.reservation_id,
                self.settings.reservation_ttl_s,
            )
        except StoreUnavailable:
            if rule.fail_open:
                log.warning("budget_store_unavailable", team=scope.team, fail_open=True)
                return
            raise
        if not result.admitted:
            who = f"Key {scope.key_id!r}" if scope.key_id else f"Team {scope.team!r}"
            when = (
                f"; the {rule.period} budget resets at {resets:%Y-%m-%dT%H:%M:%SZ}"
                if resets
                else ""
            )
            raise QuotaExceeded(
                f"{who} has ${_usd(result.remaining)} of its "
                f"${_usd(rule.limit_nano)} {rule.period} budget left; this request may "
                f"cost up to ${_usd(self.estimate.cost_nano)}{when}.",
                headers={"x-should-retry": "false"},
            )
        self.reserved.append((scope, period))

    def _watch_stream(self) -> None:
        call = self.call
        if not (call.stream and self.kind is EndpointKind.CHAT):
            return
        self.sse = SseUsage()
        hide = _ask_for_usage(call)
        call.stream_filter = _UsageFilter(self.sse, hide)

    async def release(self) -> None:
        """Give back every reservation and the tokens counted in advance."""
        for scope, period in self.reserved:
            try:
                await self.stores.budgets.release(scope, period, self.reservation_id)
            except StoreUnavailable:
                log.warning("release_failed", team=scope.team)
        self.reserved = []
        await self._adjust_tokens(0)

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
        await self._adjust_tokens(usage.total_tokens if usage is not None else 0)
        entry = self._entry(usage, actual)
        if not self.reserved:
            try:
                await self.stores.ledger.record(entry)
            except StoreUnavailable:
                log.warning("ledger_record_failed", team=entry.team, request_id=entry.request_id)
        for index, (scope, period) in enumerate(self.reserved):
            await self._commit(scope, period, actual, entry if index == 0 else None)
        self.reserved = []

    def _streamed_text(self) -> bool:
        return self.sse is not None and self.sse.text_bytes > 0

    def _usage(self, response: web.StreamResponse | None) -> Usage | None:
        if self.sse is not None:
            return self.sse.partial_usage(self.estimate.prompt_tokens)
        body = response.body if isinstance(response, web.Response) else None
        if not isinstance(body, bytes):
            return None
        payload = self.call.answer_json(body)
        if self.kind is EndpointKind.PASSTHROUGH:
            return usage_in("passthrough", payload) if isinstance(payload, dict) else None
        request = self.call.json if self.kind is EndpointKind.IMAGES else None
        return usage_in(self.kind.value, payload, request)

    def _cost(self, usage: Usage | None) -> int:
        if self.kind is EndpointKind.PASSTHROUGH:
            if usage is None or usage.total_tokens == 0:
                return 0
            model = self.prices
            return cost(usage, model, "passthrough") if model else self.estimate.cost_nano
        if usage is None or self.prices is None:
            return self.estimate.cost_nano
        return cost(usage, self.prices, self.kind.value)

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
            kind=self.kind.value,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            images=usage.images if usage else 0,
            cost_nano=actual,
            request_id=call.request_id,
        )

    async def _adjust_tokens(self, actual_tokens: int) -> None:
        for scope, counted, window_start in self.token_windows:
            try:
                await self.stores.rates.adjust(
                    scope, "tokens", actual_tokens - counted, window_start=window_start
                )
            except StoreUnavailable:
                log.warning("token_window_adjust_failed", team=scope.team)
        self.token_windows = []

    async def _commit(
        self, scope: Scope, period: str, actual: int, entry: LedgerEntry | None
    ) -> None:
        """Commit now; if the store is unreachable, keep retrying in the background."""
        commit = self.stores.budgets.commit
        request_id = self.reservation_id
        try:
            await commit(scope, period, request_id, actual, entry)
            return
        except StoreUnavailable:
            log.warning("commit_retry", team=scope.team, request_id=request_id)

        async def retry() -> None:
            for delay in _COMMIT_RETRIES:
                await asyncio.sleep(delay)
                try:
                    await commit(scope, period, request_id, actual, entry)
                    return
                except StoreUnavailable:
                    log.warning("commit_retry", team=scope.team, request_id=request_id)
            log.error("commit_failed", team=scope.team, request_id=request_id, cost_nano=actual)

        task = asyncio.get_running_loop().create_task(retry())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


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
