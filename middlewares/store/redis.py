"""The ``redis`` backend: several replicas or machines sharing one Redis (or Redis Cluster).

``RedisStores(client)`` takes a ``redis.asyncio`` client the caller made (and closes it only when
``owns_client``). Every read-modify-write is one Lua script (:mod:`.redis_lua`, EVALSHA with a
fallback to loading the script); every key of a team carries the hash tag ``{team}``::

    sg:{search}:spent:t:m2025-01          sg:{search}:held:k=search-prod:m2025-01
    sg:{search}:ledger                    sg:{search}:rate:t:requests:60:28616667

Durability is Redis's own (AOF ``appendfsync always`` for "nothing acknowledged is lost").
Every ``RedisError`` becomes :class:`~.types.StoreUnavailable`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

try:
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "The redis store needs the 'redis' extra: pip install 'sidegate[redis]'"
    ) from exc

from . import redis_lua
from .ledger import aggregate_entries, decode_entry, encode_entry
from .types import (
    COMMIT_RETENTION_S,
    Admission,
    BudgetHold,
    BudgetStatus,
    Granularity,
    LedgerEntry,
    RateDecision,
    Reservation,
    Scope,
    Settlement,
    StoreUnavailable,
    UsageReport,
    WindowHit,
    nonnegative,
    to_micros,
    window_index,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    Client = Redis | RedisCluster

__all__ = ["RedisBudgets", "RedisKeys", "RedisLedger", "RedisMeter", "RedisRates", "RedisStores"]

Clock = Callable[[], float]
T = TypeVar("T")


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A").replace("{", "%7B").replace("}", "%7D")


class RedisKeys:
    """Key names; all keys of one team share the hash tag ``{team}``."""

    def __init__(self, prefix: str = "sg") -> None:
        self.prefix = prefix

    def _key(self, team: str, *parts: str) -> str:
        return ":".join((self.prefix, "{" + _escape(team) + "}", *map(_escape, parts)))

    def budget(self, scope: Scope, period: str, what: str) -> str:
        return self._key(scope.team, what, self.who(scope), period)

    def budget_keys(self, scope: Scope, period: str) -> list[str]:
        """The spend, reservation amounts and reservation expiries of one budget."""
        return [self.budget(scope, period, what) for what in ("spent", "held", "held-exp")]

    def done(self, scope: Scope, reservation_id: str) -> str:
        return self._key(scope.team, "done", self.who(scope), reservation_id)

    def ledger(self, team: str) -> str:
        return self._key(team, "ledger")

    def rate(self, scope: Scope, name: str, window_s: int, index: int) -> str:
        return self._key(scope.team, "rate", self.who(scope), name, str(window_s), str(index))

    @staticmethod
    def who(scope: Scope) -> str:
        return "t" if scope.key_id is None else "k=" + scope.key_id


async def _call(action: Awaitable[T]) -> T:
    try:
        return await action
    except RedisError as exc:
        raise StoreUnavailable() from exc


class _Scripts:
    def __init__(self, client: Client) -> None:
        self._scripts = {
            name: client.register_script(getattr(redis_lua, name)) for name in redis_lua.__all__
        }

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await _call(self._scripts[name](keys=keys, args=args))


class RedisBudgets:
    """:class:`~.protocols.BudgetStore` as a hash and a sorted set of reservations per budget."""

    def __init__(self, scripts: _Scripts, keys: RedisKeys, clock: Clock, retention_s: float):
        self._scripts, self._keys, self._clock = scripts, keys, clock
        self._retention_s = max(1, int(retention_s))

    def _budget_keys(self, scope: Scope, period: str) -> list[str]:
        return self._keys.budget_keys(scope, period)

    async def reserve(
        self,
        scope: Scope,
        period: str,
        limit_nano: int,
        amount_nano: int,
        reservation_id: str,
        ttl_s: float,
    ) -> Reservation:
        nonnegative(limit_nano=limit_nano, amount_nano=amount_nano, ttl_s=ttl_s)
        now = self._clock()
        args = (limit_nano, max(1, amount_nano), reservation_id, repr(now), repr(now + ttl_s))
        admitted, spent, reserved = await self._scripts.run(
            "RESERVE", self._budget_keys(scope, period), (*args, max(1, int(ttl_s * 1000)))
        )
        return Reservation(bool(admitted), int(spent), int(reserved), limit_nano)

    async def commit(
        self,
        scope: Scope,
        period: str,
        reservation_id: str,
        actual_nano: int,
        entry: LedgerEntry | None = None,
    ) -> bool:
        nonnegative(actual_nano=actual_nano)
        keys = self._budget_keys(scope, period)
        keys += [self._keys.done(scope, reservation_id), self._keys.ledger(scope.team)]
        score, member = "", b""
        if entry is not None:
            score = str(to_micros(entry.timestamp))
            member = encode_entry(entry, f"{self._keys.who(scope)}:{reservation_id}")
        args = (reservation_id, actual_nano, self._retention_s, score, member)
        return bool(await self._scripts.run("COMMIT", keys, args))

    async def release(self, scope: Scope, period: str, reservation_id: str) -> bool:
        keys = self._budget_keys(scope, period)[1:]
        return bool(await self._scripts.run("RELEASE", keys, (reservation_id, repr(self._clock()))))

    async def status(self, scope: Scope, period: str) -> BudgetStatus:
        keys = self._budget_keys(scope, period)
        spent, reserved = await self._scripts.run("STATUS", keys, (repr(self._clock()),))
        return BudgetStatus(int(spent), int(reserved))


class RedisLedger:
    """:class:`~.protocols.Ledger` as one sorted set per team, scored by microseconds."""

    def __init__(self, client: Client, keys: RedisKeys) -> None:
        self._client, self._keys = client, keys

    async def record(self, entry: LedgerEntry) -> None:
        member = encode_entry(entry, uuid.uuid4().hex)
        key = self._keys.ledger(entry.team)
        await _call(self._client.zadd(key, {member: to_micros(entry.timestamp)}))

    async def query(self, team: str, since: datetime, until: datetime) -> list[LedgerEntry]:
        key = self._keys.ledger(team)
        raw = await _call(self._client.zrangebyscore(key, to_micros(since), to_micros(until)))
        return [decode_entry(item) for item in raw if isinstance(item, bytes | str)]

    async def aggregate(
        self, team: str, since: datetime, until: datetime, granularity: Granularity
    ) -> UsageReport:
        return aggregate_entries(await self.query(team, since, until), granularity)


class RedisRates:
    """:class:`~.protocols.RateWindows` as one expiring counter per key and window."""

    def __init__(self, scripts: _Scripts, keys: RedisKeys, clock: Clock) -> None:
        self._scripts, self._keys, self._clock = scripts, keys, clock

    async def hit(
        self,
        scope: Scope,
        name: str,
        limit: int,
        amount: int = 1,
        *,
        window_s: int = 60,
        now: float | None = None,
    ) -> RateDecision:
        nonnegative(limit=limit, amount=amount)
        index = window_index(self._clock() if now is None else now, window_s)
        key = self._keys.rate(scope, name, window_s, index)
        allowed, count = await self._scripts.run("HIT", [key], (limit, amount, 2000 * window_s))
        start = float(index * window_s)
        return RateDecision(bool(allowed), int(count), limit, start, start + window_s)

    async def adjust(
        self, scope: Scope, name: str, delta: int, *, window_start: float, window_s: int = 60
    ) -> None:
        key = self._keys.rate(scope, name, window_s, window_index(window_start, window_s))
        await self._scripts.run("ADJUST", [key], (delta,))


def _one_team(scopes: Iterable[Scope], entries: Iterable[LedgerEntry] = ()) -> str | None:
    """The one team of ``scopes`` (and ``entries``); ValueError for several (no single slot)."""
    teams = {scope.team for scope in scopes} | {entry.team for entry in entries}
    if len(teams) > 1:
        raise ValueError(f"an admission or settlement concerns one team, got {sorted(teams)}")
    return next(iter(teams), None)


class RedisMeter:
    """:class:`~.protocols.Meter` as one script each over the keys of the other three stores."""

    def __init__(self, scripts: _Scripts, keys: RedisKeys, clock: Clock, retention_s: float):
        self._scripts, self._keys, self._clock = scripts, keys, clock
        self._retention_s = max(1, int(retention_s))

    async def admit(
        self,
        hits: tuple[WindowHit, ...],
        holds: tuple[BudgetHold, ...],
        reservation_id: str,
        ttl_s: float,
    ) -> Admission:
        nonnegative(ttl_s=ttl_s)
        if _one_team([*(hit.scope for hit in hits), *(hold.scope for hold in holds)]) is None:
            return Admission(True, (), ())
        now = self._clock()
        indexes = [window_index(now, hit.window_s) for hit in hits]
        keys = [
            self._keys.rate(hit.scope, hit.name, hit.window_s, index)
            for hit, index in zip(hits, indexes, strict=True)
        ]
        args: list[Any] = [len(hits), len(holds), reservation_id, repr(now), repr(now + ttl_s)]
        args.append(max(1, int(ttl_s * 1000)))
        for hit in hits:
            args += (hit.limit, hit.amount, 2000 * hit.window_s)
        for hold in holds:
            keys += self._keys.budget_keys(hold.scope, hold.period)
            args += (hold.limit_nano, max(1, hold.amount_nano))
        admitted, windows, reservations = await self._scripts.run("ADMIT", keys, args)
        decisions = []  # the script answers up to the first refusal, so zip stops there
        for (allowed, count), hit, index in zip(windows, hits, indexes, strict=False):
            start = float(index * hit.window_s)
            decisions.append(
                RateDecision(bool(allowed), int(count), hit.limit, start, start + hit.window_s)
            )
        held = (
            Reservation(bool(ok), int(spent), int(reserved), hold.limit_nano)
            for (ok, spent, reserved), hold in zip(reservations, holds, strict=False)
        )
        return Admission(bool(admitted), tuple(decisions), tuple(held))

    async def settle(self, settlement: Settlement) -> bool:
        rid, budgets, entries = settlement.reservation_id, settlement.budgets, settlement.entries
        adjustments = settlement.adjustments
        scopes = [*(scope for scope, _ in budgets), *(change.scope for change in adjustments)]
        team = _one_team(scopes, entries)
        if team is None:
            return True
        keys: list[str] = []
        for scope, period in budgets:
            keys += [*self._keys.budget_keys(scope, period), self._keys.done(scope, rid)]
        keys.append(self._keys.ledger(team))
        for change in adjustments:
            index = window_index(change.window_start, change.window_s)
            keys.append(self._keys.rate(change.scope, change.name, change.window_s, index))
        cost = "" if settlement.cost_nano is None else settlement.cost_nano
        args: list[Any] = [len(budgets), len(adjustments), rid, cost, self._retention_s]
        args += [change.delta for change in adjustments]
        # An entry's id is derived from the reservation when there is one, so a repeated
        # settlement re-adds the same member (a no-op) rather than a second entry.
        base = f"{self._keys.who(budgets[0][0])}:{rid}" if budgets else uuid.uuid4().hex
        for number, entry in enumerate(entries):
            entry_id = base if number == 0 else f"{base}:{number}"
            args += [str(to_micros(entry.timestamp)), encode_entry(entry, entry_id)]
        return bool(await self._scripts.run("SETTLE", keys, args))


class RedisStores:
    """The redis backend's stores on ``client`` (``redis.asyncio.Redis`` or
    ``RedisCluster``, with or without ``decode_responses``)."""

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = "sg",
        owns_client: bool = False,
        clock: Clock = time.time,
        commit_retention_s: float = COMMIT_RETENTION_S,
    ) -> None:
        self._client = client
        self._owns_client = owns_client
        keys = RedisKeys(prefix)
        scripts = _Scripts(client)
        self._budgets = RedisBudgets(scripts, keys, clock, commit_retention_s)
        self._ledger = RedisLedger(client, keys)
        self._rates = RedisRates(scripts, keys, clock)
        self._meter = RedisMeter(scripts, keys, clock, commit_retention_s)

    @property
    def budgets(self) -> RedisBudgets:
        return self._budgets

    @property
    def ledger(self) -> RedisLedger:
        return self._ledger

    @property
    def rates(self) -> RedisRates:
        return self._rates

    @property
    def meter(self) -> RedisMeter:
        return self._meter

    async def ping(self) -> None:
        await _call(self._client.ping())

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
