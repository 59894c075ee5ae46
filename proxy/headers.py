"""Header handling on both legs: hop-by-hop stripping (RFC 9110 §7.6.1) and credential swapping."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import ClientRequest, web
from aiohttp.hdrs import CONNECTION, CONTENT_TYPE, USER_AGENT, X_FORWARDED_FOR
from multidict import CIMultiDict, CIMultiDictProxy, istr

from sidegate.middlewares.access_log import add_request_id
from sidegate.middlewares.ratelimit_headers import apply_ratelimit_headers

__all__ = [
    "UpstreamRequest",
    "downstream_headers",
    "media_type",
    "stamp_response",
    "upstream_headers",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _case_insensitive_set(names: Iterable[str]) -> CIMultiDictProxy[None]:
    """``names`` as a case-insensitive set (multidict has none: a mapping to nothing), so a
    header name is looked up as it is, without lowering a copy of it first."""
    return CIMultiDictProxy(CIMultiDict((name, None) for name in sorted(names)))


# Never forwarded upstream: the client's own credentials for sidegate, what sidegate recomputes,
# and what only the client and sidegate share.
_REQUEST_DROP = _case_insensitive_set(
    HOP_BY_HOP
    | {
        "host",
        "content-length",
        "authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "expect",
        "accept-encoding",
        "x-forwarded-for",
        "x-request-id",
    }
)
# Recomputed by sidegate for the client (the body is decompressed on the way through).
_RESPONSE_DROP = _case_insensitive_set(
    HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
)
_REQUEST_ID = istr("x-request-id")


def upstream_headers(
    client: CIMultiDictProxy[str],
    *,
    auth: Iterable[tuple[str, str]],
    request_id: str,
    peer: str | None,
) -> CIMultiDict[str]:
    """The client's headers less hop-by-hop and credentials, plus sidegate's own."""
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    for name, value in client.items():  # a few headers, many names to drop: pick what stays
        if name not in _REQUEST_DROP:
            add(name, value)
    if CONNECTION in client:
        _drop_connection_named(client, out)
    for name, value in auth:
        out[name] = value
    out[_REQUEST_ID] = request_id
    forwarded = ", ".join(client.getall(X_FORWARDED_FOR, ()))
    if peer:
        forwarded = f"{forwarded}, {peer}" if forwarded else peer
    if forwarded:
        out[X_FORWARDED_FOR] = forwarded
    return out


def downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers for the client: the upstream's, less hop-by-hop and what sidegate recomputes."""
    out = CIMultiDict(upstream)
    # Copy everything, then remove what must go: only the names present (three, typically),
    # rather than trying all thirteen.
    for name in [name for name in upstream if name in _RESPONSE_DROP]:
        out.popall(name, None)
    if CONNECTION in upstream:
        _drop_connection_named(upstream, out)
    return out


def _drop_connection_named(headers: CIMultiDictProxy[str], out: CIMultiDict[str]) -> None:
    """Remove from ``out`` every header the Connection header of ``headers`` names."""
    for value in headers.getall(CONNECTION, ()):
        for token in value.split(","):
            out.popall(token.strip().lower(), None)


def media_type(headers: CIMultiDictProxy[str]) -> str:
    """The media type ``Content-Type`` names, read as aiohttp's ``content_type`` reads it (the
    part before any ``;``, stripped, lower-cased), without parsing the parameters as it does."""
    return headers.get(CONTENT_TYPE, "").partition(";")[0].strip().lower()


def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """What every response sidegate sends carries, set before its headers leave: x-request-id,
    then the rate-limit headers per the mode the request was marked with (a 429's Retry-After).

    The gateway's access log stamps each response it returns unprepared (answers and error
    envelopes); a streamed answer is prepared inside the handler, which stamps it first.
    """
    add_request_id(request, response)
    apply_ratelimit_headers(request, response)


class UpstreamRequest(ClientRequest):
    """aiohttp's client request (the upstream session's ``request_class``), less the
    ``User-Agent`` aiohttp makes up: the client's own passes through, and none is invented for a
    client without one. Its other automatic headers (``Accept``, ``Accept-Encoding``) stay.

    ``skip_auto_headers=("User-Agent",)`` on each request would do the same, at the cost of a
    copy of every header and a set built per request.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if skip_auto_headers:  # aiohttp's own way, told to skip the User-Agent too
            super().update_auto_headers((*skip_auto_headers, USER_AGENT))
            return
        headers = self.headers
        for name, value in self.DEFAULT_HEADERS.items():
            if name not in headers:
                headers[name] = value
