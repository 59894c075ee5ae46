"""Rate-limit parsing, and the server-side header rewriting on JSON and SSE responses."""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from sidegate.middlewares.errors import error_middleware
from sidegate.middlewares.keys import KeysCoolingDown
from sidegate.middlewares.ratelimit_headers import (
    ModeSetting,
    apply_ratelimit_headers,
    ratelimit_headers_middleware,
    setup_ratelimit_headers,
)
from sidegate.middlewares.ratelimits import (
    RateLimits,
    body_retry_after,
    parse_duration,
    parse_ratelimits,
    parse_reset,
    parse_retry_after,
    parse_retry_after_ms,
    retry_hint,
)
from tests.conftest import AiohttpClient
from tests.middlewares.test_outbound_support import START, FakeClock, pool

NOW = START
Client = TestClient[web.Request, web.Application]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1.5s", 1.5),
        ("2h3m", 7380.0),
        ("1h0m0.5s", 3600.5),
        ("250us", 0.00025),
        ("0s", 0.0),
        ("", None),
        ("6", None),
        ("6 m", None),
        ("m6", None),
        ("-1s", None),
    ],
)
def test_parse_duration(value: str, seconds: float | None) -> None:
    assert parse_duration(value) == (None if seconds is None else pytest.approx(seconds))


def test_parse_reset_epoch_and_durations() -> None:
    assert parse_reset("1700000060", NOW) == 1_700_000_060
    assert parse_reset("30", NOW) == NOW + 30
    assert parse_reset("6m0s", NOW) == NOW + 360
    assert parse_reset("1.5", NOW) == NOW + 1.5
    assert parse_reset("tomorrow", NOW) is None


def test_parse_retry_after() -> None:
    assert parse_retry_after("2", NOW) == 2.0
    assert parse_retry_after(" 1.5 ", NOW) == 1.5
    assert parse_retry_after(formatdate(NOW + 90, usegmt=True), NOW) == pytest.approx(90, abs=1)
    assert parse_retry_after(formatdate(NOW - 90, usegmt=True), NOW) == 0.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-3", NOW) is None
    assert parse_retry_after_ms("1500") == 1.5
    assert parse_retry_after_ms("a lot") is None


def test_body_retry_after() -> None:
    assert body_retry_after(b'{"error": {}, "retry-after": 3}') == 3.0
    assert body_retry_after(b'{"retry-after": "2.5"}') == 2.5
    assert body_retry_after(b'{"retry-after": true}') is None
    assert body_retry_after(b'{"error": {}}') is None
    assert body_retry_after(b"[1]") is None
    assert body_retry_after(b"not json") is None


def test_retry_hint_precedence() -> None:
    reset = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "7s"}
    body = b'{"retry-after": 5}'
    assert retry_hint({"retry-after-ms": "100", "Retry-After": "9", **reset}, body, NOW) == 0.1
    assert retry_hint({"Retry-After": "9", **reset}, body, NOW) == 9
    assert retry_hint({"Retry-After": "bad", **reset}, body, NOW) == 5
    assert retry_hint(reset, None, NOW) == 7
    assert (
        retry_hint(
            {"x-ratelimit-remaining-tokens": "5", "x-ratelimit-reset-tokens": "7s"}, None, NOW
        )
        is None
    )
    assert retry_hint({}, None, NOW) is None


def test_parse_ratelimits_and_headers() -> None:
    limits = parse_ratelimits(
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "lots",
            "x-ratelimit-reset-tokens": "1700000100",
        },
        NOW,
    )
    assert limits == RateLimits(100, 99, NOW + 1, None, None, 1_700_000_100)
    assert dict(limits.headers()) == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": str(int(NOW) + 1),
        "x-ratelimit-reset-tokens": "1700000100",
    }
    assert parse_ratelimits({"content-type": "x"}, NOW) is None


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("42", 42),
        (" 42 ", 42),  # not the digits-only fast path: stripped as before
        ("42.9", 42),
        ("\uff14\uff12", 42),  # fullwidth digits are digits to float() and to the pattern
        ("\u00b2", None),  # a superscript isdigit() but is not a number
        ("1" * 20, int(float("1" * 20))),  # as a float: what the general path always gave
        ("9" * 400, None),  # not finite
        ("", None),
        ("-1", None),
    ],
)
def test_counts_parse_the_same_on_the_fast_and_the_general_path(
    value: str, count: int | None
) -> None:
    limits = parse_ratelimits({"x-ratelimit-limit-requests": value}, NOW)
    assert (limits.limit_requests if limits is not None else None) == count


