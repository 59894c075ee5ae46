"""Validation of request parameters, each failure a 400 naming the offending ``param``."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError

__all__ = [
    "choice",
    "integer",
    "messages",
    "required_str",
    "required_timestamp",
    "timestamp",
]


def required_str(payload: Mapping[str, Any], name: str) -> str:
    """``payload[name]`` as a non-empty string."""
    value = payload.get(name)
    if value is None:
        raise ApiError(400, f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' must be a non-empty string.", param=name)
    return value


def integer(payload: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    """``payload[name]`` as an int in ``low..high`` (``default`` when absent or null).

    Query strings pass their text, which must then be decimal digits.
    """
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def choice(payload: Mapping[str, Any], name: str, default: str, allowed: Collection[str]) -> str:
    """``payload[name]`` as one of ``allowed`` (``default`` when absent or null)."""
    value = payload.get(name)
    if value is None:
        return default
    if value not in allowed:
        listed = ", ".join(sorted(allowed))
        raise ApiError(400, f"'{name}' must be one of: {listed}.", param=name)
    return str(value)


def messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``payload["messages"]`` as a non-empty list of objects that each have a string role."""
    value = payload.get("messages")
    if value is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)
    ):
        raise ApiError(
            400, "'messages' must be a non-empty array of objects with a role.", param="messages"
        )
    return value


def timestamp(query: Mapping[str, str], name: str) -> datetime | None:
    """``query[name]`` parsed as ISO 8601 / RFC 3339 in UTC (naive times are taken as UTC)."""
    text = query.get(name)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"'{name}' must be an ISO 8601 timestamp.", param=name) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def required_timestamp(query: Mapping[str, str], name: str) -> datetime:
    """Like :func:`timestamp`, but absence is a 400."""
    parsed = timestamp(query, name)
    if parsed is None:
        raise ApiError(400, f"Missing required parameter: '{name}'.", param=name)
    return parsed
