"""Reading the upstreams' rate-limit signals: the one parser retry, key rotation and headers share.

Forms understood:

* ``Retry-After`` — delay-seconds (decimals accepted) or an HTTP-date;
* ``retry-after-ms`` — milliseconds;
* Meridian's JSON 429 body field ``retry-after`` — seconds;
* ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` — a reset is either a unix time in
  seconds (Meridian's documented form; any number from 1e9 on) or a duration: a bare number of
  seconds below that, or Go-style ``6m0s``, ``12ms``, ``1.5s``, ``2h3m``.

Times come back as absolute wall-clock seconds (``time.time()`` scale) or as delays in seconds
from ``now``; negative delays are 0. Anything unparsable is ``None``, never an exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import orjson
from aiohttp import ClientError, ClientResponse
from multidict import CIMultiDict, istr

from .values import value_type

__all__ = [
    "RATELIMIT_HEADERS",
    "RateLimits",
    "body_retry_after",
    "parse_duration",
    "parse_ratelimit_values",
    "parse_ratelimits",
    "parse_reset",
    "parse_retry_after",
    "parse_retry_after_ms",
    "ratelimit_values",
    "response_retry_hint",
    "retry_hint",
]

_EPOCH_FROM = 1_000_000_000.0
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|us|µs|ns|h|m|s))+")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")

RATELIMIT_HEADERS = tuple(
    istr(f"x-ratelimit-{field}-{window}")
    for window in ("requests", "tokens")
    for field in ("limit", "remaining", "reset")
)
"""The six names, as ``istr``: a case-insensitive multidict folds an ``istr`` once, not per use."""


def _number(value: str) -> float | None:
    if not (value.isascii() and value.isdigit()):  # else the general form (the rare case)
        value = value.strip()
        if not _NUMBER.fullmatch(value):
            return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_duration(value: str) -> float | None:
    """Seconds in a Go-style duration (``6m0s``, ``12ms``, ``1.5s``, ``2h3m``), else None."""
    value = value.strip()
    if not _DURATION.fullmatch(value):
        return None
    return sum(float(amount) * _UNITS[unit] for amount, unit in _PART.findall(value))


def parse_retry_after(value: str, now: float) -> float | None:
    """The delay a ``Retry-After`` value asks for: delay-seconds or an HTTP-date."""
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def parse_retry_after_ms(value: str) -> float | None:
    """The delay a ``retry-after-ms`` value asks for, in seconds."""
    millis = _number(value)
    return None if millis is None else millis / 1000.0


def parse_reset(value: str, now: float) -> float | None:
    """The absolute wall-clock time an ``x-ratelimit-reset-*`` value names."""
    number = _number(value)
    if number is not None:
        return number if number >= _EPOCH_FROM else now + number
    seconds = parse_duration(value)
    return None if seconds is None else now + seconds


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    number = _number(value)
    return None if number is None else int(number)


def _reset(value: str | None, now: float) -> float | None:
    return None if value is None else parse_reset(value, now)


@value_type
class RateLimits:
    """One view of the two rate-limit windows; resets are absolute wall-clock seconds.

    Used for what an upstream key reported, for the aggregate over a pool's keys and for a team's
    own limits (the ``team_limits`` callback of the header middleware).
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None

    def merged(self, newer: RateLimits) -> RateLimits:
        """These values, overridden by every value ``newer`` knows."""
        values = [
            new if new is not None else old
            for new, old in zip(_values(newer), _values(self), strict=True)
        ]
        return RateLimits(*values)

    @property
    def complete(self) -> bool:
        """Whether all six values are known (so :meth:`merged` into anything gives just these)."""
        return None not in _values(self)

    def current(self, now: float) -> RateLimits:
        """As of ``now``: a window whose reset has passed is full again."""
        result = self
        if self.reset_requests is not None and self.reset_requests <= now:
            result = replace(result, remaining_requests=self.limit_requests, reset_requests=None)
        if self.reset_tokens is not None and self.reset_tokens <= now:
            result = replace(result, remaining_tokens=self.limit_tokens, reset_tokens=None)
        return result

    def headroom(self) -> float:
        """The smallest remaining/limit fraction over the windows known (1.0 when none is)."""
        fractions = [
            remaining / limit
            for limit, remaining in (
                (self.limit_requests, self.remaining_requests),
                (self.limit_tokens, self.remaining_tokens),
            )
            if limit and remaining is not None
        ]
        return min(fractions, default=1.0)

    def exhausted_reset(self) -> float | None:
        """When the windows with nothing (or an unknown amount) remaining reset; latest wins."""
        candidates = [
            reset
            for remaining, reset in (
                (self.remaining_requests, self.reset_requests),
                (self.remaining_tokens, self.reset_tokens),
            )
            if reset is not None and (remaining is None or remaining <= 0)
        ]
        return max(candidates, default=None)

    def headers(self) -> CIMultiDict[str]:
        """The normalised ``x-ratelimit-*`` headers; resets as whole unix seconds."""
        return CIMultiDict(self.header_items())

    def header_items(self) -> list[tuple[str, str]]:
        """:meth:`headers` as ``(name, value)`` pairs, in the order of :data:`RATELIMIT_HEADERS`."""
        values = _values(self)
        if None not in values:  # all six (a team's own limits, on every request): no loop
            limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t = values
            n = RATELIMIT_HEADERS
            return [
                (n[0], str(limit_r)),
                (n[1], str(remaining_r)),
                (n[2], str(math.ceil(reset_r))),
                (n[3], str(limit_t)),
                (n[4], str(remaining_t)),
                (n[5], str(math.ceil(reset_t))),
            ]
        return [
            (name, str(math.ceil(value)) if is_reset else str(value))
            for (name, is_reset), value in zip(_NAMES, values, strict=True)
            if value is not None
        ]


