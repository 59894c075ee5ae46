"""Forwarding: one upstream exchange per call, streamed through without buffering.

A response whose content type is ``text/event-stream`` is passed to the client chunk by chunk as
it arrives; any other response is read whole (it is a JSON document) and sent on. Status, body and
headers pass through, less hop-by-hop headers; upstream errors pass through unchanged. sidegate's
own failures to reach the upstream become 502/504 envelopes that say which limit was hit.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Gauge

from sidegate.middlewares.contract import CALL_KEY, Call, Vendor
from sidegate.middlewares.errors import SidegateError, UpstreamError
from sidegate.middlewares.outbound import OUTBOUND, Outbound

from .headers import downstream_headers, media_type, stamp_response, upstream_headers
from .runtime import UpstreamTarget
from .state import ACTIVE_KEY

__all__ = ["forward_handler"]

log = structlog.get_logger(__name__)

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def forward_handler(request: web.Request) -> web.StreamResponse:
    """The handler behind every routed endpoint: send the :class:`Call` to its upstream."""
    call = request[CALL_KEY]
    active = request[ACTIVE_KEY]
    target = active.runtime.upstreams[call.route.upstream]
    state = active.state
    method = request.method
    headers = upstream_headers(
        request.headers, auth=target.auth, request_id=call.request_id, peer=request.remote
    )
    outbound = Outbound(
        upstream=target.name,
        generate_idempotency_key=(
            target.vendor is Vendor.MEIVAN
            and method in _MUTATING
            and active.runtime.config.retry.generate_idempotency_key
        ),
    )
    started = time.perf_counter()
    token = OUTBOUND.set(outbound)
    try:
        upstream = await state.session.request(
            method,
            target.url(call.route.upstream_path, request.rel_url.raw_query_string),
            data=call.body or None,
            headers=headers,
            timeout=target.timeout,
            allow_redirects=False,
            middlewares=active.client_middlewares,
        )
    except SidegateError as exc:
        exc.headers.update(outbound.response_headers())
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = _upstream_failure(target, exc)
        error.headers.update(outbound.response_headers())
        raise error from None
    finally:
        OUTBOUND.reset(token)
        call.attempts = outbound.attempts
        call.upstream_key_id = outbound.key_id or target.key_id
    status = upstream.status
    call.upstream_status = status
    call.upstream_latency_ms = (time.perf_counter() - started) * 1000.0
    state.metrics.upstream_response(target.name, status)
    try:
        if media_type(upstream.headers) == "text/event-stream":
            return await _stream(request, upstream, call, outbound, state.metrics.streams_in_flight)
        try:
            body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _upstream_failure(target, exc) from None
        call.bytes_out = len(body)
        if status >= 400:
            log.debug("upstream_error", upstream=target.name, status=status, body=body[:2048])
        response_headers = downstream_headers(upstream.headers)
        response_headers.update(outbound.response_headers())
        return web.Response(
            status=status, reason=upstream.reason, body=body, headers=response_headers
        )
    finally:
        upstream.release()


async def _stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: Call,
    outbound: Outbound,
    gauge: Gauge,
) -> web.StreamResponse:
    headers = downstream_headers(upstream.headers)
    headers.update(outbound.response_headers())
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    gauge.inc()
    try:
        stamp_response(request, response)
        await response.prepare(request)
        reader = upstream.content
        sift = call.stream_filter
        while True:
            try:
                chunk = await reader.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("upstream_stream_broken", error=type(exc).__name__)
                call.ended = "upstream_broken"
                _end_abruptly(request)
                return response
            last = not chunk
            if sift is not None:
                chunk = sift.close() if last else sift.feed(chunk)
            if chunk:
                await response.write(chunk)
                call.bytes_out += len(chunk)
            if last:
                break
        await response.write_eof()
        call.ended = "complete"
        return response
    except ConnectionResetError:  # the client went away: at prepare, a write or the end
        log.info("client_disconnected", bytes_out=call.bytes_out)
        call.ended = "client_disconnected"
        upstream.close()
        return response
    except asyncio.CancelledError:
        call.ended = "client_disconnected"  # an app with handler_cancellation: the client left
        raise
    finally:
        gauge.dec()


def _end_abruptly(request: web.Request) -> None:
    """End a client stream without its terminating chunk, so the client sees it was cut."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _upstream_failure(target: UpstreamTarget, exc: BaseException) -> UpstreamError:
    timeout = target.timeout
    name = target.name
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError(
            f"The upstream {name!r} did not accept a connection within {timeout.sock_connect} s.",
            status=504,
            code="upstream_connect_timeout",
        )
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return UpstreamError(
            f"The upstream {name!r} sent nothing for {timeout.sock_read} s (read timeout).",
            status=504,
            code="upstream_read_timeout",
        )
    if isinstance(exc, TimeoutError):
        return UpstreamError(
            f"The upstream {name!r} did not finish within {timeout.total} s (total timeout).",
            status=504,
            code="upstream_timeout",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"The upstream {name!r} could not be reached.")
    return UpstreamError(
        f"The upstream {name!r} closed the connection or sent an invalid response.",
        code="upstream_bad_response",
    )
