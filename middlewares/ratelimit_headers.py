"""What the client sees of rate limits: ``x-ratelimit-*`` per mode, and a Retry-After on every 429.

Modes:

* ``passthrough`` — the upstream's six ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
  headers, normalised: counts as integers, resets as unix seconds (Meridian's documented form; a
  duration such as ``6m0s`` is turned into one), unparsable values dropped, other
  ``x-ratelimit-*`` headers left alone. Meivan is assumed to send either none (what its reference
  documents, and what the mock does) or the same six names; either way the same normalisation
  applies and nothing is invented.
* ``team`` — the caller's own limits from ``team_limits(request)``; when that gives nothing, the
  aggregate of the upstream's healthy keys from ``pools(request)`` (summed limits and remaining,
  earliest reset); when neither knows anything, no ``x-ratelimit-*`` header at all.
* ``strip`` — every ``x-ratelimit-*`` header removed.

Every 429 gets a ``Retry-After``: the body's ``retry-after`` field rounded up when there is one
(so header and body agree), else the upstream's ``Retry-After`` when it parses, else the rounded-up
``retry-after-ms`` or exhausted-window reset, else 1 second.

A streamed response's headers leave at ``prepare()``, inside the handler, so the rewriting happens
before ``prepare()`` (:func:`apply_ratelimit_headers`; :func:`ratelimit_headers_on_prepare` is
it as an ``on_response_prepare`` handler): the middleware only puts its settings on the request.
:func:`setup_ratelimit_headers` registers both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from .ratelimits import (
    RATELIMIT_HEADERS,
    RateLimits,
    body_retry_after,
    parse_ratelimits,
    parse_retry_after,
    retry_hint,
)
from .steps import StepMiddleware

__all__ = [
    "ModeSetting",
    "RateLimitHeadersMode",
    "RateLimitSource",
    "apply_ratelimit_headers",
    "ratelimit_headers_middleware",
    "ratelimit_headers_on_prepare",
    "setup_ratelimit_headers",
]

RateLimitHeadersMode = Literal["passthrough", "team", "strip"]
ModeSetting = RateLimitHeadersMode | Callable[[web.Request], RateLimitHeadersMode]
_MODES = frozenset({"passthrough", "team", "strip"})
_PREFIX = "x-ratelimit-"


class RateLimitSource(Protocol):
    """Anything that can sum up its keys' limits, such as a :class:`~.keys.KeyPool`."""

    def aggregate(self) -> RateLimits | None: ...


def _canonical(headers: CIMultiDict[str]) -> bool:
    """Whether every x-ratelimit header present is one whole number (resets: unix seconds)."""
    getall = headers.getall
    for name, shortest in _CANONICAL:
        values = getall(name, ())
        if not values:
            continue
        if len(values) > 1:
            return False
        value = values[0]
        if len(value) < shortest or not (value.isascii() and value.isdigit()):
            return False
    return True


_UNIX_DIGITS = 10  # a bare number this long is a unix time, shorter ones are seconds from now
_CANONICAL = tuple(
    (name, _UNIX_DIGITS if name.startswith("x-ratelimit-reset") else 1)
    for name in RATELIMIT_HEADERS
)


