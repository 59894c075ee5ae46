"""The Meivan mock: the marketplace API of the seed, served by aiohttp.

Where the seed is silent the mock assumes: bearer auth as Meridian's; no rate-limit headers (429
faults carry ``Retry-After`` only); ``/v1/complete`` never streams; an unknown ``service_id`` is
404 ``service_not_found`` and a service without the needed capability (``chat`` for complete,
``embeddings`` for embeddings, ``json_mode`` for a JSON ``response_format``) is 400
``capability_not_supported``. ``Idempotency-Key`` is recorded with the request, not replayed.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from .control import add_control_routes
from .embeddings import embeddings_payload
from .errors import MEIVAN, ApiError
from .params import integer, messages, required_str
from .pipeline import MAX_BODY, MOCK_STATE, json_response, mock_middleware, read_object
from .state import MockState
from .text import plan_completion
from .usage import meivan_usage_payload

__all__ = ["default_services", "meivan_app"]


def _service(service_id: str, capabilities: list[str], context: int) -> dict[str, Any]:
    return {
        "service_id": service_id,
        "provider": "acme-ml",
        "capabilities": capabilities,
        "max_context_tokens": context,
        "regions": ["us-east-1", "eu-west-1"],
    }


def default_services() -> list[dict[str, Any]]:
    """The services a Meivan mock lists unless told otherwise (seven, so pagination shows)."""
    return [
        _service("llm.general.v1", ["chat", "json_mode"], 128_000),
        _service("llm.fast.v1", ["chat"], 32_000),
        _service("llm.reasoning.v1", ["chat", "json_mode", "tools"], 200_000),
        _service("embed.text.v1", ["embeddings"], 8_192),
        _service("embed.multilingual.v1", ["embeddings"], 8_192),
        _service("rerank.v1", ["rerank"], 4_096),
        _service("vision.caption.v1", ["chat", "vision"], 64_000),
    ]


class _Catalog:
    """The services of one mock, with the cursors its pagination hands out."""

    def __init__(self, services: Sequence[dict[str, Any]]) -> None:
        for service in services:
            if not isinstance(service.get("service_id"), str):
                raise ValueError(f"a Meivan service needs a string service_id: {service!r}")
            if not isinstance(service.get("capabilities"), list):
                raise ValueError(f"a Meivan service needs a capabilities list: {service!r}")
        self.services = [copy.deepcopy(s) for s in services]
        self.by_id = {s["service_id"]: s for s in self.services}
        self.cursors = {
            base64.urlsafe_b64encode(orjson.dumps({"o": offset})).decode().rstrip("="): offset
            for offset in range(1, len(self.services))
        }
        self.cursor_at = {offset: cursor for cursor, offset in self.cursors.items()}

    def find(self, service_id: str, capability: str) -> dict[str, Any]:
        service = self.by_id.get(service_id)
        if service is None:
            raise ApiError(
                404, f"No service '{service_id}'.", param="service_id", code="service_not_found"
            )
        if capability not in service.get("capabilities", ()):
            raise ApiError(
                400,
                f"Service '{service_id}' does not support {capability}.",
                param="service_id",
                code="capability_not_supported",
            )
        return service


_CATALOG: web.AppKey[_Catalog] = web.AppKey("sidegate.mock.meivan_catalog", _Catalog)


async def _services(request: web.Request) -> web.StreamResponse:
    catalog = request.config_dict[_CATALOG]
    limit = integer(request.query, "limit", 20, 1, 100)
    cursor = request.query.get("cursor")
    offset = 0
    if cursor is not None:
        if cursor not in catalog.cursors:
            raise ApiError(400, "Unknown cursor.", param="cursor")
        offset = catalog.cursors[cursor]
    end = offset + limit
    return json_response(
        {"data": catalog.services[offset:end], "next_cursor": catalog.cursor_at.get(end)}
    )


def _model_name(service: dict[str, Any]) -> str:
    model = service.get("model")
    if isinstance(model, str):
        return model
    return "-".join(str(service["service_id"]).split(".")[1:]) or str(service["service_id"])


async def _complete(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[MOCK_STATE]
    payload = await read_object(request)
    service = request.config_dict[_CATALOG].find(required_str(payload, "service_id"), "chat")
    history = messages(payload)
    limit = integer(payload, "max_tokens", state.stream_chunks, 1, 10_000_000)
    response_format = payload.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") == "json_object"
    if json_mode and "json_mode" not in service["capabilities"]:
        raise ApiError(
            400,
            "This service does not support JSON mode.",
            param="response_format",
            code="capability_not_supported",
        )
    completion = plan_completion(history, state.stream_chunks, limit)
    content = completion.content
    if json_mode:
        content = orjson.dumps({"reply": content}).decode()
    return json_response(
        {
            "id": f"cmp_{state.next_serial():015d}",
            "model": _model_name(service),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": completion.usage(),
        }
    )


async def _embeddings(request: web.Request) -> web.StreamResponse:
    payload = await read_object(request)
    service_id = required_str(payload, "service_id")
    request.config_dict[_CATALOG].find(service_id, "embeddings")
    body, _ = embeddings_payload(payload, service_id)
    return json_response(body)


async def _usage(request: web.Request) -> web.StreamResponse:
    catalog = request.config_dict[_CATALOG]
    return json_response(meivan_usage_payload(request, catalog.by_id))


def meivan_app(
    state: MockState | None = None, services: Sequence[dict[str, Any]] | None = None
) -> web.Application:
    """A Meivan mock application recording into ``state`` (a fresh one when None).

    ``services`` replaces :func:`default_services` (each needs a ``service_id`` and
    ``capabilities``). The state is ``app[MOCK_STATE]``; control endpoints live under ``/_mock/``.
    """
    app = web.Application(middlewares=[mock_middleware(MEIVAN)], client_max_size=MAX_BODY)
    app[MOCK_STATE] = MockState() if state is None else state
    app[_CATALOG] = _Catalog(default_services() if services is None else services)
    add_control_routes(app)
    app.router.add_get("/v1/services", _services)
    app.router.add_post("/v1/complete", _complete)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/usage", _usage)
    return app
