"""Upstream key pools: which key each attempt uses, and what each key has been through.

A :class:`KeyPool` holds one upstream's keys. Each attempt takes a usable key by the pool's
strategy:

* ``round_robin`` — the keys in config order, skipping unusable ones;
* ``weighted`` — smooth weighted round-robin (nginx's): over any run of picks each usable key
  gets its share of ``weight``, interleaved rather than in bursts;
* ``least_limited`` — the key with the most headroom, the smallest remaining/limit fraction of
  its last ``x-ratelimit-*`` reading (a window past its reset counts as full, an unread key as
  full); ties go to the key picked least recently. Each pick counts one request off the key's
  remaining requests until the next reading.

A key is unusable while cooling down (after a 429: for the upstream's Retry-After /
``retry-after-ms`` / body ``retry-after`` / exhausted ``x-ratelimit-reset-*``, else
``default_cooldown_s``), once quarantined (401/403; logged by key id), or from its ``not_after``.
A key within ``expiry_warning_days`` of ``not_after`` is logged once.

:meth:`KeyPool.rebuild` (or :class:`~.keys.KeyPools` for every upstream) takes a new key list
on reload: a key with the same id and secret keeps its cooldown and readings; quarantines are
lifted (the config changed; a key still refused is quarantined again on its next 401/403).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import structlog

from .errors import SidegateError, UpstreamError
from .ratelimits import RateLimits, parse_ratelimit_values, ratelimit_values

__all__ = [
    "KeyPool",
    "KeySpec",
    "KeyState",
    "KeyStatus",
    "KeyStrategy",
    "KeysCoolingDown",
    "NoUsableKey",
    "PoolKey",
    "PoolSpec",
]

log = structlog.get_logger(__name__)

KeyStrategy = Literal["round_robin", "weighted", "least_limited"]
KeyState = Literal["active", "cooling", "quarantined", "expired"]
_STRATEGIES = frozenset({"round_robin", "weighted", "least_limited"})
_DAY_S = 86_400.0


class KeysCoolingDown(SidegateError):
    """Every usable key of the upstream is cooling down; nothing was sent.

    ``retry_after`` is the seconds until the earliest key is usable again; the response carries
    it, rounded up, as ``Retry-After``.
    """

    status = 429
    type = "rate_limit_exceeded"
    code = "upstream_rate_limited"

    def __init__(self, upstream: str, retry_after: float) -> None:
        self.retry_after = max(0.0, retry_after)
        seconds = max(1, math.ceil(self.retry_after))
        super().__init__(
            f"Every key of the upstream {upstream!r} is rate limited; retry after {seconds} s.",
            headers={"Retry-After": str(seconds)},
        )


class NoUsableKey(UpstreamError):
    """The upstream has no key that may be used (all quarantined or expired); nothing was sent."""

    status = 503
    code = "upstream_keys_unavailable"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One configured key. ``not_after`` without a timezone is UTC."""

    id: str
    secret: str = field(repr=False)
    weight: float = 1.0
    not_after: datetime | None = None

    def expires_at(self) -> float | None:
        if self.not_after is None:
            return None
        if self.not_after.tzinfo is None:
            return self.not_after.replace(tzinfo=UTC).timestamp()
        return self.not_after.timestamp()


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One upstream's keys and how they are used and sent (``header: scheme secret``).

    ``readings``: whether the pool keeps each key's ``x-ratelimit-*`` readings (and counts its
    picks off them). ``least_limited`` always does; :meth:`KeyPool.aggregate` (the ``team``
    header mode's fallback) and :attr:`KeyStatus.limits` need them too. Without, a key's limits
    stay empty and observing an answer looks only at its status (429 cooldown, 401/403
    quarantine), which is cheaper. With, an answer's values are kept as they came and parsed only
    when something reads the key's :attr:`PoolKey.limits`, so readings nobody reads cost little.
    """

    keys: Sequence[KeySpec]
    strategy: KeyStrategy = "round_robin"
    header: str = "Authorization"
    scheme: str = "Bearer"
    expiry_warning_days: float = 7.0
    readings: bool = True


@dataclass(eq=False)
class PoolKey:
    """A key and its state; attempts hold on to it, so a reload never changes a request's key."""

    spec: KeySpec
    auth: tuple[str, str] = field(repr=False)
    cooling_until: float = 0.0
    quarantined_by: int | None = None
    warned: bool = False
    current_weight: float = 0.0
    last_pick: int = 0
    _limits: RateLimits = field(default_factory=RateLimits, init=False, repr=False)
    _unread: list[_Event] = field(default_factory=list, init=False, repr=False)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def limits(self) -> RateLimits:
        """The key's ``x-ratelimit-*`` readings, less the picks since (see :class:`KeyPool`)."""
        if self._unread:
            self._fold()
        return self._limits

    @limits.setter
    def limits(self, value: RateLimits) -> None:
        self._limits = value
        self._unread = []

    def _record(self, now: float, values: tuple[str | None, ...] | None) -> None:
        """Keep a reading's raw values (or, for None, a pick) for :attr:`limits` to fold."""
        self._unread.append((now, values))
        if len(self._unread) >= _FOLD_AT:  # nobody reads them: keep the memory bounded
            self._fold()

    def _fold(self) -> None:
        self._limits = _folded(self._limits, self._unread)
        self._unread = []

    def state(self, now: float) -> KeyState:
        expires = self.spec.expires_at()
        if expires is not None and now >= expires:
            return "expired"
        if self.quarantined_by is not None:
            return "quarantined"
        return "cooling" if now < self.cooling_until else "active"


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """What readiness and metrics show of a key; never its secret."""

    id: str
    state: KeyState
    until: float | None
    weight: float
    not_after: datetime | None
    expires_soon: bool
    quarantined_by: int | None
    limits: RateLimits


class KeyPool:
    """One upstream's keys (see the module docstring); ``clock`` is wall-clock seconds."""

    spec: PoolSpec

    def __init__(
        self,
        spec: PoolSpec,
        *,
        name: str = "upstream",
        clock: Callable[[], float] = time.time,
        default_cooldown_s: float = 1.0,
    ) -> None:
        self.name = name
        self.clock = clock
        self.default_cooldown_s = default_cooldown_s
        self._keys: list[PoolKey] = []
        self._cursor = 0
        self._picks = 0
        self._readings = True
        self.rebuild(spec)

    @property
    def keys(self) -> tuple[PoolKey, ...]:
        return tuple(self._keys)

    def rebuild(self, spec: PoolSpec) -> None:
        """Take ``spec``'s keys: unchanged ones (id and secret) keep their state, bar quarantine."""
        if spec.strategy not in _STRATEGIES:
            raise ValueError(f"unknown key strategy {spec.strategy!r}")
        ids = [key.id for key in spec.keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate key ids in upstream {self.name!r}")
        if any(not key.weight > 0 for key in spec.keys):
            raise ValueError("key weights must be positive")
        old = {(key.id, key.spec.secret): key for key in self._keys}
        keys: list[PoolKey] = []
        for key_spec in spec.keys:
            value = f"{spec.scheme} {key_spec.secret}" if spec.scheme else key_spec.secret
            key = old.get((key_spec.id, key_spec.secret))
            if key is None:
                key = PoolKey(key_spec, (spec.header, value))
            else:
                key.warned = key.warned and key.spec.not_after == key_spec.not_after
                key.spec, key.auth, key.quarantined_by = key_spec, (spec.header, value), None
            keys.append(key)
        self.spec = spec
        self._keys = keys
        self._readings = spec.readings or spec.strategy == "least_limited"
        if not self._readings:
            for key in keys:
                key.limits = _NO_READINGS
        self._check_expiry(self.clock())

    def acquire(self, pinned: PoolKey | None = None) -> PoolKey:
        """The key for the next attempt: ``pinned`` if given and usable, else by strategy.

        Raises :class:`KeysCoolingDown` (with the earliest usable time) or :class:`NoUsableKey`.
        """
        now = self.clock()
        self._check_expiry(now)
        keys = [pinned] if pinned is not None else self._keys
        candidates = [key for key in keys if key.state(now) == "active"]
        if not candidates:
            waiting = [key for key in keys if key.state(now) == "cooling"]
            if waiting:
                raise KeysCoolingDown(self.name, min(k.cooling_until for k in waiting) - now)
            raise NoUsableKey(f"The upstream {self.name!r} has no usable key.")
        key = candidates[0] if pinned is not None else self._pick(candidates, now)
        self._picks += 1
        key.last_pick = self._picks
        if self._readings:
            key._record(now, None)
        return key

    def _pick(self, candidates: list[PoolKey], now: float) -> PoolKey:
        strategy = self.spec.strategy
        if strategy == "weighted":
            total = sum(key.spec.weight for key in candidates)
            for key in candidates:
                key.current_weight += key.spec.weight
            chosen = max(candidates, key=lambda k: k.current_weight)
            chosen.current_weight -= total
            return chosen
        if strategy == "least_limited":
            return max(candidates, key=lambda k: (k.limits.current(now).headroom(), -k.last_pick))
        count = len(self._keys)
        if count == 1:
            self._cursor = 0
            return candidates[0]
        usable = {id(key) for key in candidates}
        for step in range(count):
            key = self._keys[(self._cursor + step) % count]
            if id(key) in usable:
                self._cursor = (self._cursor + step + 1) % count
                return key
        return candidates[0]

    def has_available(self) -> bool:
        """Whether some key could be used right now."""
        now = self.clock()
        return any(key.state(now) == "active" for key in self._keys)

    def observe(
        self, key: PoolKey, status: int, headers: Mapping[str, str], hint: float | None = None
    ) -> None:
        """Learn from an upstream answer sent with ``key``: readings, 429 cooldown, 401/403."""
        now = self.clock()
        if self._readings:
            values = ratelimit_values(headers)
            if values != _NO_VALUES:
                key._record(now, values)
        if status == 429:
            seconds = self.default_cooldown_s if hint is None else hint
            key.cooling_until = max(key.cooling_until, now + seconds)
            log.info("upstream_key_cooling", upstream=self.name, key_id=key.id, seconds=seconds)
        elif status in (401, 403) and key.quarantined_by is None:
            key.quarantined_by = status
            log.warning(
                "upstream_key_quarantined", upstream=self.name, key_id=key.id, status=status
            )

    def snapshot(self) -> list[KeyStatus]:
        """The state of every key, in config order."""
        now = self.clock()
        self._check_expiry(now)
        return [self._status(key, now) for key in self._keys]

    def _status(self, key: PoolKey, now: float) -> KeyStatus:
        state = key.state(now)
        until = {"cooling": key.cooling_until, "expired": key.spec.expires_at()}.get(state)
        return KeyStatus(
            id=key.id,
            state=state,
            until=until,
            weight=key.spec.weight,
            not_after=key.spec.not_after,
            expires_soon=self._expires_soon(key, now),
            quarantined_by=key.quarantined_by,
            limits=key.limits.current(now),
        )

    def aggregate(self) -> RateLimits | None:
        """Summed limits and remaining, earliest reset, over the active keys with readings."""
        now = self.clock()
        readings = [
            key.limits.current(now)
            for key in self._keys
            if key.state(now) == "active" and key.limits != RateLimits()
        ]
        if not readings:
            return None
        return RateLimits(
            limit_requests=_sum(r.limit_requests for r in readings),
            remaining_requests=_sum(r.remaining_requests for r in readings),
            reset_requests=min(_known(r.reset_requests for r in readings), default=None),
            limit_tokens=_sum(r.limit_tokens for r in readings),
            remaining_tokens=_sum(r.remaining_tokens for r in readings),
            reset_tokens=min(_known(r.reset_tokens for r in readings), default=None),
        )

    def _expires_soon(self, key: PoolKey, now: float) -> bool:
        expires = key.spec.expires_at()
        window = self.spec.expiry_warning_days * _DAY_S
        return expires is not None and now < expires <= now + window

    def _check_expiry(self, now: float) -> None:
        for key in self._keys:
            if key.warned or key.spec.not_after is None:
                continue
            if key.state(now) == "expired":
                key.warned = True
                log.warning("upstream_key_expired", upstream=self.name, key_id=key.id)
            elif self._expires_soon(key, now):
                key.warned = True
                log.warning(
                    "upstream_key_expires_soon",
                    upstream=self.name,
                    key_id=key.id,
                    not_after=key.spec.not_after.isoformat() if key.spec.not_after else None,
                )


_NO_READINGS = RateLimits()
_NO_VALUES = (None,) * 6

# What happened to a key since its readings were last folded, oldest first: an answer's raw
# x-ratelimit-* values, or None for a pick; each with the time it happened.
_Event = tuple[float, tuple[str | None, ...] | None]
_FOLD_AT = 32  # events kept unread before they are folded all the same


def _folded(limits: RateLimits, events: Sequence[_Event]) -> RateLimits:
    """``limits`` after ``events``, each taken as of its own time: what observing and acquiring
    would have made of them one by one.

    A reading that knows all six values overrides whatever came before it, so the fold starts at
    the newest such reading; the ones it replaced are never parsed.
    """
    start = 0
    parsed: dict[int, RateLimits | None] = {}
    for index in range(len(events) - 1, -1, -1):
        now, values = events[index]
        if values is None:
            continue
        reading = parse_ratelimit_values(values, now)
        if reading is not None and reading.complete:
            limits, start = reading, index + 1
            break
        parsed[index] = reading
    for index in range(start, len(events)):
        now, values = events[index]
        if values is None:  # a pick counts one request off until the next reading
            remaining = limits.current(now).remaining_requests
            if remaining is not None:
                limits = replace(limits, remaining_requests=max(0, remaining - 1))
        elif (reading := parsed[index]) is not None:
            limits = limits.merged(reading)
    return limits


def _known(values: Iterable[float | None]) -> list[float]:
    return [value for value in values if value is not None]


def _sum(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None
