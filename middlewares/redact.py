"""A structlog processor that removes credentials from every event before it is rendered.

It redacts, wherever they appear in an event (nested mappings and sequences included):
values under credential-bearing names (``Authorization``, ``api-key``, ``x-api-key``, cookies,
``secret``, ``token`` …); anything shaped like a JWT, a sidegate key (``sg-…``) or a bearer
credential inside a string; and the exact values of the secrets sidegate holds (upstream keys,
HMAC secrets), supplied by a callable so that a reload's new keys are covered at once.
Put it after exception rendering, so tracebacks are redacted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, MutableMapping
from typing import Any

__all__ = ["REDACTED", "redact_secrets"]

REDACTED = "[redacted]"

_NAMES = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "api_key",
        "x-api-key",
        "cookie",
        "set-cookie",
        "secret",
        "password",
        "token",
        "jwt",
        "pepper",
    }
)
_SHAPES = re.compile(
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|sg-[A-Za-z0-9_-]{16,}"
    r"|(?i:bearer)\s+[^\s\"',;]+"
)
_MIN_SECRET = 8


def redact_secrets(
    secrets: Callable[[], Collection[str]] = tuple,
) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """The processor; ``secrets()`` returns the secret values to remove verbatim."""

    def processor(
        logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        known = [value for value in secrets() if len(value) >= _MIN_SECRET]
        for name, value in event.items():
            event[name] = _clean(name, value, known)
        return event

    return processor


def _clean(name: object, value: Any, known: list[str]) -> Any:
    if isinstance(name, str) and name.lower() in _NAMES and value is not None:
        return REDACTED
    if isinstance(value, str):
        return _clean_text(value, known)
    if isinstance(value, Mapping):
        return {key: _clean(key, item, known) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(None, item, known) for item in value]
    if isinstance(value, bytes | bytearray):
        return _clean_text(bytes(value).decode("utf-8", "replace"), known)
    return value


def _clean_text(text: str, known: list[str]) -> str:
    text = _SHAPES.sub(REDACTED, text)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
