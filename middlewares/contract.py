"""The small public contract shared by routing, forwarding and every policy middleware.

Middlewares talk to each other only through the :class:`Call` stored on the request under
:data:`CALL_KEY`. Routing creates it once per request; policies read it and fill in what they
learn on the way back. Nothing here knows about YAML or the CLI.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from .errors import BadRequest

__all__ = [
    "CALL_KEY",
    "PRINCIPAL_KEY",
    "REQUEST_ID_KEY",
    "Call",
    "EndpointKind",
    "Principal",
    "Route",
    "StreamFilter",
    "Vendor",
    "parse_object",
]


class Vendor(enum.StrEnum):
    MERIDIAN = "meridian"
    MEIVAN = "meivan"


class EndpointKind(enum.StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    IMAGES = "images"
    AUDIO = "audio"
    COMPLETE = "complete"
    PASSTHROUGH = "passthrough"
    LISTING = "listing"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes a request: the team it is charged to and what it may use.

    ``models`` is ``None`` when every model is allowed.
    """

    team: str
    key_id: str | None = None
    subject: str | None = None
    roles: frozenset[str] = frozenset()
    models: frozenset[str] | None = None

    def may_use(self, public: str, upstream_model: str | None = None) -> bool:
        """Whether the allowlist names the model, or the model an alias points at."""
        allowed = self.models
        return allowed is None or public in allowed or upstream_model in allowed


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: resolved once by routing, never by a policy."""

    upstream: str
    vendor: Vendor
    kind: EndpointKind
    upstream_path: str
    public_model: str | None = None
    upstream_model: str | None = None


class StreamFilter(Protocol):
    """Sees a streamed response on its way to the client (set by a policy on the Call).

    ``feed`` gets each chunk as it arrives and returns the bytes to send on (possibly fewer:
    an event it hides); ``close`` returns whatever it still holds when the upstream ends.
    """

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...


@dataclass(slots=True, eq=False)
class Call:
    """One request on its way through sidegate.

    ``body`` is read once (bounded by ``server.max_body_bytes``); :attr:`json` parses it once, on
    first use. The fields after ``stream`` are filled in on the way back; ``ended`` says how a
    streamed response ended: ``complete``, ``client_disconnected`` or ``upstream_broken``.
    """

    request_id: str
    route: Route
    body: bytes
    content_type: str
    principal: Principal | None = None
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    cost_estimate_nano_usd: int | None = None
    attempts: int = 0
    upstream_key_id: str | None = None
    upstream_status: int | None = None
    upstream_latency_ms: float | None = None
    cache_status: str | None = None
    usage: dict[str, int] | None = None
    cost_nano_usd: int | None = None
    bytes_out: int = 0
    stream_filter: StreamFilter | None = None
    ended: str | None = None
    _json: dict[str, Any] | None = None
    _answer: tuple[bytes, Any] | None = None

    @property
    def json(self) -> dict[str, Any]:
        """The forwarded body as a JSON object, parsed on first use (orjson)."""
        if self._json is None:
            self._json = parse_object(self.body)
        return self._json

    def answer_json(self, body: bytes) -> Any:
        """The upstream's answer ``body`` as JSON (None if it is not), parsed once however many
        policies read the same bytes."""
        cached = self._answer
        if cached is not None and cached[0] is body:
            return cached[1]
        parsed = _loads(body)
        self._answer = (body, parsed)
        return parsed


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def parse_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body, or raise a 400 that says what is wrong."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON ({exc.msg} at position {exc.pos}).",
            code="invalid_json",
        ) from None
    if not isinstance(parsed, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return parsed


CALL_KEY = web.RequestKey("sidegate_call", Call)
PRINCIPAL_KEY = web.RequestKey("sidegate_principal", Principal)
REQUEST_ID_KEY = web.RequestKey("sidegate_request_id", str)
