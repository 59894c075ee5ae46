"""Meridian's ``POST /v1/chat/completions``: one JSON completion, or SSE when ``stream: true``.

The stream is a role delta, one delta per reply word, a ``finish_reason`` chunk, the usage chunk
(only with ``stream_options.include_usage``) and ``data: [DONE]``; its deltas concatenate to the
content the JSON form returns for the same request.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from .params import integer, messages, required_str
from .pipeline import MOCK_STATE, TOKENS, json_response, read_object, send_events
from .text import Completion, plan_completion

__all__ = ["chat_completions"]

_DONE = b"data: [DONE]\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer a chat completion request as the seed documents it."""
    state = request.config_dict[MOCK_STATE]
    payload = await read_object(request)
    model = required_str(payload, "model")
    history = messages(payload)
    cap = payload.get("max_completion_tokens", payload.get("max_tokens"))
    limit = integer({"max_tokens": cap}, "max_tokens", state.stream_chunks, 1, 10_000_000)
    completion = plan_completion(history, state.stream_chunks, limit)
    request[TOKENS] = completion.prompt_tokens + completion.completion_tokens
    head = {
        "id": f"chatcmpl-mock{state.next_serial():012d}",
        "created": int(time.time()),
        "model": model,
    }
    if payload.get("stream") is True:
        options = payload.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await send_events(request, _events(head, completion, with_usage=with_usage))
    return json_response(
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.content},
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": completion.usage(),
        }
    )


def _events(head: dict[str, Any], completion: Completion, *, with_usage: bool) -> list[bytes]:
    base = {**head, "object": "chat.completion.chunk"}
    if with_usage:
        base["usage"] = None

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events.extend(chunk({"content": piece}) for piece in completion.pieces)
    events.append(chunk({}, completion.finish_reason))
    if with_usage:
        final = {**base, "choices": [], "usage": completion.usage()}
        events.append(b"data: " + orjson.dumps(final) + b"\n\n")
    events.append(_DONE)
    return events