class _Rewriter:
    def __init__(
        self,
        mode: ModeSetting,
        team_limits: Callable[[web.Request], RateLimits | None] | None,
        pools: Callable[[web.Request], RateLimitSource | None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.mode = mode
        self.team_limits = team_limits
        self.pools = pools
        self.clock = clock

    def rewrite(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        mode = self.mode(request) if callable(self.mode) else self.mode
        if mode not in _MODES:
            raise ValueError(f"unknown rate-limit headers mode {mode!r}")
        if mode == "passthrough":
            if _canonical(headers):  # Meridian's own form already: nothing to rewrite
                return
            limits = parse_ratelimits(headers, self.clock())
            for name in RATELIMIT_HEADERS:
                headers.popall(name, None)
        else:
            limits = self._team(request) if mode == "team" else None
            for name in RATELIMIT_HEADERS:
                headers.popall(name, None)
            if _PREFIX in "\n".join(headers).lower():  # some other x-ratelimit-* header (rare)
                for other in [name for name in headers if name.lower().startswith(_PREFIX)]:
                    headers.popall(other, None)
        if limits is not None:  # none of its headers is left: extend is update
            headers.extend(limits.header_items())

    def _team(self, request: web.Request) -> RateLimits | None:
        if self.team_limits is not None and (own := self.team_limits(request)) is not None:
            return own
        source = None if self.pools is None else self.pools(request)
        return None if source is None else source.aggregate()


_REWRITER = web.RequestKey("sidegate_ratelimit_rewriter", _Rewriter)


def ratelimit_headers_middleware(
    mode: ModeSetting,
    *,
    team_limits: Callable[[web.Request], RateLimits | None] | None = None,
    pools: Callable[[web.Request], RateLimitSource | None] | None = None,
    clock: Callable[[], float] = time.time,
    on_prepare: bool = False,
) -> Middleware:
    """A middleware applying ``mode`` (see the module docstring) to the responses below it.

    ``mode`` may be a callable choosing it per request (so a reload can change it), e.g. from the
    config the request started with.

    ``team_limits(request)`` gives the caller's team limits (``team`` mode); ``pools(request)``
    the upstream's key pool for the fallback aggregate. Responses not yet prepared when the
    handler returns are rewritten here; streamed ones need :func:`ratelimit_headers_on_prepare`
    in the app's ``on_response_prepare``. ``on_prepare=True`` says every response is rewritten
    elsewhere, once, by :func:`apply_ratelimit_headers` before its headers leave (by that handler,
    as :func:`setup_ratelimit_headers` registers it, or as sidegate's gateway does it, where the
    access log and the stream call it): the middleware then only marks the request (a step:
    :mod:`.steps`).
    """
    if not callable(mode) and mode not in _MODES:
        raise ValueError(f"unknown rate-limit headers mode {mode!r}")
    rewriter = _Rewriter(mode, team_limits, pools, clock)

    if on_prepare:

        def mark(request: web.Request) -> None:
            request[_REWRITER] = rewriter

        return StepMiddleware(mark)

    @web.middleware
    async def ratelimit_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[_REWRITER] = rewriter
        response = await handler(request)
        if not response.prepared:
            apply_ratelimit_headers(request, response)
        return response

    return ratelimit_headers


def apply_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Give a 429 its Retry-After, then rewrite per the mode the middleware left on ``request``.

    Idempotent; call it before ``prepare()`` if the signal handler is not registered.
    """
    try:  # not request.get(): that is Mapping's, two Python calls where this is one
        rewriter: _Rewriter | None = request[_REWRITER]
    except KeyError:
        rewriter = None
    if response.status == 429:
        _ensure_retry_after(response, time.time() if rewriter is None else rewriter.clock())
    if rewriter is not None:
        rewriter.rewrite(request, response)


async def ratelimit_headers_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """The ``on_response_prepare`` handler: :func:`apply_ratelimit_headers` on every response."""
    apply_ratelimit_headers(request, response)


def setup_ratelimit_headers(
    app: web.Application,
    mode: ModeSetting,
    *,
    team_limits: Callable[[web.Request], RateLimits | None] | None = None,
    pools: Callable[[web.Request], RateLimitSource | None] | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Append :func:`ratelimit_headers_middleware` to ``app`` and register the prepare handler."""
    app.middlewares.append(
        ratelimit_headers_middleware(
            mode, team_limits=team_limits, pools=pools, clock=clock, on_prepare=True
        )
    )
    app.on_response_prepare.append(ratelimit_headers_on_prepare)


def _ensure_retry_after(response: web.StreamResponse, now: float) -> None:
    headers = response.headers
    body = response.body if isinstance(response, web.Response) else None
    in_body = body_retry_after(body) if isinstance(body, bytes) and body else None
    if in_body is not None:
        headers["Retry-After"] = str(math.ceil(in_body))
        return
    current = headers.get("Retry-After")
    if current is not None and parse_retry_after(current, now) is not None:
        return
    headers.popall("Retry-After", None)
    hint = retry_hint(headers, None, now)
    headers["Retry-After"] = str(max(1, math.ceil(hint))) if hint is not None else "1"