def test_merged_keeps_what_the_newer_reading_does_not_know() -> None:
    old = RateLimits(1, 2, 3.0, 4, 5, 6.0)
    assert old.merged(RateLimits()) == old
    assert old.merged(RateLimits(remaining_requests=0, reset_tokens=9.0)) == RateLimits(
        1, 0, 3.0, 4, 5, 9.0
    )
    newer = RateLimits(10, 20, 30.0, 40, 50, 60.0)
    assert old.merged(newer) == newer


UPSTREAM_HEADERS = {
    "x-ratelimit-limit-requests": "100",
    "x-ratelimit-remaining-requests": "42",
    "x-ratelimit-reset-requests": "6m0s",
    "x-ratelimit-limit-tokens": "5000",
    "x-ratelimit-remaining-tokens": "4000",
    "x-ratelimit-reset-tokens": "1700000030.4",
    "x-ratelimit-limit-images": "5",
}


async def json_handler(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True}, headers=UPSTREAM_HEADERS)


async def sse_handler(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={**UPSTREAM_HEADERS, "Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: 1\n\n")
    await response.write_eof()
    return response


AppFactory = Callable[..., web.Application]


def make_app(mode: ModeSetting, **options: object) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    setup_ratelimit_headers(app, mode, **options)  # type: ignore[arg-type]
    app.router.add_get("/json", json_handler)
    app.router.add_get("/sse", sse_handler)
    return app


def ratelimit_headers(headers: object) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/json", "/sse"])
async def test_passthrough_normalises(aiohttp_client: AiohttpClient, path: str) -> None:
    client = await aiohttp_client(make_app("passthrough", clock=lambda: NOW))
    response = await client.get(path)
    await response.read()

    assert ratelimit_headers(response.headers) == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "42",
        "x-ratelimit-reset-requests": str(int(NOW) + 360),
        "x-ratelimit-limit-tokens": "5000",
        "x-ratelimit-remaining-tokens": "4000",
        "x-ratelimit-reset-tokens": "1700000031",
        "x-ratelimit-limit-images": "5",
    }


@pytest.mark.parametrize("path", ["/json", "/sse"])
async def test_strip(aiohttp_client: AiohttpClient, path: str) -> None:
    client = await aiohttp_client(make_app("strip"))
    response = await client.get(path)
    await response.read()

    assert ratelimit_headers(response.headers) == {}
    assert response.status == 200


@pytest.mark.parametrize("path", ["/json", "/sse"])
async def test_team_uses_the_teams_own_limits(aiohttp_client: AiohttpClient, path: str) -> None:
    own = RateLimits(limit_requests=600, remaining_requests=599, reset_requests=NOW + 60)
    client = await aiohttp_client(make_app("team", team_limits=lambda request: own))
    response = await client.get(path)
    await response.read()

    assert ratelimit_headers(response.headers) == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "599",
        "x-ratelimit-reset-requests": str(int(NOW) + 60),
    }


@pytest.mark.parametrize("path", ["/json", "/sse"])
async def test_team_falls_back_to_the_healthy_keys(
    aiohttp_client: AiohttpClient, path: str
) -> None:
    clock = FakeClock()
    keys = pool("a", "b", "c", clock=clock)
    a, b, c = keys.keys
    keys.observe(
        a,
        200,
        {
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "10",
            "x-ratelimit-reset-tokens": "20s",
        },
    )
    keys.observe(
        b,
        200,
        {
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "500",
            "x-ratelimit-reset-tokens": "5s",
        },
    )
    keys.observe(c, 401, {"x-ratelimit-limit-tokens": "1000"})
    app = make_app("team", team_limits=lambda request: None, pools=lambda request: keys)
    client = await aiohttp_client(app)
    response = await client.get(path)
    await response.read()

    assert ratelimit_headers(response.headers) == {
        "x-ratelimit-limit-tokens": "2000",
        "x-ratelimit-remaining-tokens": "510",
        "x-ratelimit-reset-tokens": str(int(START) + 5),
    }


async def test_the_mode_may_be_chosen_per_request(aiohttp_client: AiohttpClient) -> None:
    app = make_app(lambda request: "strip" if "strip" in request.query else "passthrough")
    client = await aiohttp_client(app)
    stripped = await client.get("/sse?strip=1")
    kept = await client.get("/json")

    assert ratelimit_headers(stripped.headers) == {}
    assert ratelimit_headers(kept.headers)["x-ratelimit-remaining-requests"] == "42"


