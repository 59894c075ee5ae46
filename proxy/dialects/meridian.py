"""Meridian (OpenAI-compatible): the model list sidegate answers from its config."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

__all__ = ["models_list"]


def models_list(ids: Iterable[str], *, created: int) -> bytes:
    """``GET /v1/models`` in Meridian's (OpenAI's) list shape."""
    data = [
        {"id": id_, "object": "model", "created": created, "owned_by": "sidegate"} for id_ in ids
    ]
    return orjson.dumps({"object": "list", "data": data})
