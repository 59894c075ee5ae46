"""Deterministic embeddings, one implementation serving both vendors.

The vector of an input item depends only on the item and the requested dimensions:
``shake_256`` of the item's canonical bytes gives ``dimensions`` little-endian int16 values, each
divided by 32768. Every value is exactly representable as a float32, so the ``float`` and
``base64`` (little-endian float32) encodings carry the same numbers, and a shorter vector is a
prefix of a longer one. Vectors are not normalised.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from array import array
from operator import itemgetter
from typing import Any

from .errors import ApiError
from .params import choice, integer
from .text import text_tokens

__all__ = ["DEFAULT_DIMENSIONS", "canonical_items", "embeddings_payload", "vector", "vector_base64"]

DEFAULT_DIMENSIONS = 1536
MAX_DIMENSIONS = 8192
MAX_ITEMS = 2048

_VALUES: tuple[float, ...] = tuple((u - 65536 if u >= 32768 else u) / 32768.0 for u in range(65536))
_BIG_ENDIAN = sys.byteorder == "big"


def _floats(item: bytes, dimensions: int) -> tuple[float, ...]:
    units = array("H", hashlib.shake_256(item).digest(2 * dimensions))
    if _BIG_ENDIAN:
        units.byteswap()
    if dimensions == 1:
        return (_VALUES[units[0]],)
    values: tuple[float, ...] = itemgetter(*units)(_VALUES)
    return values


def vector(item: bytes, dimensions: int) -> list[float]:
    """The embedding of the canonical ``item`` as floats."""
    return list(_floats(item, dimensions))


def vector_base64(item: bytes, dimensions: int) -> str:
    """The embedding of the canonical ``item`` as base64 of little-endian float32s."""
    floats = array("f", _floats(item, dimensions))
    if _BIG_ENDIAN:
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode("ascii")


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def canonical_items(value: Any) -> list[tuple[bytes, int]]:
    """``input`` as (canonical bytes, token count) per item, in order.

    Accepts a string, a list of strings, a list of token ids, or a list of such lists; a string
    counts :func:`~.text.text_tokens` tokens, a token-id array its length.
    """
    if isinstance(value, str) or _is_token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > MAX_ITEMS:
        raise ApiError(
            400,
            f"'input' must be a string or a non-empty array of at most {MAX_ITEMS} items.",
            param="input",
        )
    items: list[tuple[bytes, int]] = []
    for entry in value:
        if isinstance(entry, str) and entry:
            items.append((b"s" + entry.encode(), text_tokens(entry)))
        elif _is_token_ids(entry):
            items.append((b"t" + ",".join(map(str, entry)).encode(), len(entry)))
        else:
            raise ApiError(
                400, "Each input must be a non-empty string or array of token ids.", param="input"
            )
    return items


def embeddings_payload(payload: dict[str, Any], model: str) -> tuple[dict[str, Any], int]:
    """The embeddings list answering ``payload`` (``input``, ``dimensions``, ``encoding_format``)
    for ``model``, and its token count."""
    items = canonical_items(payload.get("input"))
    dimensions = integer(payload, "dimensions", DEFAULT_DIMENSIONS, 1, MAX_DIMENSIONS)
    encoding = choice(payload, "encoding_format", "float", ("float", "base64"))
    encode = vector if encoding == "float" else vector_base64
    tokens = sum(count for _, count in items)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(item, dimensions)}
            for i, (item, _) in enumerate(items)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return body, tokens
