"""Meivan: the service list sidegate answers from its config, with cursor pagination.

The cursor is opaque to clients; sidegate uses the last ``service_id`` of the page (keyset
pagination over ids in config order), so a page boundary survives a reload that adds services.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sidegate.config.models import ModelEntry
from sidegate.middlewares.errors import BadRequest

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "service", "services_page"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def service(service_id: str, provider: str, entry: ModelEntry) -> dict[str, Any]:
    """One service as Meivan describes it; the metadata comes from the config's model entry."""
    return {
        "service_id": service_id,
        "provider": provider,
        "capabilities": list(entry.capabilities),
        "max_context_tokens": entry.max_context_tokens,
        "regions": list(entry.regions),
    }


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return limit


def services_page(
    services: Sequence[Mapping[str, Any]], query: Mapping[str, str]
) -> dict[str, Any]:
    """``GET /v1/services``: one page of ``services`` and the cursor of the next, if any."""
    limit = _limit(query.get("limit"))
    start = 0
    cursor = query.get("cursor")
    if cursor:
        ids = [service["service_id"] for service in services]
        if cursor not in ids:
            raise BadRequest("cursor is not one this endpoint returned.", param="cursor")
        start = ids.index(cursor) + 1
    page = list(services[start : start + limit])
    more = start + limit < len(services)
    return {"data": page, "next_cursor": page[-1]["service_id"] if more and page else None}
