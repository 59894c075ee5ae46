"""The official ``openai`` SDK, async and sync, talks to sidegate as it would to the vendor."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from array import array
from collections.abc import AsyncIterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidegate.proxy.mock import Fault, vector
from sidegate.proxy.mock.text import plan_completion
from tests.conftest import ADMIN_KEY, Upstream

Client = TestClient[web.Request, web.Application]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "name the seven colours of the rainbow"},
]
CONFIGURED = {
    "meridian-1",
    "meridian-1-turbo",
    "meridian-embed-3",
    "meridian-whisper-1",
    "meridian-image-1",
    "fast",
    "whisper",
}


class Sdk:
    """One SDK client; ``call`` awaits the async client or runs the sync one in a thread."""

    def __init__(self, client: openai.AsyncOpenAI | openai.OpenAI) -> None:
        self.client = client

    async def call(self, operation: str, /, **kwargs: Any) -> Any:
        method = attrgetter(operation)(self.client)
        if isinstance(self.client, openai.AsyncOpenAI):
            return await method(**kwargs)
        return await asyncio.to_thread(method, **kwargs)

    async def stream(self, **kwargs: Any) -> list[Any]:
        """All chunks of a streamed chat completion, the stream closed afterwards."""
        client = self.client
        if isinstance(client, openai.AsyncOpenAI):
            async with await client.chat.completions.create(stream=True, **kwargs) as stream:
                return [chunk async for chunk in stream]

        def collect() -> list[Any]:
            with client.chat.completions.create(stream=True, **kwargs) as stream:
                return list(stream)

        return await asyncio.to_thread(collect)


@pytest.fixture(params=["async", "sync"])
async def sdk(request: pytest.FixtureRequest, gateway: Client) -> AsyncIterator[Sdk]:
    options: dict[str, Any] = {
        "base_url": str(gateway.make_url("/v1")),
        "api_key": ADMIN_KEY,
        "max_retries": 0,
    }
    if request.param == "async":
        async_client = openai.AsyncOpenAI(**options)
        try:
            yield Sdk(async_client)
        finally:
            await async_client.close()
    else:
        sync_client = openai.OpenAI(**options)
        try:
            yield Sdk(sync_client)
        finally:
            sync_client.close()


def _expected(messages: list[dict[str, str]], meridian: Upstream) -> tuple[str, dict[str, int]]:
    chunks = meridian.state.stream_chunks
    completion = plan_completion(messages, chunks, chunks)
    return completion.content, completion.usage()


def _float32(encoded: str) -> list[float]:
    values = array("f", base64.b64decode(encoded))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


async def test_chat_completion(sdk: Sdk, meridian: Upstream) -> None:
    reply = await sdk.call("chat.completions.create", model="meridian-1", messages=MESSAGES)
    content, usage = _expected(MESSAGES, meridian)
    assert content.startswith("name the seven")
    assert reply.object == "chat.completion"
    assert reply.model == "meridian-1"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.model_dump(include=set(usage)) == usage
    assert meridian.state.count("/v1/chat/completions") == 1
    received = meridian.state.received[-1].json()
    assert received["model"] == "meridian-1"
    assert received["messages"] == MESSAGES


async def test_chat_stream_matches_the_json_reply(sdk: Sdk, meridian: Upstream) -> None:
    reply = await sdk.call("chat.completions.create", model="meridian-1", messages=MESSAGES)
    chunks = await sdk.stream(model="meridian-1", messages=MESSAGES)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert len(chunks) == meridian.state.stream_chunks + 2
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


async def test_chat_stream_with_usage_ends_with_the_usage_chunk(
    sdk: Sdk, meridian: Upstream
) -> None:
    chunks = await sdk.stream(
        model="meridian-1", messages=MESSAGES, stream_options={"include_usage": True}
    )
    content, usage = _expected(MESSAGES, meridian)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump(include=set(usage)) == usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert meridian.state.received[-1].json()["stream_options"] == {"include_usage": True}


async def test_embeddings_float_base64_and_sdk_decoded_agree(sdk: Sdk, meridian: Upstream) -> None:
    texts = ["alpha", "beta gamma", "δέλτα"]
    expected = [vector(b"s" + text.encode(), 64) for text in texts]
    common = {"model": "meridian-embed-3", "input": texts, "dimensions": 64}
    floats = await sdk.call("embeddings.create", encoding_format="float", **common)
    encoded = await sdk.call("embeddings.create", encoding_format="base64", **common)
    decoded = await sdk.call("embeddings.create", **common)
    for response in (floats, encoded, decoded):
        assert [item.index for item in response.data] == [0, 1, 2]
        assert response.model == "meridian-embed-3"
        assert response.usage.prompt_tokens == sum((len(t) + 3) // 4 for t in texts)
    assert [item.embedding for item in floats.data] == expected
    assert all(isinstance(item.embedding, str) for item in encoded.data)
    assert [_float32(item.embedding) for item in encoded.data] == expected
    assert [item.embedding for item in decoded.data] == expected
    formats = [received.json().get("encoding_format") for received in meridian.state.received]
    assert formats == ["float", "base64", "base64"]


async def test_image_generation(sdk: Sdk, meridian: Upstream) -> None:
    images = await sdk.call(
        "images.generate", model="meridian-image-1", prompt="a lake at dawn", n=2
    )
    assert len(images.data) == 2
    urls = [image.url for image in images.data]
    assert urls[0].endswith("_0.png")
    assert urls[1].endswith("_1.png")
    assert urls[0][:-6] == urls[1][:-6]
    assert all(image.revised_prompt == "a lake at dawn" for image in images.data)
    assert meridian.state.received[-1].json() == {
        "model": "meridian-image-1",
        "prompt": "a lake at dawn",
        "n": 2,
    }


async def test_audio_transcription_uploads_the_file_bytes(
    sdk: Sdk, meridian: Upstream, tmp_path: Path
) -> None:
    audio = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n" + b"\x00\xff" * 500
    path = tmp_path / "speech.wav"
    path.write_bytes(audio)
    with path.open("rb") as file:
        transcript = await sdk.call(
            "audio.transcriptions.create", model="meridian-whisper-1", file=file
        )
    digest = hashlib.sha256(audio).hexdigest()[:12]
    assert transcript.text == f"Transcript of {len(audio)} bytes of audio with sha256 {digest}."
    received = meridian.state.received[-1]
    assert received.path == "/v1/audio/transcriptions"
    assert received.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert audio in received.body
    assert b'filename="speech.wav"' in received.body


async def test_models_list_is_answered_by_sidegate(
    sdk: Sdk, meridian: Upstream, meivan: Upstream
) -> None:
    page = await sdk.call("models.list")
    assert {model.id for model in page.data} == CONFIGURED
    assert all(model.object == "model" for model in page.data)
    assert meridian.state.count() == 0
    assert meivan.state.count() == 0


async def test_alias_reaches_the_upstream_under_its_real_name(sdk: Sdk, meridian: Upstream) -> None:
    reply = await sdk.call("chat.completions.create", model="fast", messages=MESSAGES)
    assert reply.model == "meridian-1-turbo"
    assert reply.choices[0].message.content == _expected(MESSAGES, meridian)[0]
    assert meridian.state.received[-1].json()["model"] == "meridian-1-turbo"


async def test_upstream_429_is_a_rate_limit_error(sdk: Sdk, meridian: Upstream) -> None:
    meridian.state.script(Fault(status=429, retry_after=1), path="/v1/chat/completions")
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.call("chat.completions.create", model="meridian-1", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["Retry-After"] == "1"
    assert error.code == "rate_limit"
    assert error.type == "rate_limit_exceeded"
    assert meridian.state.count("/v1/chat/completions") == 1


async def test_unknown_model_is_not_found_with_sidegates_envelope(
    sdk: Sdk, meridian: Upstream
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.call("chat.completions.create", model="no-such-model", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 404
    assert isinstance(error.body, dict)
    assert set(error.body) == {"type", "message", "param", "code"}
    assert error.body["type"] == "invalid_request_error"
    assert error.body["param"] == "model"
    assert error.body["code"] == "model_not_found"
    assert "no-such-model" in error.body["message"]
    assert error.body["message"] in error.message
    assert (error.param, error.code) == ("model", "model_not_found")
    assert orjson.loads(error.response.content) == {"error": error.body}
    assert meridian.state.count() == 0
