"""Access log, metrics and health endpoints."""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from structlog.testing import capture_logs

from sidegate.config.models import SidegateConfig
from sidegate.middlewares import access_log
from sidegate.middlewares.errors import BadRequest
from sidegate.proxy import create_app, setup
from sidegate.proxy.logs import configure_logging, flush_logs
from sidegate.proxy.mock import Fault
from sidegate.proxy.observability import LATENCY_BUCKETS, Metrics
from tests.conftest import (
    ADMIN,
    ADMIN_KEY,
    MERIDIAN_SECRET,
    AiohttpClient,
    Upstream,
    is_random_hex,
)

Client = TestClient[web.Request, web.Application]
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}


async def test_one_access_log_line_per_request_with_the_call(
    gateway: Client, meridian: Upstream
) -> None:
    with capture_logs() as logs:
        response = await gateway.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"x-request-id": "rid-1", "Authorization": f"Bearer {ADMIN_KEY}"},
        )
        await response.read()
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "rid-1"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert (line["upstream"], line["model"], line["upstream_model"]) == (
        "meridian",
        "fast",
        "meridian-1-turbo",
    )
    assert line["attempts"] == 1
    assert line["upstream_status"] == 200
    assert line["upstream_key"] == "primary"
    assert line["bytes_out"] == len(await response.read())
    assert line["latency_ms"] >= line["upstream_latency_ms"] > 0
    flat = repr(logs)
    assert MERIDIAN_SECRET not in flat
    assert ADMIN_KEY not in flat


