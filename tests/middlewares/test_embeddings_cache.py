"""The embeddings cache in a bare app, in front of the mock upstreams (memory backend)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import pytest
from aiohttp.typedefs import Middleware
from structlog.testing import capture_logs

from sidegate.config.cache import EmbeddingsCacheConfig
from sidegate.middlewares.embeddings_cache import (
    CacheUnavailable,
    MemoryVectorCache,
    VectorCache,
    embeddings_cache_middleware,
)
from sidegate.middlewares.limits import BudgetRule, Limits, LimitsSettings, limits_middleware
from sidegate.middlewares.pricing import Rates
from sidegate.middlewares.store import MemoryStores
from sidegate.proxy.mock import Fault, vector
from tests.conftest import Upstream
from tests.middlewares.test_embeddings_cache_support import (
    CALLS,
    SERVICE,
    Client,
    Counts,
    FakeClock,
    embed,
    expected,
    expected_base64,
    floats_of,
    gateway_app,
    tokens,
)

AiohttpClient = Callable[..., Awaitable[Client]]
MakeClient = Callable[..., Awaitable[Client]]
MB = 1 << 20


@pytest.fixture
def urls(meridian: Upstream, meivan: Upstream) -> dict[str, str]:
    return {"meridian": meridian.url, "meivan": meivan.url}


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, urls: Mapping[str, str]) -> MakeClient:
    """A client of a bare app with the cache (memory unless ``cache`` is given) in front."""

    async def make(
        *,
        cache: VectorCache | None = None,
        inner: Sequence[Middleware] = (),
        observer: Counts | None = None,
        clock: FakeClock | None = None,
        **settings: Any,
    ) -> Client:
        middleware = embeddings_cache_middleware(
            EmbeddingsCacheConfig(**settings),
            MemoryVectorCache(64 * MB) if cache is None else cache,
            observer=observer,
            clock=clock or FakeClock(),
        )
        return await aiohttp_client(gateway_app(urls, middleware, inner=inner))

    return make


def sent(upstream: Upstream) -> list[Any]:
    """The ``input`` of every embeddings request the upstream received, in order."""
    return [r.json()["input"] for r in upstream.state.received if r.path == "/v1/embeddings"]


async def test_a_partial_batch_sends_only_the_missing_items_and_merges_in_order(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    await embed(client, ["alpha", "gamma"])

    reply = await embed(
        client, ["alpha", "beta", "gamma", "delta"], user="u-7", encoding_format="float"
    )

    assert reply.status == 200
    assert reply.cache == ("partial", "2")
    assert reply.vectors() == [expected(t) for t in ("alpha", "beta", "gamma", "delta")]
    billed = tokens("beta", "delta")
    assert reply.body["usage"] == {"prompt_tokens": billed, "total_tokens": billed}
    assert reply.body["model"] == "meridian-embed-3"
    assert sent(meridian) == [["alpha", "gamma"], ["beta", "delta"]]
    assert meridian.state.received[-1].json() == {
        "model": "meridian-embed-3",
        "input": ["beta", "delta"],
        "user": "u-7",
        "encoding_format": "float",
    }


async def test_the_body_is_restored_for_outer_policies(make_client: MakeClient) -> None:
    client = await make_client()
    await embed(client, ["alpha"])

    await embed(client, ["alpha", "beta"])

    call = client.app[CALLS][-1]
    assert call.json["input"] == ["alpha", "beta"]
    assert b'"alpha"' in call.body
    assert call.cache_status == "partial"


async def test_a_full_hit_makes_no_upstream_call_and_reports_no_usage(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    await embed(client, ["alpha", "beta"])

    reply = await embed(client, ["beta", "alpha"])

    assert reply.cache == ("hit", "2")
    assert reply.vectors() == [expected("beta"), expected("alpha")]
    assert reply.body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert reply.body["object"] == "list"
    assert reply.body["model"] == "meridian-embed-3"
    assert len(sent(meridian)) == 1


async def test_duplicates_in_a_batch_go_upstream_once(
    make_client: MakeClient, meridian: Upstream
) -> None:
    counts = Counts()
    client = await make_client(observer=counts)

    first = await embed(client, ["x", "y", "x", "x"])
    second = await embed(client, ["x", "z", "x", "z"])

    assert first.cache == ("miss", "0")
    assert first.vectors() == [expected(t) for t in ("x", "y", "x", "x")]
    assert first.body["usage"]["prompt_tokens"] == tokens("x", "y")
    assert second.cache == ("partial", "2")
    assert second.vectors() == [expected(t) for t in ("x", "z", "x", "z")]
    assert sent(meridian) == [["x", "y"], ["z"]]
    assert (counts.hits, counts.misses, counts.saved_items) == (2, 6, 5)


async def test_token_id_arrays_are_items_too(make_client: MakeClient, meridian: Upstream) -> None:
    client = await make_client()
    await embed(client, [[1, 2, 3]])

    reply = await embed(client, [[1, 2, 3], [4, 5], "1,2,3"])

    assert reply.cache == ("partial", "1")
    assert sent(meridian) == [[[1, 2, 3]], [[4, 5], "1,2,3"]]
    assert reply.vectors() == [vector(b"t1,2,3", 1536), vector(b"t4,5", 1536), expected("1,2,3")]


@pytest.mark.parametrize("kept", ["text", "float32"])
@pytest.mark.parametrize(
    ("first", "then"), [("float", "base64"), ("base64", "float"), ("float", "float")]
)
async def test_a_vector_answers_either_encoding_value_for_value(
    make_client: MakeClient, meridian: Upstream, first: str, then: str, kept: str
) -> None:
    client = await make_client(float_answers=kept)
    texts = ["one", "two", "three"]
    await embed(client, texts, encoding_format=first)

    reply = await embed(client, texts, encoding_format=then)

    assert reply.cache == ("hit", "3")
    assert len(sent(meridian)) == 1
    if then == "base64":
        assert reply.vectors() == [expected_base64(t) for t in texts]
        assert [floats_of(v) for v in reply.vectors()] == [expected(t) for t in texts]
    else:
        assert reply.vectors() == [expected(t) for t in texts]


async def test_a_partial_answer_is_in_the_format_the_client_asked_for(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await embed(client, ["one"], encoding_format="float")

    reply = await embed(client, ["one", "two"], encoding_format="base64")

    assert reply.cache == ("partial", "1")
    assert reply.vectors() == [expected_base64("one"), expected_base64("two")]


async def test_float_answers_kept_as_text_are_counted_as_text(make_client: MakeClient) -> None:
    cache = MemoryVectorCache(MB)
    client = await make_client(cache=cache)
    await embed(client, ["alpha"], dimensions=64)
    text_held = cache.bytes_held
    await embed(client, ["beta"], dimensions=64, encoding_format="base64")

    assert text_held == 1 + len(orjson.dumps(expected("alpha", 64))) + 32
    assert cache.bytes_held - text_held == 1 + 64 * 4 + 32  # base64 answers: float32
    reply = await embed(client, ["alpha", "beta"], dimensions=64)
    assert reply.cache == ("hit", "2")
    assert reply.vectors() == [expected("alpha", 64), expected("beta", 64)]


async def test_dimensions_separate_entries(make_client: MakeClient, meridian: Upstream) -> None:
    client = await make_client()
    await embed(client, ["alpha"])

    short = await embed(client, ["alpha"], dimensions=256)
    again = await embed(client, ["alpha"], dimensions=256)

    assert short.cache == ("miss", "0")
    assert again.cache == ("hit", "1")
    assert short.vectors() == again.vectors() == [expected("alpha", 256)]
    assert len(sent(meridian)) == 2


async def test_the_user_field_does_not_split_entries_but_unknown_fields_do(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await embed(client, ["alpha"], user="a")

    same = await embed(client, ["alpha"], user="b")
    other = await embed(client, ["alpha"], input_type="query")

    assert same.cache == ("hit", "1")
    assert other.cache == ("miss", "0")


async def test_teams_do_not_see_each_others_entries(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    await embed(client, ["secret plan"], team="search")

    reply = await embed(client, ["secret plan"], team="ads")

    assert reply.cache == ("miss", "0")
    assert len(sent(meridian)) == 2


async def test_a_shared_cache_answers_every_team(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client(scope="shared")
    await embed(client, ["common text"], team="search")

    reply = await embed(client, ["common text"], team="ads")

    assert reply.cache == ("hit", "1")
    assert len(sent(meridian)) == 1


async def test_no_cache_skips_the_lookup_and_refreshes(
    make_client: MakeClient, meridian: Upstream
) -> None:
    clock = FakeClock()
    client = await make_client(cache=MemoryVectorCache(MB, timer=clock), ttl_s=100)
    await embed(client, ["alpha", "beta"])
    clock.advance(60)

    fresh = await embed(client, ["alpha", "beta"], headers={"Cache-Control": "no-cache"})
    clock.advance(60)
    later = await embed(client, ["alpha", "beta"])

    assert fresh.cache == ("miss", "0")
    assert later.cache == ("hit", "2")
    assert sent(meridian) == [["alpha", "beta"]] * 2


async def test_no_store_neither_reads_nor_writes(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    await embed(client, ["alpha"])

    bypass = await embed(client, ["alpha", "beta"], headers={"Cache-Control": "private, no-store"})
    after = await embed(client, ["beta"])

    assert bypass.cache == ("miss", "0")
    assert bypass.vectors() == [expected("alpha"), expected("beta")]
    assert after.cache == ("miss", "0")
    assert sent(meridian) == [["alpha"], ["alpha", "beta"], ["beta"]]


async def test_entries_expire_after_ttl(make_client: MakeClient, meridian: Upstream) -> None:
    clock = FakeClock()
    client = await make_client(cache=MemoryVectorCache(MB, timer=clock), ttl_s=30)
    await embed(client, ["alpha"])
    clock.advance(29)
    assert (await embed(client, ["alpha"])).cache == ("hit", "1")

    clock.advance(1)

    assert (await embed(client, ["alpha"])).cache == ("miss", "0")
    assert len(sent(meridian)) == 2


async def test_memory_stays_bounded_under_a_flood_of_unique_inputs(
    make_client: MakeClient,
) -> None:
    counts = Counts()
    per_entry = 1 + 64 * 4 + 32  # a tag, 64 float32 values and a 32-byte key
    cache = MemoryVectorCache(10 * per_entry, observer=counts)
    client = await make_client(cache=cache, observer=counts, float_answers="float32")

    for batch in range(20):
        reply = await embed(client, [f"text {batch}-{i}" for i in range(8)], dimensions=64)
        assert reply.status == 200
        assert cache.bytes_held <= cache.max_bytes

    assert cache.bytes_held == 10 * per_entry
    assert len(cache) == 10
    assert cache.evictions == counts.evictions == 160 - 10
    assert max(counts.held_bytes) <= cache.max_bytes
    assert counts.held_bytes[-1] == 10 * per_entry
    assert (await embed(client, ["text 19-7"], dimensions=64)).cache == ("hit", "1")
    assert (await embed(client, ["text 0-0"], dimensions=64)).cache == ("miss", "0")


async def test_meivan_embeddings_are_cached_by_service_id(
    make_client: MakeClient, meivan: Upstream
) -> None:
    client = await make_client()
    await embed(client, ["uno"], model=SERVICE)

    reply = await embed(client, ["uno", "dos"], model=SERVICE)

    assert reply.cache == ("partial", "1")
    assert reply.vectors() == [expected("uno"), expected("dos")]
    assert reply.body["model"] == SERVICE
    assert meivan.state.received[-1].json() == {"service_id": SERVICE, "input": ["dos"]}


async def test_an_upstream_error_passes_through_and_nothing_is_stored(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    meridian.state.script(Fault(status=500))

    failed = await embed(client, ["alpha"])
    retried = await embed(client, ["alpha"])

    assert failed.status == 500
    assert failed.body["error"]["type"]
    assert failed.cache == (None, None)
    assert retried.cache == ("miss", "0")


async def test_a_malformed_answer_passes_through_uncached(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    meridian.state.script(Fault(body=b'{"data": "not a list"}'))

    odd = await embed(client, ["alpha"])
    again = await embed(client, ["alpha"])

    assert odd.status == 200
    assert odd.body == {"data": "not a list"}
    assert again.cache == ("miss", "0")


async def test_float_values_that_are_not_float32_pass_on_uncached(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    answer = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]}
    meridian.state.script(Fault(body=orjson.dumps(answer)))

    first = await embed(client, "alpha")
    second = await embed(client, "alpha")

    assert first.body == answer
    assert first.cache == ("miss", "0")
    assert second.cache == ("miss", "0")
    assert second.vectors() == [expected("alpha")]


async def test_a_single_string_input_is_a_batch_of_one(make_client: MakeClient) -> None:
    client = await make_client()
    await embed(client, "alpha")

    reply = await embed(client, ["alpha"])

    assert reply.cache == ("hit", "1")
    assert reply.vectors() == [expected("alpha")]


async def test_a_malformed_answer_to_a_rewritten_request_is_a_502(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    await embed(client, ["alpha"])
    meridian.state.script(Fault(body=b'{"object": "list", "data": []}'))

    reply = await embed(client, ["alpha", "beta"])

    assert reply.status == 502
    assert reply.body["error"]["code"] == "upstream_bad_response"


async def test_other_requests_pass_through_untouched(
    make_client: MakeClient, meridian: Upstream
) -> None:
    client = await make_client()
    chat = {"model": "meridian-1", "messages": [{"role": "user", "content": "hi"}]}

    response = await client.post("/v1/chat/completions", json=chat)

    assert response.status == 200
    assert "x-sidegate-cache" not in response.headers
    assert meridian.state.received[-1].json() == chat
    response.release()


async def test_the_budget_reserves_and_charges_only_the_missing_items(
    make_client: MakeClient,
) -> None:
    texts = [f"{i}" * 100 for i in range(4)]
    per_token = 1000  # nano-USD: 1 USD per 1M tokens
    budget = 300 * per_token  # four items estimate 4 x 102 + 16 tokens, two 2 x 102 + 16
    settings = LimitsSettings(
        teams={"search": Limits(budget=BudgetRule(budget, "total"))},
        prices={"meridian-embed-3": Rates(input=per_token * 10**6)},
    )
    client = await make_client(scope="shared", inner=[limits_middleware(settings, MemoryStores())])
    assert (await embed(client, texts)).status == 429  # the whole batch does not fit
    await embed(client, texts[:2], team="platform")  # a team without a budget fills the cache

    reply = await embed(client, texts)

    assert reply.status == 200
    assert reply.cache == ("partial", "2")
    call = client.app[CALLS][-1]
    assert call.cost_nano_usd == tokens(*texts[2:]) * per_token


class Flaky:
    """A backend that is down while ``down`` is set."""

    def __init__(self) -> None:
        self.inner = MemoryVectorCache(MB)
        self.down = False
        self.calls = 0

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self.calls += 1
        if self.down:
            raise CacheUnavailable("down")
        return await self.inner.get_many(keys)

    async def set_many(self, entries: Mapping[bytes, bytes], ttl_s: int) -> None:
        if self.down:
            raise CacheUnavailable("down")
        await self.inner.set_many(entries, ttl_s)


async def test_an_outage_is_logged_once_and_the_recovery_once(make_client: MakeClient) -> None:
    clock = FakeClock()
    backend = Flaky()
    client = await make_client(cache=backend, clock=clock)
    await embed(client, ["alpha"])
    backend.down = True

    with capture_logs() as logs:
        statuses = []
        for _ in range(3):
            statuses.append((await embed(client, ["alpha"])).cache)
            clock.advance(0.5)
        probes_while_down = backend.calls
        backend.down = False
        clock.advance(1)
        recovered = await embed(client, ["alpha"])

    assert statuses == [("miss", "0")] * 3
    assert probes_while_down == 3  # the warm-up, the failure, one probe a second later
    assert recovered.cache == ("hit", "1")
    events = [entry["event"] for entry in logs]
    assert events == ["embeddings_cache_unavailable", "embeddings_cache_recovered"]


def test_settings_are_checked_at_construction() -> None:
    class Odd:
        ttl_s = 10
        scope = "global"
        float_answers = "text"

    class Odder:
        ttl_s = 10
        scope = "team"
        float_answers = "float64"

    with pytest.raises(ValueError, match="scope"):
        embeddings_cache_middleware(Odd(), MemoryVectorCache(MB))
    with pytest.raises(ValueError, match="float_answers"):
        embeddings_cache_middleware(Odder(), MemoryVectorCache(MB))
    with pytest.raises(ValueError, match="float_answers"):
        EmbeddingsCacheConfig(float_answers="float64")  # type: ignore[arg-type]


def test_the_config_section_needs_a_url_for_redis() -> None:
    with pytest.raises(ValueError, match="redis_url"):
        EmbeddingsCacheConfig(backend="redis")
    config = EmbeddingsCacheConfig(backend="redis", redis_url="redis://cache:6379/0")
    assert (config.scope, config.ttl_s, config.redis_prefix) == ("team", 86_400, "sg:emb:")
    assert config.float_answers == "text"
