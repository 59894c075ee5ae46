"""The embeddings cache: per item, per team, exact, for ``/v1/embeddings`` of both vendors.

Every item of a request (a string or a token-id array, see :mod:`.embeddings_cache_codec`) is
looked up on its own, duplicates once. All found: the answer is built here, with no upstream call
and — the policy sits before the limits policy — no rate-window hit and no budget reservation.
Some found: ``call.body`` is rewritten to the missing items, in order, each once, every other
field kept, so the upstream and the budget see (and charge) only those; the answer is merged so
that every item has its own ``index`` and vector. ``usage`` is the upstream's own (zero on a full
hit). The body is restored once the upstream has answered, so outer policies see what the client
sent.

* Scope ``team`` (default): a key includes the caller's team; teams never see each other's
  entries. ``shared``: one cache for every team.
* ``Cache-Control: no-cache`` skips the lookup and stores the fresh vectors; ``no-store``
  neither reads nor writes (the request goes upstream as sent).
* Only a 200 answer that is a well-formed embeddings list is stored. An upstream error passes
  through unchanged; a malformed 200 passes through uncached, unless the request was rewritten,
  where it cannot be merged and becomes a 502 ``upstream_bad_response``.
* A successful answer carries ``x-sidegate-cache: hit|partial|miss`` and
  ``x-sidegate-cache-hits: N`` (items answered from the cache).
* A backend that cannot be reached (:class:`CacheUnavailable`) sends every item upstream
  (duplicates still once) and stores nothing; the outage is logged once when it starts and once
  when it ends. While it lasts the backend is tried at most every ``probe_interval_s``; the
  requests in between skip it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy

from .contract import CALL_KEY, Call, EndpointKind
from .embeddings_cache_codec import (
    Plan,
    hit_body,
    is_stored,
    merged_body,
    plan_items,
    read_answer,
)
from .embeddings_cache_store import (
    CacheUnavailable,
    EmbeddingsCacheObserver,
    MemoryVectorCache,
    RedisVectorCache,
    VectorCache,
)
from .errors import UpstreamError

__all__ = [
    "CACHE_HEADER",
    "HITS_HEADER",
    "CacheUnavailable",
    "EmbeddingsCacheObserver",
    "EmbeddingsCacheSettings",
    "MemoryVectorCache",
    "RedisVectorCache",
    "VectorCache",
    "embeddings_cache_middleware",
]

log = structlog.get_logger(__name__)

CACHE_HEADER = "x-sidegate-cache"
HITS_HEADER = "x-sidegate-cache-hits"
_SCOPES = frozenset({"team", "shared"})
_FLOAT_FORMS = frozenset({"text", "float32"})


class EmbeddingsCacheSettings(Protocol):
    """What the policy reads; ``sidegate.config.cache.EmbeddingsCacheConfig`` is one.

    ``ttl_s`` is how long an entry lives after its last write; ``scope`` is ``team`` or
    ``shared``; ``float_answers`` is how a vector that came as JSON numbers is kept, ``text``
    (cheapest to answer again) or ``float32`` (under a quarter of the bytes; see
    :mod:`.embeddings_cache_codec`). (``max_bytes`` bounds :class:`MemoryVectorCache`, built by
    the caller.)
    """

    @property
    def ttl_s(self) -> int: ...
    @property
    def scope(self) -> str: ...
    @property
    def float_answers(self) -> str: ...


class _Outage:
    """Whether the backend is down: logged when an outage starts and when it ends."""

    def __init__(self, clock: Callable[[], float], probe_interval_s: float) -> None:
        self.clock = clock
        self.probe_interval_s = probe_interval_s
        self.since: float | None = None
        self.probe_at = 0.0

    def skipping(self) -> bool:
        return self.since is not None and self.clock() < self.probe_at

    def failed(self, exc: CacheUnavailable) -> None:
        now = self.clock()
        if self.since is None:
            self.since = now
            log.warning("embeddings_cache_unavailable", error=str(exc), fail_open=True)
        self.probe_at = now + self.probe_interval_s

    def succeeded(self) -> None:
        if self.since is not None:
            log.info("embeddings_cache_recovered", down_s=round(self.clock() - self.since, 3))
            self.since = None


def embeddings_cache_middleware(
    settings: EmbeddingsCacheSettings,
    cache: VectorCache,
    *,
    observer: EmbeddingsCacheObserver | None = None,
    clock: Callable[[], float] = time.monotonic,
    probe_interval_s: float = 1.0,
) -> Middleware:
    """Serve ``/v1/embeddings`` items from ``cache`` (see the module docstring).

    Place it after routing (it needs the :class:`~.contract.Call` and its Principal) and before
    the limits policy. Requests that are not embeddings calls pass through untouched. Build
    ``cache`` once and keep it across config reloads; the middleware itself holds no vectors.
    A full hit answers ``model`` with the route's upstream model id.
    """
    if settings.scope not in _SCOPES:
        raise ValueError(f"scope must be 'team' or 'shared', not {settings.scope!r}")
    if settings.ttl_s <= 0 or probe_interval_s < 0:
        raise ValueError("ttl_s must be positive and probe_interval_s not negative")
    if settings.float_answers not in _FLOAT_FORMS:
        raise ValueError(
            f"float_answers must be 'text' or 'float32', not {settings.float_answers!r}"
        )
    keep_text = settings.float_answers == "text"
    outage = _Outage(clock, probe_interval_s)

    async def lookup(plan: Plan) -> tuple[dict[bytes, bytes], bool]:
        if outage.skipping():
            return {}, False
        unique = list(dict.fromkeys(plan.keys))
        try:
            values = await cache.get_many(unique)
        except CacheUnavailable as exc:
            outage.failed(exc)
            return {}, False
        outage.succeeded()
        found = zip(unique, values, strict=True)
        return {key: value for key, value in found if value and is_stored(value)}, True

    async def store(entries: Mapping[bytes, bytes]) -> None:
        if not entries:
            return
        try:
            await cache.set_many(entries, settings.ttl_s)
        except CacheUnavailable as exc:
            outage.failed(exc)

    @web.middleware
    async def embeddings_cache(request: web.Request, handler: Handler) -> web.StreamResponse:
        call = request.get(CALL_KEY)
        if call is None or not _cacheable(call):
            return await handler(request)
        directives = _cache_control(request.headers)
        plan = None if "no-store" in directives else _plan(call, settings.scope)
        if plan is None:
            return _label(await handler(request), call, "miss", 0)
        if "no-cache" in directives:
            found: dict[bytes, bytes] = {}
            writable = not outage.skipping()
        else:
            found, writable = await lookup(plan)
        total = len(plan.keys)
        hits = sum(1 for key in plan.keys if key in found)
        missing = [key for key in dict.fromkeys(plan.keys) if key not in found]
        if observer is not None:
            observer.hit(hits)
            observer.missed(total - hits)
            observer.saved(total - len(missing))
        if not missing:
            vectors = [found[key] for key in plan.keys]
            body = hit_body(vectors, plan.encoding, plan.model)
            answered = web.Response(body=body, content_type="application/json")
            return _label(answered, call, "hit", hits)
        rewrite = len(missing) < total
        original = (call.body, call._json)
        if rewrite:
            item_of = dict(zip(plan.keys, plan.items, strict=True))
            payload = {**call.json, "input": [item_of[key] for key in missing]}
            call.body, call._json = orjson.dumps(payload), payload
        try:
            response = await handler(request)
        finally:
            call.body, call._json = original
        if (
            response.status != 200
            or not isinstance(response, web.Response)
            or not isinstance(response.body, bytes)
        ):
            return response
        answer = read_answer(call.answer_json(response.body), len(missing), keep_text=keep_text)
        if answer is None:
            if rewrite:
                raise UpstreamError(
                    f"The upstream {call.route.upstream!r} sent an embeddings answer sidegate "
                    "could not read.",
                    code="upstream_bad_response",
                )
            return _label(response, call, "miss", 0)
        if writable:
            await store(
                {key: v for key, v in zip(missing, answer.vectors, strict=True) if v is not None}
            )
        if rewrite:
            sent = {key: offset for offset, key in enumerate(missing)}
            sources = [found[key] if key in found else sent[key] for key in plan.keys]
            response.body = merged_body(answer, sources, plan.encoding)
            response.headers.popall("Content-Length", None)
        return _label(response, call, "partial" if hits else "miss", hits)

    return embeddings_cache


def _cacheable(call: Call) -> bool:
    route = call.route
    return (
        route.kind is EndpointKind.EMBEDDINGS
        and route.upstream_model is not None
        and call.principal is not None
        and not call.stream
    )


def _plan(call: Call, scope: str) -> Plan | None:
    principal = call.principal
    assert principal is not None
    route = call.route
    assert route.upstream_model is not None
    parts = ("team", principal.team) if scope == "team" else ("shared",)
    return plan_items(call.json, scope=parts, upstream=route.upstream, model=route.upstream_model)


def _cache_control(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        directive.split("=", 1)[0].strip().lower()
        for value in headers.getall("Cache-Control", ())
        for directive in value.split(",")
    }


def _label(response: web.StreamResponse, call: Call, status: str, hits: int) -> web.StreamResponse:
    if response.status == 200 and not response.prepared:
        response.headers[CACHE_HEADER] = status
        response.headers[HITS_HEADER] = str(hits)
        call.cache_status = status
    return response