class _Order:
    """What happened to each answer, in order: ``sent STATUS`` when aiohttp prepares it (its
    ``on_response_prepare`` signal), ``line STATUS`` when the access line is processed."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def sent(self, request: web.Request, response: web.StreamResponse) -> None:
        self.seen.append(f"sent {response.status}")

    def line(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "request":
            self.seen.append(f"line {event['status']}")
        return event


async def test_the_answer_leaves_before_its_access_line_is_written(
    aiohttp_client: AiohttpClient, gateway_config: dict[str, Any]
) -> None:
    order = _Order()
    app = create_app(SidegateConfig.model_validate(gateway_config))
    app.on_response_prepare.append(order.sent)
    client = await aiohttp_client(app, headers=ADMIN)
    with capture_logs(processors=[order.line]):
        answered = await client.post("/v1/chat/completions", json=CHAT)
        assert answered.status == 200
        await answered.read()
        refused = await client.get("/v1/nowhere")
        assert refused.status == 404
        await refused.read()
    assert order.seen == ["sent 200", "line 200", "sent 404", "line 404"]


@pytest.mark.parametrize("outer_middleware", [False, True])
async def test_mounted_the_answer_leaves_first_only_where_no_middleware_could_change_it(
    aiohttp_client: AiohttpClient, gateway_config: dict[str, Any], outer_middleware: bool
) -> None:
    @web.middleware
    async def signed(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["x-signed-by"] = "the host app"
        return response

    order = _Order()
    host = web.Application(middlewares=[signed] if outer_middleware else [])
    host.on_response_prepare.append(order.sent)
    setup(host, SidegateConfig.model_validate(gateway_config))
    client = await aiohttp_client(host, headers=ADMIN)
    with capture_logs(processors=[order.line]):
        answered = await client.post("/llm/v1/chat/completions", json=CHAT)
        assert answered.status == 200
        await answered.read()
    assert answered.headers["x-request-id"]  # stamped before it was sent, either way
    if outer_middleware:  # the host's middleware still has the last word on the answer
        assert answered.headers["x-signed-by"] == "the host app"
        assert order.seen == ["line 200", "sent 200"]
    else:
        assert "x-signed-by" not in answered.headers
        assert order.seen == ["sent 200", "line 200"]


async def test_a_client_gone_as_its_answer_leaves_is_logged_and_the_gateway_serves_on(
    aiohttp_client: AiohttpClient,
    gateway_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def hang_up(request: web.Request, response: web.StreamResponse) -> None:
        if request.headers.get("x-hang-up") and request.transport is not None:
            request.transport.close()  # the client is gone by the time the answer is written

    app = create_app(SidegateConfig.model_validate(gateway_config))
    app.on_response_prepare.append(hang_up)
    client = await aiohttp_client(app, headers=ADMIN)
    caplog.set_level(logging.ERROR, logger="aiohttp")
    with capture_logs() as logs:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.post("/v1/chat/completions", json=CHAT, headers={"x-hang-up": "1"})
        answered = await client.post("/v1/chat/completions", json=CHAT)
        assert answered.status == 200
        assert (await answered.json())["object"] == "chat.completion"
    lines = [entry["status"] for entry in logs if entry["event"] == "request"]
    assert lines == [200, 200]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp")] == []


async def test_errors_are_logged_with_their_status(gateway: Client) -> None:
    with capture_logs() as logs:
        await gateway.get("/v1/nowhere")
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["status"] == 404
    assert "upstream" not in line


async def test_metrics_count_requests_upstream_statuses_and_latency(
    gateway: Client, meridian: Upstream
) -> None:
    await gateway.post("/v1/chat/completions", json=CHAT)
    meridian.state.script(Fault(status=503), path="/v1/chat/completions")
    await gateway.post("/v1/chat/completions", json=CHAT)
    text = await (await gateway.get("/metrics")).text()
    assert 'sidegate_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'sidegate_requests_total{endpoint="/v1/chat/completions",status="503"} 1.0' in text
    assert 'sidegate_upstream_responses_total{status="503",upstream="meridian"} 1.0' in text
    assert 'sidegate_request_duration_seconds_count{endpoint="/v1/chat/completions"} 2.0' in text
    assert "sidegate_streams_in_flight 0.0" in text


async def test_refusals_are_answered_logged_and_counted_without_any_app_middleware(
    gateway: Client,
) -> None:
    """The router's 404 and 405 are routes of sidegate's own (the app has no middleware for
    them to pass through): envelope, Allow, request id, one access line, counted as
    ``unmatched`` and never under the endpoint a 405 was aimed at."""
    assert not gateway.app.middlewares
    with capture_logs() as logs:
        missing = await gateway.get("/v1/nowhere", headers={"x-request-id": "rid-404"})
        wrong = await gateway.get("/v1/chat/completions")
        head = await gateway.put("/healthz")
        deep = await gateway.post("/v1/chat/completions/extra", json=CHAT)
    assert [r.status for r in (missing, wrong, head, deep)] == [404, 405, 405, 404]
    assert [(await r.json())["error"]["code"] for r in (missing, wrong, head, deep)] == [
        "not_found",
        "method_not_allowed",
        "method_not_allowed",
        "not_found",
    ]
    assert (wrong.headers["Allow"], head.headers["Allow"]) == ("POST", "GET,HEAD")
    assert missing.headers["x-request-id"] == "rid-404"
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/v1/nowhere", 404),
        ("/v1/chat/completions", 405),
        ("/healthz", 405),
        ("/v1/chat/completions/extra", 404),
    ]
    text = await (await gateway.get("/metrics")).text()
    assert 'sidegate_requests_total{endpoint="unmatched",status="404"} 2.0' in text
    assert 'sidegate_requests_total{endpoint="unmatched",status="405"} 2.0' in text
    assert 'endpoint="/v1/chat/completions"' not in text
    assert 'endpoint="/healthz"' not in text


async def test_health_and_readiness(gateway: Client) -> None:
    health = await gateway.get("/healthz")
    assert (health.status, await health.json()) == (200, {"status": "ok"})
    ready = await gateway.get("/readyz")
    body = await ready.json()
    assert ready.status == 200
    assert body["status"] == "ready"
    assert body["upstream_session_open"] is True
    assert body["upstreams"] == ["meivan", "meridian"]


async def test_the_access_line_carries_usage_and_cost_when_the_model_is_priced(
    make_gateway: Any, meridian: Upstream
) -> None:
    gateway = await make_gateway(pricing={"meridian-1-turbo": {"input": 1, "output": 2}})
    with capture_logs() as logs:
        response = await gateway.post("/v1/chat/completions", json=CHAT)
        body = await response.json()
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    usage = body["usage"]
    assert line["usage"] == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "images": 0,
    }
    # $1 and $2 per 1M tokens are 1,000 and 2,000 nano-USD per token: no rounding involved.
    expected = usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000
    assert line["cost_nano_usd"] == expected


async def test_below_info_no_access_line_is_built_and_metrics_still_count(
    gateway: Client, log_output: io.StringIO
) -> None:
    configure_logging("warning", "json", stream=log_output, cache=False)
    assert (await gateway.post("/v1/chat/completions", json=CHAT)).status == 200
    assert log_output.getvalue() == ""
    text = await (await gateway.get("/metrics")).text()
    assert 'sidegate_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text

    configure_logging("info", "json", stream=log_output, cache=False)
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    lines = [orjson.loads(line) for line in log_output.getvalue().splitlines()]
    (line,) = [line for line in lines if line["event"] == "request"]
    assert (line["status"], line["request_id"]) == (200, response.headers["x-request-id"])


async def test_the_access_line_is_the_one_structlogs_own_info_call_writes(
    gateway: Client, log_output: io.StringIO
) -> None:
    # With structlog's filtering loggers the access log skips their keyword re-packing and
    # calls their processing helper itself: the line must be what ``info(...)`` would write.
    configure_logging("info", "json", stream=log_output, cache=False)
    # The logger the middleware gets is one of those it writes for itself, so this compares the
    # fast path with ``info``, not ``info`` with itself.
    assert type(structlog.get_logger("sidegate.access").bind()) in access_log._FILTERING
    assert (await gateway.post("/v1/chat/completions", json=CHAT)).status == 200
    (written,) = [line for line in log_output.getvalue().splitlines() if '"request"' in line]
    fields = orjson.loads(written)
    stamp = fields.pop("timestamp")
    assert (fields.pop("event"), fields.pop("level")) == ("request", "info")
    assert {"upstream", "usage", "bytes_out"} <= fields.keys()
    log_output.seek(0)
    log_output.truncate()
    structlog.get_logger("sidegate.access").info("request", **fields)
    flush_logs()  # else written at the end of the loop's turn
    again = orjson.loads(log_output.getvalue())
    assert list(again) == list(orjson.loads(written))
    assert {**again, "timestamp": stamp} == orjson.loads(written)


async def test_lines_logged_during_a_request_carry_its_id(
    aiohttp_client: Any, log_output: io.StringIO
) -> None:
    configure_logging("info", "json", stream=log_output, cache=False)
    inside = structlog.get_logger("test.inside")

    async def handler(request: web.Request) -> web.Response:
        inside.info("inside")
        return web.Response(text="ok")

    app = web.Application(middlewares=[access_log.access_log_middleware()])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    for request_id in ("rid-7", "rid-8"):
        assert (await client.get("/", headers={"x-request-id": request_id})).status == 200
    lines = [orjson.loads(line) for line in log_output.getvalue().splitlines()]
    ours = ("inside", "request")  # not aiohttp's own access line
    ids = [(line["event"], line.get("request_id")) for line in lines if line["event"] in ours]
    assert ids == [
        ("inside", "rid-7"),
        ("request", "rid-7"),
        ("inside", "rid-8"),
        ("request", "rid-8"),
    ]


async def test_stamp_request_id_marks_streamed_and_plain_answers_in_an_app_of_ones_own(
    aiohttp_client: Any,
) -> None:
    """The access log used alone, with ``stamp_request_id`` as the app's prepare hook: a streamed
    answer, prepared by its handler, carries the request id as a plain one does, the client's own
    id when it sent one."""

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        return response

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[access_log.access_log_middleware()])
    app.on_response_prepare.append(access_log.stamp_request_id)
    app.router.add_get("/stream", streamed)
    app.router.add_get("/plain", plain)
    client = await aiohttp_client(app)
    for path in ("/stream", "/plain"):
        kept = await client.get(path, headers={"x-request-id": "rid-" + path[1:]})
        assert kept.headers["x-request-id"] == "rid-" + path[1:]
        await kept.read()
        made = await client.get(path)
        assert is_random_hex(made.headers["x-request-id"], 12)
        await made.read()


@pytest.mark.parametrize("envelope", [False, True])
async def test_the_access_log_answers_errors_with_the_envelope_only_when_asked(
    aiohttp_client: Any, envelope: bool
) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise BadRequest("Not like that.")

    app = web.Application(middlewares=[access_log.access_log_middleware(envelope_errors=envelope)])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        response = await client.get("/")
        body = await response.read()
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    if envelope:  # as error_middleware inside it would answer, and logged with that status
        assert (response.status, line["status"]) == (400, 400)
        assert orjson.loads(body)["error"]["message"] == "Not like that."
    else:  # the error goes on up: aiohttp's own 500
        assert (response.status, line["status"]) == (500, 500)
        assert b"Not like that." not in body


def test_the_metrics_read_as_prometheus_client_would_write_them() -> None:
    """The per-request metrics are plain numbers until scraped; the exposition is the one
    prometheus_client's Counter and Histogram give for the same observations."""
    observed = [
        ("/v1/chat/completions", 200, 0.003),
        ("/v1/chat/completions", 200, 0.025),  # on a bucket bound
        ("/v1/models", 404, 0.0001),
        ("/v1/chat/completions", 503, 61.0),  # past the last bound
        ("/v1/chat/completions", 200, 0.0),
    ]
    upstream = [("meridian", 200), ("meivan", 503), ("meridian", 200)]
    metrics = Metrics()
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "sidegate_requests",
        "Requests answered by sidegate, by endpoint and status.",
        ["endpoint", "status"],
        registry=registry,
    )
    latency = Histogram(
        "sidegate_request_duration_seconds",
        "Time from request to the end of the response, by endpoint.",
        ["endpoint"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    responses = Counter(
        "sidegate_upstream_responses",
        "Responses received from upstreams, by upstream and status.",
        ["upstream", "status"],
        registry=registry,
    )
    for endpoint, status, seconds in observed:
        metrics.record(endpoint, status, seconds)
        requests.labels(endpoint, str(status)).inc()
        latency.labels(endpoint).observe(seconds)
    for name, status in upstream:
        metrics.upstream_response(name, status)
        responses.labels(name, str(status)).inc()

    def timeless(text: str) -> str:
        return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 <time>", text)

    ours = timeless(metrics.render().decode())
    theirs = timeless(generate_latest(registry).decode())
    assert ours.startswith(theirs)
    assert "sidegate_streams_in_flight" in ours[len(theirs) :]


def test_repeated_requests_add_up_per_label_pair() -> None:
    metrics = Metrics()
    for status in (200, 200, 503):
        metrics.record("/v1/chat/completions", status, 0.002)
        metrics.upstream_response("meridian", status)
    text = metrics.render().decode()
    assert 'sidegate_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in text
    assert 'sidegate_requests_total{endpoint="/v1/chat/completions",status="503"} 1.0' in text
    assert 'sidegate_request_duration_seconds_count{endpoint="/v1/chat/completions"} 3.0' in text
    assert 'sidegate_upstream_responses_total{status="200",upstream="meridian"} 2.0' in text
    assert 'sidegate_upstream_responses_total{status="503",upstream="meridian"} 1.0' in text
