"""Pricing: exact integer costs, upper-bound estimates, usage from answers and from SSE."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from sidegate.config.budgets import Budget, BudgetSettings, Price, TeamLimits
from sidegate.middlewares.errors import BadRequest
from sidegate.middlewares.pricing import (
    PricingError,
    Rates,
    SseUsage,
    Usage,
    cost,
    estimate,
    image_price,
    is_usage_only_event,
    nano_to_usd,
    rates,
    usage_at_end,
    usage_from_response,
    usage_from_sse,
    usd_to_nano,
)
from sidegate.proxy.mock import meivan_app, meridian_app

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Awaitable[Client]]
AUTH = {"Authorization": "Bearer sk-test"}

MERIDIAN_1 = rates(Price.model_validate({"input": 2.50, "output": "10.00"}))
EMBED = rates(Price.model_validate({"input": 0.02}))
IMAGES = rates(
    Price.model_validate(
        {"per_image": {"1024x1024": {"standard": 0.04, "hd": 0.08}, "1792x1024": 0.08}}
    )
)
WHISPER = rates(
    Price.model_validate({"per_request": "0.001", "per_second": 0.0001, "max_audio_seconds": 600})
)
SEED_CHAT = {
    "model": "meridian-1",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain quantum computing in one sentence."},
    ],
    "temperature": 0.7,
    "max_tokens": 256,
}


def test_config_prices_convert_exactly() -> None:
    assert (MERIDIAN_1.input, MERIDIAN_1.output) == (2_500_000_000, 10_000_000_000)
    assert EMBED.input == 20_000_000
    assert IMAGES.images == {
        "1024x1024": {"standard": 40_000_000, "hd": 80_000_000},
        "1792x1024": {"*": 80_000_000},
    }
    assert (WHISPER.per_request, WHISPER.per_second) == (1_000_000, 100_000)
    assert usd_to_nano(Decimal("0.000000001")) == 1
    assert nano_to_usd(310_000) == Decimal("0.00031")
    with pytest.raises(ValueError, match="nano-USD"):
        usd_to_nano(Decimal("0.0000000001"))


def test_token_costs_are_exact_integers() -> None:
    assert cost(Usage(28, 24), MERIDIAN_1, "chat") == 310_000  # the seed's answer: $0.00031
    assert cost(Usage(1_000_000, 1_000_000), MERIDIAN_1, "complete") == 12_500_000_000
    assert cost(Usage(9), EMBED, "embeddings") == 180
    assert cost(Usage(0, 0), MERIDIAN_1, "chat") == 0


def test_each_request_is_rounded_up_once_so_sums_are_exact() -> None:
    cheap = rates(Price.model_validate({"input": "0.0001"}))  # 0.1 nano-USD per token

    per_request = [cost(Usage(tokens), cheap, "embeddings") for tokens in (1, 9, 10, 11)]

    assert per_request == [1, 1, 1, 2]
    assert sum(per_request) == 5


def test_images_by_size_and_quality() -> None:
    flat = rates(Price.model_validate({"per_image": "0.05"}))

    assert cost(Usage(images=3), IMAGES, "images") == 3 * 40_000_000
    assert cost(Usage(images=2, image_quality="hd"), IMAGES, "images") == 160_000_000
    assert image_price(IMAGES, "1792x1024", "hd") == 80_000_000
    assert image_price(IMAGES, "1024x1792", None) == 80_000_000  # unlisted: the highest
    assert image_price(IMAGES, "1024x1024", "ultra") == 80_000_000
    assert image_price(flat, "1792x1024", "hd") == 50_000_000
    with pytest.raises(PricingError):
        cost(Usage(images=1), MERIDIAN_1, "images")


def test_audio_per_request_and_per_second() -> None:
    per_request = rates(Price.model_validate({"per_request": 0.006}))

    assert cost(Usage(), per_request, "audio") == 6_000_000
    assert cost(Usage(audio_seconds=Decimal("2.5")), WHISPER, "audio") == 1_250_000
    assert cost(Usage(audio_seconds=Decimal("0.0000001")), WHISPER, "audio") == 1_000_001
    assert cost(Usage(), WHISPER, "audio") == 1_000_000 + 600 * 100_000  # no duration: the bound
    with pytest.raises(PricingError):
        cost(Usage(), MERIDIAN_1, "audio")


def test_a_missing_price_is_an_error_only_when_it_is_needed() -> None:
    assert cost(Usage(100, 0), EMBED, "chat") == 2000
    with pytest.raises(PricingError, match="output"):
        cost(Usage(100, 1), EMBED, "chat")
    with pytest.raises(PricingError, match="max_output_tokens"):
        estimate("chat", {"messages": []}, MERIDIAN_1)
    with pytest.raises(ValueError, match="passthrough"):
        estimate("passthrough", {}, MERIDIAN_1)


def test_chat_estimates() -> None:
    capped = Rates(input=1_000_000, output=1_000_000, max_output_tokens=100)

    seed = estimate("chat", SEED_CHAT, MERIDIAN_1)
    no_max = estimate("chat", {"messages": []}, MERIDIAN_1, default_max_output_tokens=50)
    two = estimate("chat", {"messages": [], "max_completion_tokens": 10, "n": 2}, MERIDIAN_1)

    assert seed.completion_tokens == 256
    assert seed.prompt_tokens == 16 + (4 + 6 + 7 + 28) + (4 + 4 + 7 + 42)  # keys and values
    assert seed.cost_nano == cost(Usage(seed.prompt_tokens, 256), MERIDIAN_1, "chat")
    assert (no_max.prompt_tokens, no_max.completion_tokens) == (16, 50)
    assert two.completion_tokens == 20
    assert estimate("chat", {"max_tokens": 5000}, capped).completion_tokens == 100
    assert estimate("chat", {}, capped).completion_tokens == 100
    assert estimate("chat", {"messages": [{"content": "é"}]}, capped).prompt_tokens == 16 + 7 + 2
    for bad in (
        {"max_tokens": "9"},
        {"max_tokens": -1},
        {"max_tokens": True},
        {"n": 1.5, "max_tokens": 1},
    ):
        with pytest.raises(BadRequest):
            estimate("chat", bad, MERIDIAN_1)


def test_embeddings_image_and_audio_estimates() -> None:
    assert estimate("embeddings", {"input": "abc"}, EMBED).prompt_tokens == 16 + 3 + 2
    assert estimate("embeddings", {"input": [[1, 2, 3], "ab"]}, EMBED).prompt_tokens == 16 + 3 + 4
    images = estimate("images", {"prompt": "x", "n": 2, "quality": "hd"}, IMAGES)
    assert (images.images, images.cost_nano) == (2, 160_000_000)
    assert estimate("audio", {}, WHISPER).cost_nano == 61_000_000


def test_usage_from_the_seed_answers() -> None:
    chat = {"choices": [], "usage": {"prompt_tokens": 28, "completion_tokens": 24}}
    embeddings = {"data": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    images = {"created": 1, "data": [{"url": "a"}, {"url": "b"}]}

    assert usage_from_response("chat", chat) == Usage(28, 24)
    assert usage_from_response("complete", chat) == Usage(28, 24)
    assert usage_from_response("embeddings", embeddings) == Usage(9, 0)
    assert usage_from_response("passthrough", {"usage": {"input_tokens": 3}}) == Usage(3)
    assert usage_from_response("images", images, {"size": "1792x1024"}) == Usage(
        images=2, image_size="1792x1024"
    )
    assert usage_from_response("audio", {"text": "hi"}) == Usage()
    assert usage_from_response("audio", None) == Usage()
    assert usage_from_response("audio", {"duration": 2.5}) == Usage(audio_seconds=Decimal("2.5"))
    for kind, payload in [
        ("chat", {"usage": None}),
        ("chat", {"usage": {"prompt_tokens": "3"}}),
        ("chat", []),
        ("images", {"data": None}),
    ]:
        assert usage_from_response(kind, payload) is None


CHAT_BODIES: list[dict[str, Any]] = [
    SEED_CHAT,
    {"model": "meridian-1", "messages": [{"role": "user", "content": ""}], "max_tokens": 3},
    {
        "model": "meridian-1",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "héllo wörld " * 40}]},
            {"role": "assistant", "content": "a b c"},
            {"role": "user", "content": "again, in more words please"},
        ],
        "max_completion_tokens": 64,
    },
]


@pytest.mark.parametrize("body", CHAT_BODIES)
async def test_chat_estimates_bound_the_mocks_answers(
    aiohttp_client: AiohttpClient, body: dict[str, Any]
) -> None:
    client = await aiohttp_client(meridian_app())
    bound = estimate("chat", body, MERIDIAN_1)

    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    usage = usage_from_response("chat", await response.json())

    assert usage is not None
    assert bound.tokens >= usage.total_tokens
    assert bound.cost_nano >= cost(usage, MERIDIAN_1, "chat") > 0


async def test_meivan_and_embeddings_estimates_bound_the_mocks_answers(
    aiohttp_client: AiohttpClient,
) -> None:
    meridian = await aiohttp_client(meridian_app())
    meivan = await aiohttp_client(meivan_app())
    complete = {"service_id": "llm.general.v1", **SEED_CHAT}
    del complete["model"]
    inputs: list[Any] = ["The quick brown fox jumps over the lazy dog.", ["a", "bb", "ccc"]]
    inputs.append([[1, 2, 3, 4], [5]])

    answered = await meivan.post("/v1/complete", json=complete, headers=AUTH)
    usage = usage_from_response("complete", await answered.json())
    assert usage is not None
    assert estimate("complete", complete, MERIDIAN_1).tokens >= usage.total_tokens
    for value in inputs:
        body = {"model": "meridian-embed-3", "input": value}
        answered = await meridian.post("/v1/embeddings", json=body, headers=AUTH)
        usage = usage_from_response("embeddings", await answered.json())
        assert usage is not None
        bound = estimate("embeddings", body, EMBED)
        assert bound.tokens >= usage.total_tokens
        assert bound.cost_nano >= cost(usage, EMBED, "embeddings") > 0


async def test_image_and_audio_estimates_bound_the_mocks_answers(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(meridian_app())
    body = {"prompt": "a lake", "n": 3, "size": "1792x1024", "quality": "hd"}
    answered = await client.post("/v1/images/generations", json=body, headers=AUTH)
    images = usage_from_response("images", await answered.json(), body)

    form = FormData()
    form.add_field("file", b"\0" * 40_000, filename="a.wav")
    form.add_field("model", "meridian-whisper-1")
    form.add_field("response_format", "verbose_json")
    answered = await client.post("/v1/audio/transcriptions", data=form, headers=AUTH)
    audio = usage_from_response("audio", await answered.json())

    assert images == Usage(images=3, image_size="1792x1024", image_quality="hd")
    assert estimate("images", body, IMAGES).cost_nano == cost(images, IMAGES, "images")
    assert audio == Usage(audio_seconds=Decimal("2.5"))
    assert estimate("audio", {}, WHISPER).cost_nano >= cost(audio, WHISPER, "audio") == 1_250_000


async def stream(client: Client, body: dict[str, Any]) -> list[bytes]:
    response = await client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
    )
    assert response.status == 200
    return [chunk async for chunk in response.content.iter_any()]


async def test_sse_usage_from_a_real_meridian_stream(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(meridian_app())
    json_usage = usage_from_response(
        "chat",
        await (await client.post("/v1/chat/completions", json=SEED_CHAT, headers=AUTH)).json(),
    )
    with_usage = {**SEED_CHAT, "stream_options": {"include_usage": True}}
    chunks = await stream(client, with_usage)
    raw = b"".join(chunks)

    parser = SseUsage()
    seen = [parser.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)]

    assert json_usage is not None
    assert seen[-1] == json_usage
    assert seen[0] is None
    assert usage_from_sse(chunks) == json_usage
    assert usage_from_sse(await stream(client, SEED_CHAT)) is None


async def test_hiding_the_usage_chunk_leaves_everything_else(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(meridian_app())
    raw = b"".join(await stream(client, {**SEED_CHAT, "stream_options": {"include_usage": True}}))
    events = [event + b"\n\n" for event in raw.split(b"\n\n") if event]

    parser = SseUsage()
    shown = b"".join(parser.strip(raw[i : i + 5]) for i in range(0, len(raw), 5)) + parser.flush()

    assert [is_usage_only_event(event) for event in events].count(True) == 1
    assert shown == b"".join(event for event in events if not is_usage_only_event(event))
    assert parser.usage is not None
    assert shown.endswith(b"data: [DONE]\n\n")
    assert not is_usage_only_event(b"data: [DONE]\n\n")
    assert is_usage_only_event(b'data: {"choices":[],"usage":{"prompt_tokens":1}}\r\n\r\n')


def test_whole_events_read_as_events_split_anywhere_do() -> None:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"caf\\u00e9 \\n"}}],"usage":null}\n\n',
        b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"x"}}],"usage":null}\n\n',
        b": keep-alive\n\n",
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\r\n\r\n',
        b"data: [DONE]\n\n",
    ]
    raw = b"".join(events)
    whole, split = SseUsage(), SseUsage()

    shown = b"".join(whole.strip(event) for event in events) + whole.flush()
    cut = b"".join(split.strip(raw[i : i + 3]) for i in range(0, len(raw), 3)) + split.flush()

    assert shown == cut == b"".join(events[:3]) + events[4]
    assert (whole.text_bytes, whole.text_deltas) == (split.text_bytes, split.text_deltas) == (8, 2)
    assert whole.usage == split.usage == Usage(3, 2)


async def test_a_stream_cut_short_is_estimated_above_zero(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(meridian_app())
    raw = b"".join(await stream(client, SEED_CHAT))
    first_text = raw.index(b'"content":"Explain')

    cut = SseUsage()
    cut.feed(raw[: raw.index(b"\n\n", first_text) + 2])
    nothing = SseUsage()
    nothing.feed(raw[:first_text])
    whole = SseUsage()
    whole.feed(raw)

    assert cut.completion_tokens_estimate() == 2  # one delta of "Explain": ceil(7 / 4)
    assert nothing.completion_tokens_estimate() == 0
    assert whole.completion_tokens_estimate() >= 8  # the mock streams 8 one-token words
    assert cut.partial_usage(30) == Usage(30, 2)
    estimated = cost(whole.partial_usage(30), MERIDIAN_1, "chat")
    assert estimated > 0


def test_all_is_complete() -> None:
    import sidegate.middlewares.pricing as pricing

    public = {
        name
        for name, value in vars(pricing).items()
        if not name.startswith("_")
        and getattr(value, "__module__", pricing.__name__) == pricing.__name__
        and not isinstance(value, type(pricing))
    }

    assert set(pricing.__all__) == public


@pytest.mark.parametrize(
    ("price", "problem"),
    [
        ({"input": "abc"}, "not a number"),
        ({"input": "-1"}, "greater than or equal to 0"),
        ({"input": True}, "boolean"),
        ({"input": 1e-10}, "9 decimal places"),
        ({"input": "inf"}, "finite"),
        ({}, "at least one"),
        ({"per_second": 0.001}, "max_audio_seconds"),
        ({"per_image": {}}, "at least one size"),
        ({"per_image": {"1024x1024": {}}}, "at least one quality"),
        ({"input": 1, "cached": 1}, "Extra inputs"),
    ],
)
def test_config_prices_are_validated(price: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Price.model_validate(price)


def test_config_budgets_take_numbers_and_strings_exactly() -> None:
    team = TeamLimits.model_validate(
        {
            "budget": {"usd": "0.10", "period": "daily"},
            "rate_limit": {"requests_per_minute": 600, "tokens_per_minute": 200000},
            "keys": {"search-prod": {"budget": {"usd": 0.1}}},
        }
    )

    assert team.budget is not None
    assert team.budget.usd == Decimal("0.10")
    assert usd_to_nano(team.keys["search-prod"].budget.usd) == 100_000_000  # type: ignore[union-attr]
    assert team.budget.fail_open is False
    assert usd_to_nano(BudgetSettings().passthrough_reserve_usd) == 10**9
    with pytest.raises(ValidationError, match="less than or equal"):
        Budget.model_validate({"usd": 10_000_000})


def test_prompt_bound_counts_every_container_alike() -> None:
    from collections import OrderedDict
    from types import MappingProxyType

    as_json = {"messages": [{"role": "user", "content": "héllo", "n": 12}], "max_tokens": 1}
    other = {
        "messages": (MappingProxyType(OrderedDict(role="user", content="héllo", n=12)),),
        "max_tokens": 1,
    }
    # 16 + keys (4 + 7 + 1) + values (4 + 6 bytes of UTF-8 + len("12"))
    assert estimate("chat", as_json, MERIDIAN_1).prompt_tokens == 16 + 12 + 12
    assert estimate("chat", other, MERIDIAN_1) == estimate("chat", as_json, MERIDIAN_1)
    numbered = {"messages": [{1: "ab", None: [True, 2.5]}], "max_tokens": 1}
    assert estimate("chat", numbered, MERIDIAN_1).prompt_tokens == 16 + 1 + 2 + 4 + 4 + 3


def test_the_larger_of_max_tokens_and_max_completion_tokens_is_reserved() -> None:
    messages = [{"role": "user", "content": "hi"}]
    both = {"messages": messages, "max_tokens": 5, "max_completion_tokens": 9}
    assert estimate("chat", both, MERIDIAN_1).completion_tokens == 9
    assert estimate("chat", {**both, "max_tokens": 11}, MERIDIAN_1).completion_tokens == 11
    only = {"messages": messages, "max_completion_tokens": 3}
    assert estimate("chat", only, MERIDIAN_1).completion_tokens == 3
    with pytest.raises(BadRequest):
        estimate("chat", {**both, "max_completion_tokens": -1}, MERIDIAN_1)


def _plain_bound(value: Any) -> int:
    """The prompt bound as first written: one recursive rule for every container."""
    from collections.abc import Mapping

    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Mapping):
        return sum(_plain_bound(str(key)) + _plain_bound(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(_plain_bound(item) for item in value)
    return len(str(value))


def test_prompt_bound_is_the_plain_rule_on_random_documents() -> None:
    import random

    rng = random.Random(7)
    leaves: list[Any] = ["", "ascii", "héllo", "\U0001f600", 0, -12, 2.5, True, None, 1e300]

    def document(depth: int) -> Any:
        shape = rng.randrange(5 if depth < 4 else 1)
        if shape == 0:
            return rng.choice(leaves)
        if shape in (1, 2):
            names = ["role", "content", "é", 1, None]
            return {rng.choice(names): document(depth + 1) for _ in range(3)}
        if shape == 3:
            return [document(depth + 1) for _ in range(rng.randrange(4))]
        return tuple(document(depth + 1) for _ in range(2))

    for _ in range(2000):
        messages = [document(0) for _ in range(rng.randrange(1, 4))]
        body = {"messages": messages, "max_tokens": 1}
        expected = 16 + sum(_plain_bound(message) for message in messages)
        assert estimate("chat", body, MERIDIAN_1).prompt_tokens == expected


@pytest.mark.parametrize(
    "document",
    [
        b'{"data":[1,2],"usage":{"prompt_tokens":3,"total_tokens":3}}',
        b'{"data":[1,2],\n  "usage" : { "prompt_tokens": 3, "total_tokens": 3 }\n}\n',
        b'{"usage":{"prompt_tokens":5}}',
    ],
)
def test_usage_is_read_from_the_end(document: bytes) -> None:
    assert usage_at_end(document) == orjson.loads(document)["usage"]


@pytest.mark.parametrize(
    "document",
    [
        b'{"usage":{"prompt_tokens":3},"model":"m"}',  # not last
        b'{"data":[{"usage":{"prompt_tokens":3}}]}',  # not the outermost
        b'{"data":{"usage":{"prompt_tokens":3}}}',
        b'{"usage":{"p":{"prompt_tokens":3}}}',  # not flat
        b'{"usage":{"p":[1]}}',
        b'{"x\\"usage":{"prompt_tokens":3}}',  # a key that ends with the word
        b'{"x":"\\"usage\\":{\\"prompt_tokens\\":3}}"}',  # in a string
        b'{"usage":{"note":"a{b"}}',
        b'["usage",{"prompt_tokens":3}]',
        b'{"usage":{"prompt_tokens":3}',  # not closed
        b"",
        b"}}",
    ],
)
def test_usage_not_plainly_at_the_end_is_left_to_a_full_parse(document: bytes) -> None:
    assert usage_at_end(document) is None


def test_usage_at_the_end_agrees_with_a_full_parse_on_random_documents() -> None:
    import json
    import random

    rng = random.Random(11)
    members: list[tuple[str, Any]] = [
        ("usage", {"prompt_tokens": 7, "total_tokens": 7}),
        ("usage", {"prompt_tokens": {"nested": 1}}),
        ("usage", {"note": 'a "quoted" {brace}'}),
        ("data", [{"usage": {"prompt_tokens": 1}}, [1.5, -2]]),
        ("x", '"usage":{"prompt_tokens":9}}'),
        ("model", "m"),
        ('usag"e', {"prompt_tokens": 2}),
    ]
    read = 0
    for _ in range(5000):
        document = dict(rng.sample(members, rng.randrange(1, 5)))
        text = json.dumps(document, indent=rng.choice([None, 1, 4])).encode()
        text += rng.choice([b"", b"\n", b"  \r\n"])
        found = usage_at_end(text)
        if found is not None:
            assert found == document["usage"]
            read += 1
        elif list(document)[-1] == "usage" and document["usage"] == members[0][1]:
            raise AssertionError(f"a plain usage at the end was not read: {text!r}")
    assert read > 500
