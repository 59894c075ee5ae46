"""The embeddings cache's pure part: items and their keys, vectors as float32 bytes, answers.

An **item** is one entry of ``input``: a string, or an array of token ids (a bare string or a bare
token array is a batch of one). Its **key** is the sha256 of the canonical (scope, upstream,
upstream model, ``dimensions``, other fields, item): ``user`` and ``encoding_format`` do not split
it; a field sidegate does not know (``input_type``, ``truncate`` …) might change the vectors, so it
does, canonically (sorted keys). An absent ``dimensions`` and an explicit one are different keys.

A **vector** is stored tagged, in one of two forms that answer either ``encoding_format`` value
for value: ``f`` and its little-endian float32 bytes (exactly what a ``base64`` answer carries),
or ``t`` and the JSON text of its numbers. A ``float`` answer is stored only when every number is
a float32 value (OpenAI-compatible APIs compute in float32 and print each value as a float64, as
the mock does); one that is not is passed on and not stored, never rounded. It is kept as text
when asked (``keep_text``): a ``float`` hit then copies the text into the answer instead of
formatting 1,536 numbers anew (about 1 ms for 16 vectors), at about 4.4 times the bytes; a
``base64`` hit on it parses the text back. A ``base64`` answer is always kept as float32.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = [
    "ENCODINGS",
    "Answer",
    "Plan",
    "hit_body",
    "is_stored",
    "merged_body",
    "pack_floats",
    "plan_items",
    "read_answer",
    "render",
    "stored",
    "unpack_base64",
]

ENCODINGS: Final = frozenset({"float", "base64"})
_VERSION: Final = "sidegate-embeddings/2"  # /2: tagged values
_FLOAT32: Final = b"f"
_TEXT: Final = b"t"
_NOT_IN_KEY: Final = frozenset(
    {"model", "service_id", "input", "dimensions", "encoding_format", "user"}
)
_BIG_ENDIAN: Final = sys.byteorder == "big"


@dataclass(frozen=True, slots=True)
class Plan:
    """A cacheable request: its items and their keys, position by position, the format the
    client asked for (``float`` or ``base64``) and the upstream model id."""

    items: list[str | list[int]]
    keys: list[bytes]
    encoding: str
    model: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A well-formed upstream answer: the document, its entries ordered by ``index``, and each
    entry's vector as stored (``None`` when it cannot be stored exactly)."""

    payload: dict[str, Any]
    entries: list[dict[str, Any]]
    vectors: list[bytes | None]


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def plan_items(
    payload: Mapping[str, Any], *, scope: Sequence[str], upstream: str, model: str
) -> Plan | None:
    """The items of an embeddings request and their keys, or ``None`` when sidegate cannot
    cache it (an ``input``, ``dimensions`` or ``encoding_format`` the upstream must judge)."""
    raw = payload.get("input")
    if isinstance(raw, str) or _is_tokens(raw):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(i, str) or _is_tokens(i) for i in raw):
        items = raw
    else:
        return None
    dimensions = payload.get("dimensions")
    if dimensions is not None and type(dimensions) is not int:
        return None
    encoding = payload.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        return None
    others = {name: value for name, value in payload.items() if name not in _NOT_IN_KEY}
    head = orjson.dumps(
        [_VERSION, list(scope), upstream, model, dimensions, others], option=orjson.OPT_SORT_KEYS
    )
    prefix = hashlib.sha256(head)
    return Plan(items, [_item_key(prefix, item) for item in items], encoding, model)


def _item_key(prefix: Any, item: str | list[int]) -> bytes:
    digest = prefix.copy()
    if isinstance(item, str):
        digest.update(b"s")
        digest.update(item.encode("utf-8", "surrogatepass"))
    else:
        digest.update(b"t")
        digest.update(",".join(map(str, item)).encode("ascii"))
    key: bytes = digest.digest()
    return key


