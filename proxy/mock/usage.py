"""``GET /v1/usage`` of both vendors: deterministic figures derived from hashes, not from traffic.

Meridian answers time buckets plus an aggregate (the seed's shape). Meivan's seed only promises
"usage aggregates and per-service spend"; the mock answers per-service rows with the spend in
minor units (cents), as Meivan's conventions require, plus an aggregate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from .errors import ApiError
from .params import choice, required_timestamp, timestamp
from .pipeline import json_response

__all__ = ["MAX_BUCKETS", "meivan_usage_payload", "meridian_usage"]

MAX_BUCKETS = 10_000
_USD_PER_TOKEN = 0.00002


def _figure(*parts: str) -> int:
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _buckets(start: datetime, end: datetime, granularity: str) -> Iterator[datetime]:
    moment = start.replace(minute=0, second=0, microsecond=0)
    if granularity != "hour":
        moment = moment.replace(hour=0)
    if granularity == "month":
        moment = moment.replace(day=1)
    while moment <= end:
        yield moment
        if granularity == "hour":
            moment += timedelta(hours=1)
        elif granularity == "day":
            moment += timedelta(days=1)
        elif moment.month == 12:
            moment = moment.replace(year=moment.year + 1, month=1)
        else:
            moment = moment.replace(month=moment.month + 1)


def _check_order(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end < start:
        raise ApiError(400, "'to' must not be before 'from'.", param="to")


async def meridian_usage(request: web.Request) -> web.StreamResponse:
    """Meridian's usage: ``from`` and ``to`` required, ``granularity`` hour, day or month."""
    start = required_timestamp(request.query, "from")
    end = required_timestamp(request.query, "to")
    _check_order(start, end)
    granularity = choice(request.query, "granularity", "day", ("hour", "day", "month"))
    data: list[dict[str, Any]] = []
    for moment in _buckets(start, end, granularity):
        if len(data) == MAX_BUCKETS:
            raise ApiError(400, "The window has too many buckets.", param="granularity")
        stamp = _rfc3339(moment)
        prompt = 1_000 + _figure(stamp, granularity) % 20_000
        completion = prompt * 7 // 10
        total = prompt + completion
        data.append(
            {
                "timestamp": stamp,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
                "cost_usd": round(total * _USD_PER_TOKEN, 2),
            }
        )
    aggregate = {
        "total_tokens": sum(b["total_tokens"] for b in data),
        "total_cost_usd": round(sum(b["cost_usd"] for b in data), 2),
    }
    return json_response({"object": "list", "data": data, "aggregate": aggregate})


def meivan_usage_payload(request: web.Request, service_ids: Iterable[str]) -> dict[str, Any]:
    """Meivan's usage for ``service_ids``; optional RFC 3339 ``from``/``to`` vary the figures."""
    start = timestamp(request.query, "from")
    end = timestamp(request.query, "to")
    _check_order(start, end)
    window = (
        "" if start is None else _rfc3339(start),
        "" if end is None else _rfc3339(end),
    )
    rows: list[dict[str, Any]] = []
    for service_id in service_ids:
        seed = _figure(service_id, *window)
        prompt = 500 + seed % 50_000
        completion = prompt * 3 // 10
        rows.append(
            {
                "service_id": service_id,
                "requests": 10 + seed % 990,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "spend_minor": (prompt + completion) // 500,
                "currency": "USD",
            }
        )
    return {
        "object": "usage",
        "from": window[0] or None,
        "to": window[1] or None,
        "data": rows,
        "aggregate": {
            "requests": sum(r["requests"] for r in rows),
            "total_tokens": sum(r["total_tokens"] for r in rows),
            "spend_minor": sum(r["spend_minor"] for r in rows),
            "currency": "USD",
        },
    }
