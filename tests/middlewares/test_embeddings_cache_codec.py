"""Keys, float32 storage and answer checks of the embeddings cache, without a server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidegate.middlewares.embeddings_cache_codec import (
    pack_floats,
    plan_items,
    read_answer,
    render,
    stored,
    unpack_base64,
)
from sidegate.proxy.mock import vector, vector_base64

TEAM = ("team", "search")


def keys(payload: dict[str, Any], scope: tuple[str, ...] = TEAM, model: str = "m") -> list[bytes]:
    plan = plan_items(payload, scope=scope, upstream="meridian", model=model)
    assert plan is not None
    return plan.keys


def test_what_splits_a_key_and_what_does_not() -> None:
    base = keys({"input": ["a", "b", "a"]})

    assert base[0] == base[2] != base[1]
    assert all(len(key) == 32 for key in base)
    assert keys({"input": ["a"], "user": "x", "encoding_format": "base64"})[0] == base[0]
    assert keys({"input": "a", "model": "alias-name"})[0] == base[0]
    assert keys({"input": ["a"], "dimensions": 8})[0] != base[0]
    assert keys({"input": ["a"]}, scope=("team", "ads"))[0] != base[0]
    assert keys({"input": ["a"]}, scope=("shared",))[0] != base[0]
    assert keys({"input": ["a"]}, model="other")[0] != base[0]
    assert keys({"input": ["a"], "input_type": "query"})[0] != base[0]


def test_unknown_fields_are_canonical_and_items_are_typed() -> None:
    one = keys({"input": ["a"], "x": {"p": 1, "q": 2}})
    two = keys({"x": {"q": 2, "p": 1}, "input": ["a"]})

    assert one == two
    assert keys({"input": [[1, 2, 3]]}) != keys({"input": ["1,2,3"]})
    assert keys({"input": [1, 2, 3]}) == keys({"input": [[1, 2, 3]]})


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"input": []},
        {"input": [True]},
        {"input": [[]]},
        {"input": [{"text": "a"}]},
        {"input": ["a"], "dimensions": "8"},
        {"input": ["a"], "encoding_format": "int8"},
    ],
)
def test_what_the_upstream_must_judge_is_not_cached(payload: dict[str, Any]) -> None:
    assert plan_items(payload, scope=TEAM, upstream="meridian", model="m") is None


def test_float32_bytes_answer_both_encodings_exactly() -> None:
    floats = vector(b"sabc", 64)
    packed = pack_floats(floats)

    assert packed is not None
    assert len(packed) == 64 * 4
    assert unpack_base64(vector_base64(b"sabc", 64)) == packed
    kept = stored(vector_base64(b"sabc", 64))
    assert kept == stored(floats, keep_text=False) == b"f" + packed
    assert render(kept, "float") == floats
    assert render(kept, "base64") == vector_base64(b"sabc", 64)


def test_floats_kept_as_text_answer_both_encodings_exactly() -> None:
    floats = vector(b"sabc", 64)

    kept = stored(floats, keep_text=True)

    assert kept == b"t" + orjson.dumps(floats)
    fragment = render(kept, "float")
    assert isinstance(fragment, orjson.Fragment)
    assert orjson.loads(orjson.dumps({"embedding": fragment})) == {"embedding": floats}
    assert render(kept, "base64") == vector_base64(b"sabc", 64)
    assert stored(vector_base64(b"sabc", 64), keep_text=True) == stored(floats)  # float32
    with pytest.raises(ValueError, match="not a stored vector"):
        render(b"\x00" + pack_floats(floats), "float")  # type: ignore[operator]


def test_values_that_are_not_float32_are_never_rounded_into_the_cache() -> None:
    assert pack_floats([0.5, -0.25]) is not None
    assert pack_floats([0.1]) is None  # 0.1 as a float64 is not a float32 value
    assert pack_floats([1e300]) is None
    assert pack_floats(["0.5"]) is None
    assert unpack_base64("not base64!") is None
    assert unpack_base64("AAA=") is None  # two bytes: not whole float32s


def _answer(*entries: Any) -> bytes:
    return orjson.dumps({"object": "list", "data": list(entries), "usage": {"total_tokens": 1}})


def test_an_answer_is_ordered_by_index_and_checked() -> None:
    good = _answer({"index": 1, "embedding": [0.5]}, {"index": 0, "embedding": "AAAAPw=="})

    answer = read_answer_bytes(good, 2)

    assert answer is not None
    assert answer.entries == [
        {"index": 0, "embedding": "AAAAPw=="},
        {"index": 1, "embedding": [0.5]},
    ]
    assert answer.vectors == [stored([0.5]), stored([0.5])]
    texts = read_answer(orjson.loads(good), 2, keep_text=True)
    assert texts is not None
    assert texts.vectors == [stored([0.5]), b"t[0.5]"]
    assert read_answer_bytes(good, 3) is None
    assert read_answer_bytes(b"<html>", 1) is None
    assert read_answer_bytes(_answer({"index": 0, "embedding": [0.5]}) + b"x", 1) is None
    assert read_answer_bytes(_answer({"index": 0}, {"index": 0}), 2) is None
    assert read_answer_bytes(_answer({"index": 2, "embedding": [0.5]}), 1) is None
    assert read_answer_bytes(_answer({"index": 0, "embedding": None}), 1) is None
    inexact = read_answer_bytes(_answer({"index": 0, "embedding": [0.1]}), 1)
    assert inexact is not None
    assert inexact.vectors == [None]


def read_answer_bytes(body: bytes, expected: int) -> Any:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    return read_answer(payload, expected)