def pack_floats(values: Sequence[Any]) -> bytes | None:
    """``values`` as little-endian float32 bytes, or ``None`` unless each is a float32 value."""
    try:
        packed = array("f", values)
    except (TypeError, OverflowError):
        return None
    if not packed or packed.tolist() != list(values):
        return None
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def unpack_base64(text: str) -> bytes | None:
    """The float32 bytes of a ``base64`` embedding, or ``None`` when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw and len(raw) % 4 == 0 else None


def stored(embedding: list[Any] | str, *, keep_text: bool = False) -> bytes | None:
    """How an upstream's ``embedding`` (a list of floats, or base64) is stored: tagged float32
    bytes, or (a float list, with ``keep_text``) tagged JSON text; ``None`` when it cannot be
    stored exactly (see the module docstring)."""
    if isinstance(embedding, str):
        raw = unpack_base64(embedding)
        return None if raw is None else _FLOAT32 + raw
    packed = pack_floats(embedding)
    if packed is None:
        return None
    return _TEXT + orjson.dumps(embedding) if keep_text else _FLOAT32 + packed


def is_stored(value: bytes) -> bool:
    """Whether ``value`` (from a backend) is a vector as :func:`stored` writes it."""
    tag, size = value[:1], len(value) - 1
    if tag == _FLOAT32:
        return size > 0 and size % 4 == 0
    return tag == _TEXT and value.startswith(b"[", 1) and value.endswith(b"]")


def render(vector: bytes, encoding: str) -> list[float] | str | orjson.Fragment:
    """A stored vector in ``encoding``: base64 of its float32 bytes, or its values as floats
    (the stored text itself, as an orjson fragment, when it was kept as text)."""
    tag, body = vector[:1], vector[1:]
    if tag == _TEXT:
        if encoding != "base64":
            return orjson.Fragment(body)
        try:  # float32 values (checked when stored): packed without checking again
            values = array("f", orjson.loads(body))
        except (TypeError, ValueError, OverflowError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError("a stored vector's text is not float32 values") from exc
        if _BIG_ENDIAN:
            values.byteswap()
        body = values.tobytes()
    elif tag != _FLOAT32:
        raise ValueError(f"not a stored vector (tag {tag!r})")
    if encoding == "base64":
        return base64.b64encode(body).decode("ascii")
    values = array("f")
    values.frombytes(body)
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist()


def read_answer(payload: Any, expected: int, *, keep_text: bool = False) -> Answer | None:
    """The upstream's (parsed JSON) answer to ``expected`` items, or ``None`` when it is not an
    embeddings list with each index ``0 … expected-1`` exactly once. Each vector is as
    :func:`stored` keeps it."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != expected:
        return None
    slots: list[dict[str, Any] | None] = [None] * expected
    for entry in data:
        index = entry.get("index") if isinstance(entry, dict) else None
        if type(index) is not int or not 0 <= index < expected or slots[index] is not None:
            return None
        slots[index] = entry
    entries = [entry for entry in slots if entry is not None]
    vectors: list[bytes | None] = []
    for entry in entries:
        embedding = entry.get("embedding")
        if not isinstance(embedding, list | str):
            return None
        vectors.append(stored(embedding, keep_text=keep_text))
    return Answer(payload, entries, vectors)


def _entry(index: int, vector: bytes, encoding: str) -> dict[str, Any]:
    return {"object": "embedding", "index": index, "embedding": render(vector, encoding)}


def hit_body(vectors: Sequence[bytes], encoding: str, model: str) -> bytes:
    """The answer to a request served wholly from the cache: no upstream usage, so zero."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [_entry(i, vector, encoding) for i, vector in enumerate(vectors)],
            "model": model,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }
    )


def merged_body(answer: Answer, sources: Sequence[bytes | int], encoding: str) -> bytes:
    """The upstream's answer with every position filled: a cached vector (bytes), or the
    upstream's entry for the sent item at that offset (int), re-indexed. Everything else in the
    upstream's document (``usage``, ``model`` …) is kept as it came."""
    data = [
        {**answer.entries[source], "index": i}
        if isinstance(source, int)
        else _entry(i, source, encoding)
        for i, source in enumerate(sources)
    ]
    return orjson.dumps({**answer.payload, "data": data})