_NAMES = tuple((name, name.startswith("x-ratelimit-reset")) for name in RATELIMIT_HEADERS)


def _values(limits: RateLimits) -> tuple[Any, ...]:
    """The six fields in declaration order (the order of :data:`RATELIMIT_HEADERS`)."""
    return (
        limits.limit_requests,
        limits.remaining_requests,
        limits.reset_requests,
        limits.limit_tokens,
        limits.remaining_tokens,
        limits.reset_tokens,
    )


def ratelimit_values(headers: Mapping[str, str]) -> tuple[str | None, ...]:
    """The raw values of the six headers of :data:`RATELIMIT_HEADERS` in ``headers``, in order."""
    return tuple(map(headers.get, RATELIMIT_HEADERS))


def parse_ratelimit_values(values: Sequence[str | None], now: float) -> RateLimits | None:
    """What :func:`ratelimit_values` gave, parsed; None when none of them can be read."""
    limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t = values
    parsed = (
        _count(limit_r),
        _count(remaining_r),
        _reset(reset_r, now),
        _count(limit_t),
        _count(remaining_t),
        _reset(reset_t, now),
    )
    return None if parsed == _UNKNOWN else RateLimits(*parsed)


def parse_ratelimits(headers: Mapping[str, str], now: float) -> RateLimits | None:
    """The ``x-ratelimit-*`` values in ``headers``, or None when there is none to read."""
    return parse_ratelimit_values(ratelimit_values(headers), now)


_UNKNOWN = (None,) * 6


def body_retry_after(body: bytes) -> float | None:
    """Meridian's top-level ``retry-after`` field (seconds) of a JSON body, if any."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = payload.get("retry-after") if isinstance(payload, dict) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return max(0.0, float(value)) if math.isfinite(value) else None
    return _number(value) if isinstance(value, str) else None


def retry_hint(headers: Mapping[str, str], body: bytes | None, now: float) -> float | None:
    """How long the upstream asks to wait, in seconds from ``now``; None when it does not say.

    Precedence: ``retry-after-ms``, ``Retry-After``, the body's ``retry-after``, then the reset of
    the exhausted ``x-ratelimit-*`` windows.
    """
    for name, parse in (
        ("retry-after-ms", parse_retry_after_ms),
        ("Retry-After", lambda value: parse_retry_after(value, now)),
    ):
        value = headers.get(name)
        if value is not None and (seconds := parse(value)) is not None:
            return seconds
    if body and (seconds := body_retry_after(body)) is not None:
        return seconds
    limits = parse_ratelimits(headers, now)
    reset = None if limits is None else limits.exhausted_reset()
    return None if reset is None else max(0.0, reset - now)


async def response_retry_hint(response: ClientResponse, now: float) -> float | None:
    """:func:`retry_hint` of an upstream 429/503, reading a JSON body if need be.

    The body is read with ``response.read()``, which caches it: the caller still gets it from
    ``read()``/``json()``/``text()`` (not from ``response.content``). Other responses and
    streams are left unread.
    """
    body: bytes | None = None
    if response.status in (429, 503) and response.content_type == "application/json":
        try:
            body = await response.read()
        except (ClientError, TimeoutError):
            body = None
    return retry_hint(response.headers, body, now)
