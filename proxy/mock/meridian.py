"""The Meridian mock: the OpenAI-compatible API of the seed, served by aiohttp.

Every ``/v1`` route needs ``Authorization: Bearer <key>`` and every answer (errors and streams
included) carries the six ``x-ratelimit-*`` headers, counted in ``state.rate``. The mock reports
those limits but never enforces them: 429s come only from scripted faults.
"""

from __future__ import annotations

import hashlib
import time

import orjson
from aiohttp import web

from .audio import transcriptions
from .chat import chat_completions
from .control import add_control_routes
from .embeddings import embeddings_payload
from .errors import MERIDIAN
from .params import choice, integer, required_str
from .pipeline import (
    CONTROL_PREFIX,
    MAX_BODY,
    MOCK_STATE,
    TOKENS,
    json_response,
    mock_middleware,
    read_object,
)
from .state import MockState
from .usage import meridian_usage

__all__ = ["MERIDIAN_MODELS", "meridian_app"]

MERIDIAN_MODELS = ("meridian-1", "meridian-1-turbo", "meridian-embed-3", "meridian-whisper-1")
_CREATED = 1_717_000_000
_SIZES = ("1024x1024", "1792x1024", "1024x1792")
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": _CREATED, "owned_by": "meridian"}
            for model in MERIDIAN_MODELS
        ],
    }
)


async def _models(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_MODELS_BODY, content_type="application/json")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    payload = await read_object(request)
    body, tokens = embeddings_payload(payload, required_str(payload, "model"))
    request[TOKENS] = tokens
    return json_response(body)


async def _images(request: web.Request) -> web.StreamResponse:
    payload = await read_object(request)
    prompt = required_str(payload, "prompt")
    n = integer(payload, "n", 1, 1, 10)
    size = choice(payload, "size", "1024x1024", _SIZES)
    quality = choice(payload, "quality", "standard", ("standard", "hd"))
    stem = hashlib.sha256(f"{prompt}|{size}|{quality}".encode()).hexdigest()[:16]
    return json_response(
        {
            "created": int(time.time()),
            "data": [
                {"url": f"https://cdn.meridian.so/gen/img_{stem}_{i}.png", "revised_prompt": prompt}
                for i in range(n)
            ],
        }
    )


async def _rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(CONTROL_PREFIX):
        return
    rate = request.config_dict[MOCK_STATE].rate
    rate.charge(request.get(TOKENS, 0))
    reset = str(rate.resets_at)
    headers = response.headers
    headers["x-ratelimit-limit-requests"] = str(rate.limit_requests)
    headers["x-ratelimit-remaining-requests"] = str(
        max(0, rate.limit_requests - rate.used_requests)
    )
    headers["x-ratelimit-reset-requests"] = reset
    headers["x-ratelimit-limit-tokens"] = str(rate.limit_tokens)
    headers["x-ratelimit-remaining-tokens"] = str(max(0, rate.limit_tokens - rate.used_tokens))
    headers["x-ratelimit-reset-tokens"] = reset


def meridian_app(state: MockState | None = None) -> web.Application:
    """A Meridian mock application recording into ``state`` (a fresh one when None).

    The state is ``app[MOCK_STATE]``; the control endpoints live under ``/_mock/``.
    """
    app = web.Application(middlewares=[mock_middleware(MERIDIAN)], client_max_size=MAX_BODY)
    app[MOCK_STATE] = MockState() if state is None else state
    add_control_routes(app)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/images/generations", _images)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/usage", meridian_usage)
    app.on_response_prepare.append(_rate_limit_headers)
    return app