async def test_team_without_any_source_shows_nothing(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(make_app("team"))
    response = await client.get("/sse")
    await response.read()

    assert ratelimit_headers(response.headers) == {}


async def test_the_middleware_alone_rewrites_unprepared_responses(
    aiohttp_client: AiohttpClient,
) -> None:
    app = web.Application(middlewares=[ratelimit_headers_middleware("strip")])
    app.router.add_get("/json", json_handler)
    client = await aiohttp_client(app)
    response = await client.get("/json")

    assert ratelimit_headers(response.headers) == {}
    with pytest.raises(ValueError, match="mode"):
        ratelimit_headers_middleware("hide")  # type: ignore[arg-type]


def limited(body: bytes, headers: dict[str, str]) -> Callable[[web.Request], object]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, body=body, headers=headers, content_type="application/json")

    return handler


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b'{"retry-after": 2.5}', {}, "3"),
        (b'{"retry-after": 2}', {"Retry-After": "10"}, "2"),
        (b"{}", {"Retry-After": "10"}, "10"),
        (b"{}", {"Retry-After": "later"}, "1"),
        (b"{}", {"retry-after-ms": "2500"}, "3"),
        (b"{}", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "4s"}, "4"),
        (b"{}", {}, "1"),
    ],
)
async def test_every_429_has_a_consistent_retry_after(
    aiohttp_client: AiohttpClient, body: bytes, headers: dict[str, str], expected: str
) -> None:
    app = make_app("strip")
    app.router.add_get("/limited", limited(body, headers))  # type: ignore[arg-type]
    client = await aiohttp_client(app)
    response = await client.get("/limited")

    assert response.status == 429
    assert response.headers["Retry-After"] == expected
    assert await response.read() == body


async def test_a_429_raised_below_keeps_its_retry_after(aiohttp_client: AiohttpClient) -> None:
    async def cooling(request: web.Request) -> web.StreamResponse:
        raise KeysCoolingDown("meridian", 7.2)

    app = make_app("passthrough")
    app.router.add_get("/cooling", cooling)
    client = await aiohttp_client(app)
    response = await client.get("/cooling")

    assert response.status == 429
    assert response.headers["Retry-After"] == "8"
    error = orjson.loads(await response.read())["error"]
    assert error["code"] == "upstream_rate_limited"


def test_apply_is_idempotent() -> None:
    response = web.Response(status=429, body=b'{"retry-after": 1}')
    request = make_mocked_request("GET", "/")
    apply_ratelimit_headers(request, response)
    apply_ratelimit_headers(request, response)
    assert response.headers.getall("Retry-After") == ["1"]


def test_passthrough_leaves_canonical_headers_alone_and_fixes_the_rest() -> None:
    from multidict import CIMultiDict

    from sidegate.middlewares.ratelimit_headers import _canonical

    canonical = CIMultiDict(
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-reset-requests": "1795380000",
        }
    )
    assert _canonical(canonical)
    for name, value in [
        ("x-ratelimit-reset-requests", "6m0s"),
        ("x-ratelimit-reset-tokens", "30"),
        ("x-ratelimit-remaining-tokens", "1.5"),
        ("x-ratelimit-limit-tokens", "²"),
    ]:
        assert not _canonical(CIMultiDict({**canonical, name: value})), (name, value)
    twice = CIMultiDict(canonical)
    twice.add("x-ratelimit-limit-requests", "7")
    assert not _canonical(twice)


def test_header_items_are_the_headers_in_order() -> None:
    limits = RateLimits(10, 9, 100.2, None, 5, None)
    assert limits.header_items() == [
        ("x-ratelimit-limit-requests", "10"),
        ("x-ratelimit-remaining-requests", "9"),
        ("x-ratelimit-reset-requests", "101"),
        ("x-ratelimit-remaining-tokens", "5"),
    ]
    assert list(limits.headers().items()) == limits.header_items()
    assert RateLimits().header_items() == []
    every = RateLimits(10, 9, 100.2, 1000, 990, 160.0)  # all six: the path without a loop
    assert every.header_items() == [
        ("x-ratelimit-limit-requests", "10"),
        ("x-ratelimit-remaining-requests", "9"),
        ("x-ratelimit-reset-requests", "101"),
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "990"),
        ("x-ratelimit-reset-tokens", "160"),
    ]


@pytest.mark.parametrize("extra", [[], [("X-RateLimit-Limit-Images", "5")]])
async def test_team_replaces_every_ratelimit_header_and_nothing_else(
    aiohttp_client: AiohttpClient, extra: list[tuple[str, str]]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        upstream = [
            ("X-RateLimit-Remaining-Requests", "41"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            *extra,
            ("X-Upstream-x-ratelimit-note", "kept"),
        ]
        return web.Response(headers=upstream)

    own = RateLimits(limit_requests=600, remaining_requests=599)
    app = make_app("team", team_limits=lambda request: own)
    app.router.add_get("/mixed", handler)
    client = await aiohttp_client(app)
    response = await client.get("/mixed")

    assert ratelimit_headers(response.headers) == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "599",
    }
    assert response.headers["X-Upstream-x-ratelimit-note"] == "kept"
