"""The built-in mock upstreams: shapes per the seeds, determinism, faults, control, counters."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import sidegate.proxy.mock as mock
from sidegate.proxy.mock import (
    MOCK_STATE,
    Fault,
    MockState,
    default_services,
    fault_from_json,
    meivan_app,
    meridian_app,
    start_mock,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

AUTH = {"Authorization": "Bearer sk-test"}
CHAT = "/v1/chat/completions"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain quantum computing in one sentence."},
]
RATE_HEADERS = [
    f"x-ratelimit-{a}-{b}" for a in ("limit", "remaining", "reset") for b in ("requests", "tokens")
]


@pytest.fixture
def state() -> MockState:
    return MockState()


@pytest.fixture
async def meridian(aiohttp_client: MakeClient, state: MockState) -> Client:
    return await aiohttp_client(meridian_app(state))


@pytest.fixture
async def meivan(aiohttp_client: MakeClient, state: MockState) -> Client:
    return await aiohttp_client(meivan_app(state))


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    frames = raw[:-2].split(b"\n\n")
    assert all(frame.startswith(b"data: ") for frame in frames)
    return [frame[6:] for frame in frames]


def decode_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def drain(response: aiohttp.ClientResponse, into: list[bytes]) -> None:
    async for chunk in response.content.iter_any():
        into.append(chunk)


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status
    body = await response.json()
    assert set(body["error"]) == {"type", "message", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# --- public surface -------------------------------------------------------------------------


def test_all_lists_every_public_name_and_nothing_missing() -> None:
    exported = set(mock.__all__)
    assert {
        "Fault",
        "Received",
        "MockState",
        "MOCK_STATE",
        "meridian_app",
        "meivan_app",
    } <= exported
    assert "start_mock" in exported
    assert all(hasattr(mock, name) for name in exported)
    public = {n for n in vars(mock) if not n.startswith("_") and n not in {"annotations"}}
    modules = {n for n in public if type(getattr(mock, n)).__name__ == "module"}
    assert public - modules == exported


def test_app_key_holds_the_given_state(state: MockState) -> None:
    assert meridian_app(state)[MOCK_STATE] is state
    assert meivan_app(state)[MOCK_STATE] is state
    assert isinstance(meridian_app()[MOCK_STATE], MockState)


# --- Meridian: chat -------------------------------------------------------------------------


async def test_chat_completion_has_the_seed_shape(meridian: Client, state: MockState) -> None:
    response = await meridian.post(
        CHAT, json={"model": "meridian-1", "messages": MESSAGES}, headers=AUTH
    )
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "meridian-1"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    words = choice["message"]["content"].split()
    assert len(words) == state.stream_chunks
    assert set(words) <= set(MESSAGES[-1]["content"].split())
    chars = sum(len(m["content"]) for m in MESSAGES)
    usage = body["usage"]
    assert usage["prompt_tokens"] == chars // 4 + 4 * len(MESSAGES)
    assert usage["completion_tokens"] == state.stream_chunks
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_completion_is_deterministic(meridian: Client) -> None:
    payload = {"model": "meridian-1-turbo", "messages": MESSAGES}
    first = await (await meridian.post(CHAT, json=payload, headers=AUTH)).json()
    second = await (await meridian.post(CHAT, json=payload, headers=AUTH)).json()
    assert first["choices"] == second["choices"]
    assert first["usage"] == second["usage"]
    assert first["id"] != second["id"]
    assert first["model"] == "meridian-1-turbo"


async def test_max_tokens_cuts_the_reply_with_finish_reason_length(meridian: Client) -> None:
    payload = {"model": "meridian-1", "messages": MESSAGES, "max_tokens": 3}
    body = await (await meridian.post(CHAT, json=payload, headers=AUTH)).json()
    assert len(body["choices"][0]["message"]["content"].split()) == 3
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": "meridian-1"}, "messages"),
        ({"model": "meridian-1", "messages": []}, "messages"),
        ({"model": "meridian-1", "messages": ["hi"]}, "messages"),
        ({"model": "meridian-1", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ],
)
async def test_chat_validation_names_the_param(
    meridian: Client, payload: dict[str, Any], param: str
) -> None:
    error = await error_of(await meridian.post(CHAT, json=payload, headers=AUTH), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_chat_rejects_bad_json(meridian: Client) -> None:
    response = await meridian.post(CHAT, data=b"{not json", headers=AUTH)
    error = await error_of(response, 400)
    assert "JSON" in error["message"]


async def test_stream_matches_the_json_completion(meridian: Client, state: MockState) -> None:
    payload: dict[str, Any] = {"model": "meridian-1", "messages": MESSAGES}
    whole = await (await meridian.post(CHAT, json=payload, headers=AUTH)).json()
    streamed = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    response = await meridian.post(CHAT, json=streamed, headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await response.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = chunks[1 : 1 + state.stream_chunks]
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in deltas)
    finish = chunks[1 + state.stream_chunks]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["delta"] == {}
    usage_chunk = chunks[-1]
    assert len(chunks) == state.stream_chunks + 3
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"]["content"] for c in deltas)
    assert content == whole["choices"][0]["message"]["content"]


async def test_stream_without_include_usage_has_no_usage_chunk(
    meridian: Client, state: MockState
) -> None:
    payload = {"model": "meridian-1", "messages": MESSAGES, "stream": True}
    events = sse_events(await (await meridian.post(CHAT, json=payload, headers=AUTH)).read())
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == state.stream_chunks + 2
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_chunks_setting_sets_the_number_of_deltas(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(meridian_app(MockState(stream_chunks=3)))
    payload = {"model": "meridian-1", "messages": MESSAGES, "stream": True}
    events = sse_events(await (await client.post(CHAT, json=payload, headers=AUTH)).read())
    assert len(events) == 3 + 3


# --- Meridian: auth and rate-limit headers --------------------------------------------------


async def test_missing_or_malformed_key_is_401(meridian: Client) -> None:
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}):
        error = await error_of(await meridian.get("/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"


async def test_accepted_keys_reject_other_keys(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(meridian_app(MockState(accepted_keys={"sk-good"})))
    bad = await client.get("/v1/models", headers={"Authorization": "Bearer sk-bad"})
    assert (await error_of(bad, 401))["code"] == "invalid_api_key"
    good = await client.get("/v1/models", headers={"Authorization": "Bearer sk-good"})
    assert good.status == 200


async def test_rate_limit_headers_on_success_error_and_stream(meridian: Client) -> None:
    ok = await meridian.get("/v1/models", headers=AUTH)
    unauthorised = await meridian.get("/v1/models")
    stream = await meridian.post(
        CHAT, json={"model": "m", "messages": MESSAGES, "stream": True}, headers=AUTH
    )
    await stream.read()
    for response in (ok, unauthorised, stream):
        assert all(name in response.headers for name in RATE_HEADERS)
    remaining = [
        int(r.headers["x-ratelimit-remaining-requests"]) for r in (ok, unauthorised, stream)
    ]
    assert remaining[0] > remaining[1] > remaining[2]
    limit = int(ok.headers["x-ratelimit-limit-requests"])
    assert remaining[0] == limit - 1
    assert int(stream.headers["x-ratelimit-remaining-tokens"]) < int(
        ok.headers["x-ratelimit-remaining-tokens"]
    )
    assert int(ok.headers["x-ratelimit-reset-requests"]) > 1_700_000_000


async def test_meivan_sends_no_rate_limit_headers(meivan: Client) -> None:
    response = await meivan.get("/v1/services", headers=AUTH)
    assert response.status == 200
    assert not any(name in response.headers for name in RATE_HEADERS)


# --- Meridian: embeddings -------------------------------------------------------------------


async def embed(client: Client, **payload: Any) -> dict[str, Any]:
    payload.setdefault("model", "meridian-embed-3")
    response = await client.post("/v1/embeddings", json=payload, headers=AUTH)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_embeddings_shape_and_default_dimensions(meridian: Client) -> None:
    body = await embed(meridian, input="The quick brown fox jumps over the lazy dog.")
    assert body["object"] == "list"
    assert body["model"] == "meridian-embed-3"
    (item,) = body["data"]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == 1536
    assert all(-1.0 <= v < 1.0 for v in item["embedding"])
    assert body["usage"] == {"prompt_tokens": 11, "total_tokens": 11}


async def test_embeddings_do_not_depend_on_batch_position(meridian: Client) -> None:
    alone = await embed(meridian, input="beta", dimensions=64)
    batch = await embed(meridian, input=["alpha", "beta", "gamma", "beta"], dimensions=64)
    assert [d["index"] for d in batch["data"]] == [0, 1, 2, 3]
    vectors = [d["embedding"] for d in batch["data"]]
    assert vectors[1] == vectors[3] == alone["data"][0]["embedding"]
    assert vectors[0] != vectors[1] != vectors[2]


async def test_base64_embeddings_equal_the_floats_value_for_value(meridian: Client) -> None:
    inputs = ["one", "two"]
    floats = await embed(meridian, input=inputs, dimensions=256)
    packed = await embed(meridian, input=inputs, dimensions=256, encoding_format="base64")
    for f, p in zip(floats["data"], packed["data"], strict=True):
        assert isinstance(p["embedding"], str)
        assert decode_base64(p["embedding"]) == f["embedding"]


async def test_dimensions_shorten_the_vector_as_a_prefix(meridian: Client) -> None:
    short = (await embed(meridian, input="x", dimensions=8))["data"][0]["embedding"]
    long = (await embed(meridian, input="x"))["data"][0]["embedding"]
    assert len(short) == 8
    assert long[:8] == short


async def test_token_id_inputs_count_their_length(meridian: Client) -> None:
    single = await embed(meridian, input=[1, 2, 3], dimensions=4)
    assert len(single["data"]) == 1
    assert single["usage"]["prompt_tokens"] == 3
    nested = await embed(meridian, input=[[1, 2, 3], [4, 5]], dimensions=4)
    assert nested["usage"]["prompt_tokens"] == 5
    assert nested["data"][0]["embedding"] == single["data"][0]["embedding"]
    text = await embed(meridian, input="1", dimensions=4)
    assert (
        text["data"][0]["embedding"]
        != (await embed(meridian, input=[1], dimensions=4))["data"][0]["embedding"]
    )


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "e", "input": []}, "input"),
        ({"model": "e", "input": ["ok", 3]}, "input"),
        ({"model": "e", "input": ""}, "input"),
        ({"model": "e", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "e", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
async def test_embeddings_validation(meridian: Client, payload: dict[str, Any], param: str) -> None:
    response = await meridian.post("/v1/embeddings", json=payload, headers=AUTH)
    assert (await error_of(response, 400))["param"] == param


# --- Meridian: images, audio, models, usage ---------------------------------------------------


async def test_images_return_n_results(meridian: Client) -> None:
    payload = {"prompt": "A serene lake", "n": 2, "size": "1792x1024", "quality": "hd"}
    response = await meridian.post("/v1/images/generations", json=payload, headers=AUTH)
    body = await response.json()
    assert isinstance(body["created"], int)
    assert len(body["data"]) == 2
    assert all(d["revised_prompt"] == "A serene lake" for d in body["data"])
    assert all(d["url"].startswith("https://") for d in body["data"])
    assert body["data"][0]["url"] != body["data"][1]["url"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"n": 1}, "prompt"),
        ({"prompt": "p", "size": "512x512"}, "size"),
        ({"prompt": "p", "quality": "ultra"}, "quality"),
        ({"prompt": "p", "n": 0}, "n"),
    ],
)
async def test_images_validation(meridian: Client, payload: dict[str, Any], param: str) -> None:
    response = await meridian.post("/v1/images/generations", json=payload, headers=AUTH)
    assert (await error_of(response, 400))["param"] == param


def audio_form(audio: bytes | None, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    if audio is not None:
        form.add_field("file", audio, filename="audio.mp3", content_type="audio/mpeg")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def test_transcription_describes_the_uploaded_bytes(
    meridian: Client, state: MockState
) -> None:
    audio = bytes(range(256)) * 125 + b"\r\n--\r\n\r\n"
    form = audio_form(audio, model="meridian-whisper-1")
    response = await meridian.post("/v1/audio/transcriptions", data=form, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"text"}
    assert str(len(audio)) in body["text"]
    assert hashlib.sha256(audio).hexdigest()[:12] in body["text"]
    assert audio in state.received[-1].body
    assert state.received[-1].headers["Content-Type"].startswith("multipart/form-data")


async def test_verbose_transcription_has_duration_and_language(meridian: Client) -> None:
    form = audio_form(
        b"\x00" * 32_000, model="meridian-whisper-1", response_format="verbose_json", language="fr"
    )
    body = await (await meridian.post("/v1/audio/transcriptions", data=form, headers=AUTH)).json()
    assert body["duration"] == 2.0
    assert body["language"] == "fr"
    assert "32000" in body["text"]


@pytest.mark.parametrize(
    ("audio", "fields", "param"),
    [(b"abc", {}, "model"), (None, {"model": "meridian-whisper-1"}, "file")],
)
async def test_transcription_requires_file_and_model(
    meridian: Client, audio: bytes | None, fields: dict[str, str], param: str
) -> None:
    form = audio_form(audio, **fields)
    response = await meridian.post("/v1/audio/transcriptions", data=form, headers=AUTH)
    assert (await error_of(response, 400))["param"] == param


async def test_transcription_rejects_json(meridian: Client) -> None:
    response = await meridian.post("/v1/audio/transcriptions", json={"model": "m"}, headers=AUTH)
    assert "multipart" in (await error_of(response, 400))["message"]


async def test_models_lists_the_four_meridian_models(meridian: Client) -> None:
    body = await (await meridian.get("/v1/models", headers=AUTH)).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [
        "meridian-1",
        "meridian-1-turbo",
        "meridian-embed-3",
        "meridian-whisper-1",
    ]
    assert all(m["owned_by"] == "meridian" and m["object"] == "model" for m in body["data"])


async def test_meridian_usage_buckets_and_aggregate(meridian: Client) -> None:
    query = {"from": "2025-01-01T00:00:00Z", "to": "2025-01-31T23:59:59Z", "granularity": "day"}
    body = await (await meridian.get("/v1/usage", params=query, headers=AUTH)).json()
    assert body["object"] == "list"
    assert len(body["data"]) == 31
    assert body["data"][0]["timestamp"] == "2025-01-01T00:00:00Z"
    assert body["data"][-1]["timestamp"] == "2025-01-31T00:00:00Z"
    for bucket in body["data"]:
        assert bucket["total_tokens"] == bucket["prompt_tokens"] + bucket["completion_tokens"]
        assert isinstance(bucket["cost_usd"], float)
    assert body["aggregate"]["total_tokens"] == sum(b["total_tokens"] for b in body["data"])
    again = await (await meridian.get("/v1/usage", params=query, headers=AUTH)).json()
    assert again == body
    monthly = {**query, "to": "2025-03-02T00:00:00Z", "granularity": "month"}
    months = await (await meridian.get("/v1/usage", params=monthly, headers=AUTH)).json()
    assert [b["timestamp"][:7] for b in months["data"]] == ["2025-01", "2025-02", "2025-03"]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"to": "2025-01-02T00:00:00Z"}, "from"),
        ({"from": "2025-01-01T00:00:00Z"}, "to"),
        ({"from": "yesterday", "to": "2025-01-02T00:00:00Z"}, "from"),
        ({"from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, "to"),
        ({"from": "2025-01-01", "to": "2025-01-02", "granularity": "week"}, "granularity"),
    ],
)
async def test_meridian_usage_validation(
    meridian: Client, query: dict[str, str], param: str
) -> None:
    response = await meridian.get("/v1/usage", params=query, headers=AUTH)
    assert (await error_of(response, 400))["param"] == param


async def test_unknown_route_is_404_in_the_envelope(meridian: Client) -> None:
    error = await error_of(await meridian.get("/v1/nothing", headers=AUTH), 404)
    assert error["code"] == "not_found"
    wrong_method = await meridian.get(CHAT, headers=AUTH)
    assert (await error_of(wrong_method, 405))["code"] == "method_not_allowed"
    assert "POST" in wrong_method.headers["Allow"]


# --- Meivan ----------------------------------------------------------------------------------


async def test_services_pagination_walks_every_service_once(meivan: Client) -> None:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "3"} if cursor is None else {"limit": "3", "cursor": cursor}
        body = await (await meivan.get("/v1/services", params=params, headers=AUTH)).json()
        pages += 1
        assert len(body["data"]) <= 3
        seen.extend(s["service_id"] for s in body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    expected = [s["service_id"] for s in default_services()]
    assert seen == expected
    assert pages == 3
    first = (await (await meivan.get("/v1/services", headers=AUTH)).json())["data"][0]
    assert set(first) == {"service_id", "provider", "capabilities", "max_context_tokens", "regions"}
    assert first["service_id"] == "llm.general.v1"
    assert first["capabilities"] == ["chat", "json_mode"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "nope"}, "cursor"),
    ],
)
async def test_services_validation(meivan: Client, params: dict[str, str], param: str) -> None:
    response = await meivan.get("/v1/services", params=params, headers=AUTH)
    assert (await error_of(response, 400))["param"] == param


async def test_custom_services_replace_the_defaults(aiohttp_client: MakeClient) -> None:
    services = [{"service_id": "only.one.v1", "capabilities": ["chat"]}]
    client = await aiohttp_client(meivan_app(services=services))
    body = await (await client.get("/v1/services", headers=AUTH)).json()
    assert body == {"data": services, "next_cursor": None}


async def test_complete_has_the_seed_shape(meivan: Client, state: MockState) -> None:
    payload = {"service_id": "llm.general.v1", "messages": MESSAGES, "max_tokens": 512}
    headers = {**AUTH, "Idempotency-Key": "idem-1"}
    response = await meivan.post("/v1/complete", json=payload, headers=headers)
    body = await response.json()
    assert set(body) == {"id", "model", "choices", "usage"}
    assert body["id"].startswith("cmp_")
    assert body["model"] == "general-v1"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == state.stream_chunks
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == sum(
        body["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    assert state.received[-1].headers["Idempotency-Key"] == "idem-1"


async def test_complete_ignores_stream_and_honours_json_mode(meivan: Client) -> None:
    payload = {
        "service_id": "llm.general.v1",
        "messages": MESSAGES,
        "stream": True,
        "response_format": {"type": "json_object"},
    }
    response = await meivan.post("/v1/complete", json=payload, headers=AUTH)
    assert response.content_type == "application/json"
    content = (await response.json())["choices"][0]["message"]["content"]
    assert isinstance(orjson.loads(content), dict)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"service_id": "nope.v1", "messages": MESSAGES}, 404, "service_not_found"),
        ({"service_id": "embed.text.v1", "messages": MESSAGES}, 400, "capability_not_supported"),
        (
            {
                "service_id": "llm.fast.v1",
                "messages": MESSAGES,
                "response_format": {"type": "json_object"},
            },
            400,
            "capability_not_supported",
        ),
        ({"messages": MESSAGES}, 400, "invalid_request"),
        ({"service_id": "llm.general.v1"}, 400, "invalid_request"),
    ],
)
async def test_complete_errors(
    meivan: Client, payload: dict[str, Any], status: int, code: str
) -> None:
    response = await meivan.post("/v1/complete", json=payload, headers=AUTH)
    assert (await error_of(response, status))["code"] == code


async def test_meivan_embeddings_share_the_meridian_vectors(
    meivan: Client, meridian: Client
) -> None:
    payload = {"service_id": "embed.text.v1", "input": ["a", "b"], "dimensions": 32}
    response = await meivan.post("/v1/embeddings", json=payload, headers=AUTH)
    body = await response.json()
    assert body["model"] == "embed.text.v1"
    other = await embed(meridian, input=["a", "b"], dimensions=32)
    assert body["data"] == other["data"]
    assert body["usage"] == other["usage"]
    packed = {**payload, "encoding_format": "base64"}
    encoded = await (await meivan.post("/v1/embeddings", json=packed, headers=AUTH)).json()
    assert decode_base64(encoded["data"][1]["embedding"]) == other["data"][1]["embedding"]


async def test_meivan_embeddings_need_an_embedding_service(meivan: Client) -> None:
    payload = {"service_id": "llm.general.v1", "input": "a"}
    response = await meivan.post("/v1/embeddings", json=payload, headers=AUTH)
    assert (await error_of(response, 400))["code"] == "capability_not_supported"


async def test_meivan_usage_per_service_spend(meivan: Client) -> None:
    body = await (await meivan.get("/v1/usage", headers=AUTH)).json()
    assert [r["service_id"] for r in body["data"]] == [s["service_id"] for s in default_services()]
    assert all(isinstance(r["spend_minor"], int) for r in body["data"])
    assert body["aggregate"]["spend_minor"] == sum(r["spend_minor"] for r in body["data"])
    assert body == await (await meivan.get("/v1/usage", headers=AUTH)).json()
    bad = await meivan.get("/v1/usage", params={"from": "soon"}, headers=AUTH)
    assert (await error_of(bad, 400))["param"] == "from"


async def test_meivan_requires_a_bearer_key(meivan: Client) -> None:
    response = await meivan.get("/v1/services")
    assert (await error_of(response, 401))["code"] == "invalid_api_key"


# --- faults ----------------------------------------------------------------------------------


async def test_meridian_429_has_retry_after_header_and_body_field(
    meridian: Client, state: MockState
) -> None:
    state.script(Fault(status=429, retry_after=2), path=CHAT)
    response = await meridian.post(CHAT, json={"model": "m", "messages": MESSAGES}, headers=AUTH)
    error = await error_of(response, 429)
    assert response.headers["Retry-After"] == "2"
    assert (await response.json())["retry-after"] == 2
    assert error["type"] == "rate_limit_exceeded"
    assert error["code"] == "rate_limit"
    assert all(name in response.headers for name in RATE_HEADERS)
    again = await meridian.post(CHAT, json={"model": "m", "messages": MESSAGES}, headers=AUTH)
    assert again.status == 200


async def test_fractional_retry_after_is_kept(meridian: Client, state: MockState) -> None:
    state.script(Fault(status=429, retry_after=0.5))
    response = await meridian.get("/v1/models", headers=AUTH)
    assert response.headers["Retry-After"] == "0.5"
    assert (await response.json())["retry-after"] == 0.5


async def test_meivan_429_has_only_the_header(meivan: Client, state: MockState) -> None:
    state.script(Fault(status=429, retry_after=3))
    response = await meivan.get("/v1/services", headers=AUTH)
    error = await error_of(response, 429)
    assert response.headers["Retry-After"] == "3"
    assert "retry-after" not in await response.json()
    assert error["message"] == "Too many requests for this workspace."


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (503, "server_error", "service_unavailable"),
        (401, "invalid_request_error", "invalid_api_key"),
        (500, "server_error", "internal_error"),
        (502, "server_error", "bad_gateway"),
    ],
)
async def test_status_faults_use_the_envelope(
    meridian: Client, state: MockState, status: int, kind: str, code: str
) -> None:
    state.script(Fault(status=status, headers={"X-Fault": "yes"}))
    response = await meridian.get("/v1/models", headers=AUTH)
    error = await error_of(response, status)
    assert (error["type"], error["code"]) == (kind, code)
    assert response.headers["X-Fault"] == "yes"


async def test_body_override_and_extra_headers(meridian: Client, state: MockState) -> None:
    state.script(Fault(status=502, body=b"<html>bad gateway</html>"))
    state.script(Fault(headers={"X-Extra": "1"}))
    first = await meridian.get("/v1/models", headers=AUTH)
    assert first.status == 502
    assert await first.read() == b"<html>bad gateway</html>"
    second = await meridian.get("/v1/models", headers=AUTH)
    assert second.status == 200
    assert second.headers["X-Extra"] == "1"
    assert (await second.json())["object"] == "list"


async def test_faults_for_a_path_wait_for_that_path(meridian: Client, state: MockState) -> None:
    state.script(Fault(status=503), path="/v1/embeddings")
    assert (await meridian.get("/v1/models", headers=AUTH)).status == 200
    response = await meridian.post(
        "/v1/embeddings", json={"model": "e", "input": "x"}, headers=AUTH
    )
    assert response.status == 503
    assert (
        await meridian.post("/v1/embeddings", json={"model": "e", "input": "x"}, headers=AUTH)
    ).status == 200


async def test_delay_holds_the_first_byte(meridian: Client, state: MockState) -> None:
    state.script(Fault(delay_s=0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await meridian.get("/v1/models", headers=AUTH)
    assert loop.time() - started >= 0.2
    assert response.status == 200
    started = loop.time()
    await meridian.get("/v1/models", headers=AUTH)
    assert loop.time() - started < 0.2


async def test_pace_spaces_the_events(meridian: Client, state: MockState) -> None:
    state.stream_chunks = 3
    state.script(Fault(pace_s=0.05))
    payload = {"model": "m", "messages": MESSAGES, "stream": True}
    response = await meridian.post(CHAT, json=payload, headers=AUTH)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    events: list[bytes] = []
    while line := await response.content.readline():
        if line.startswith(b"data: "):
            arrivals.append(loop.time())
            events.append(line)
    assert len(events) == 3 + 3
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[-1] - arrivals[0] >= 0.9 * 0.05 * len(gaps), gaps
    assert all(gap >= 0.025 for gap in gaps), gaps


async def test_default_pace_applies_without_a_fault(aiohttp_client: MakeClient) -> None:
    state = MockState(stream_chunks=2, default_pace_s=0.05)
    client = await aiohttp_client(meridian_app(state))
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.post(
        CHAT, json={"model": "m", "messages": MESSAGES, "stream": True}, headers=AUTH
    )
    events = sse_events(await response.read())
    assert len(events) == 2 + 3
    assert loop.time() - started >= 0.05 * (len(events) - 1)


async def test_reset_after_events_cuts_the_stream(meridian: Client, state: MockState) -> None:
    state.script(Fault(reset_after_events=2), path=CHAT)
    payload = {"model": "m", "messages": MESSAGES, "stream": True}
    response = await meridian.post(CHAT, json=payload, headers=AUTH)
    assert response.status == 200
    chunks: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        await drain(response, chunks)
    received = b"".join(chunks)
    assert received.count(b"data: ") == 2
    assert b"[DONE]" not in received
    assert state.disconnects == 0


async def test_reset_on_a_plain_response_sends_nothing(meridian: Client, state: MockState) -> None:
    state.script(Fault(reset_after_events=0))
    with pytest.raises(aiohttp.ClientConnectionError):
        await meridian.get("/v1/models", headers=AUTH)
    assert (await meridian.get("/v1/models", headers=AUTH)).status == 200


# --- control endpoints and counters ----------------------------------------------------------


async def test_control_endpoints_script_report_and_reset(meivan: Client, state: MockState) -> None:
    script = {"path": "/v1/complete", "faults": [{"status": 503, "retry_after": 1}]}
    queued = await meivan.post("/_mock/script", json=script)
    assert await queued.json() == {"queued": 1}
    assert (await meivan.get("/v1/services", headers=AUTH)).status == 200
    payload = {"service_id": "llm.general.v1", "messages": MESSAGES}
    failed = await meivan.post("/v1/complete", json=payload, headers=AUTH)
    assert failed.status == 503
    assert failed.headers["Retry-After"] == "1"
    report = await (await meivan.get("/_mock/received")).json()
    assert report == {
        "count": 2,
        "by_path": {"/v1/services": 1, "/v1/complete": 1},
        "disconnects": 0,
        "open_streams": 0,
    }
    assert (await meivan.post("/_mock/reset")).status == 200
    assert state.count() == 0
    assert (await (await meivan.get("/_mock/received")).json())["count"] == 0


async def test_reset_drops_queued_faults(meridian: Client, state: MockState) -> None:
    state.script(Fault(status=500))
    state.reset()
    assert (await meridian.get("/v1/models", headers=AUTH)).status == 200


async def test_control_script_rejects_bad_faults(meridian: Client, state: MockState) -> None:
    bad = await meridian.post("/_mock/script", json={"faults": [{"status": "soon"}]})
    assert (await error_of(bad, 400))["param"] == "status"
    unknown = await meridian.post("/_mock/script", json={"faults": [{"explode": True}]})
    assert (await error_of(unknown, 400))["param"] == "faults"
    assert (await meridian.get("/v1/models", headers=AUTH)).status == 200
    assert state.count() == 1


def test_fault_from_json_round_trips_every_field() -> None:
    fault = fault_from_json(
        {
            "status": 429,
            "retry_after": 1.5,
            "headers": {"a": "b"},
            "delay_s": 0.1,
            "pace_s": 0.2,
            "reset_after_events": 3,
            "body": "raw",
        }
    )
    assert fault == Fault(429, 1.5, {"a": "b"}, 0.1, 0.2, 3, b"raw")


async def test_received_records_requests_in_order(meridian: Client, state: MockState) -> None:
    await meridian.get("/v1/models", params={"x": "/"}, headers=AUTH)
    await meridian.post(CHAT, json={"model": "m", "messages": MESSAGES}, headers=AUTH)
    await meridian.get("/_mock/received")
    assert [r.path for r in state.received] == ["/v1/models", CHAT]
    assert state.received[0].method == "GET"
    assert state.received[0].query == {"x": "/"}
    assert state.received[0].body == b""
    assert state.received[1].json()["messages"] == MESSAGES
    assert state.received[1].headers["Authorization"] == "Bearer sk-test"
    assert state.count() == 2
    assert state.count(CHAT) == 1
    assert state.count("/v1/embeddings") == 0


# --- streams: open and disconnected ----------------------------------------------------------


async def test_client_leaving_mid_stream_counts_a_disconnect(
    meridian: Client, state: MockState
) -> None:
    state.stream_chunks = 200
    state.script(Fault(pace_s=0.02), path=CHAT)
    payload = {"model": "m", "messages": MESSAGES, "stream": True}
    response = await meridian.post(CHAT, json=payload, headers=AUTH)
    first = await response.content.readuntil(b"\n\n")
    assert first.startswith(b"data: ")
    assert state.open_streams == 1
    response.close()
    async with asyncio.timeout(5):
        await state.wait_disconnects(1)
    assert state.disconnects == 1
    assert state.open_streams == 0


async def test_disconnect_is_noticed_without_handler_cancellation() -> None:
    runner, url, state = await start_mock("meridian", state=MockState(stream_chunks=200))
    try:
        state.script(Fault(pace_s=0.02))
        payload = {"model": "m", "messages": MESSAGES, "stream": True}
        async with aiohttp.ClientSession() as session:
            response = await session.post(url + CHAT, json=payload, headers=AUTH)
            await response.content.readuntil(b"\n\n")
            response.close()
            async with asyncio.timeout(5):
                await state.wait_disconnects(1)
        assert state.open_streams == 0
    finally:
        await runner.cleanup()


async def test_a_complete_stream_is_no_disconnect(meridian: Client, state: MockState) -> None:
    payload = {"model": "m", "messages": MESSAGES, "stream": True}
    await (await meridian.post(CHAT, json=payload, headers=AUTH)).read()
    async with asyncio.timeout(5):
        await state.wait_for(lambda s: s.open_streams == 0)
    assert state.disconnects == 0


async def test_wait_for_wakes_on_a_recorded_request(meridian: Client, state: MockState) -> None:
    waiter = asyncio.create_task(state.wait_for(lambda s: s.count("/v1/models") >= 2))
    await meridian.get("/v1/models", headers=AUTH)
    assert not waiter.done()
    await meridian.get("/v1/models", headers=AUTH)
    async with asyncio.timeout(5):
        await waiter


# --- on a real socket ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "path"), [("meridian", "/v1/models"), ("meivan", "/v1/services")]
)
async def test_start_mock_serves_on_a_real_port(vendor: Any, path: str) -> None:
    runner, url, state = await start_mock(vendor)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith("/v1")
        async with aiohttp.ClientSession() as session, session.get(url + path, headers=AUTH) as r:
            assert r.status == 200
        assert state.count(path) == 1
    finally:
        await runner.cleanup()
