"""Proxy-issued API keys: minted once, stored as hashes, looked up by hash.

A key is ``sg-`` followed by 43 URL-safe characters (256 random bits). Config holds only its
digest — ``sha256:<hex>`` or, with a pepper, ``hmac-sha256:<hex>`` — so a leaked config file
leaks no key. A presented key is hashed and looked up by digest; the stored and computed digests
are then compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

__all__ = ["KEY_PREFIX", "ApiKey", "ApiKeyTable", "hash_key", "new_key"]

KEY_PREFIX = "sg-"


def new_key() -> str:
    """A fresh API key: the prefix and 256 bits from the OS's CSPRNG."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str, pepper: bytes | None = None) -> str:
    """The digest config stores for ``key``: HMAC-SHA-256 with ``pepper``, else SHA-256."""
    if pepper is not None:
        return "hmac-sha256:" + hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key, as the auth middleware sees it (never the key itself)."""

    id: str
    team: str
    digest: str
    models: frozenset[str] | None = None
    roles: frozenset[str] = frozenset()
    expires: datetime | None = None
    disabled: bool = False


class ApiKeyTable:
    """Configured keys by digest; :meth:`lookup` never compares a key in variable time."""

    def __init__(self, keys: Iterable[ApiKey], *, pepper: bytes | None = None) -> None:
        self._pepper = pepper
        self._by_digest = {key.digest: key for key in keys}
        self._kinds = {key.digest.partition(":")[0] for key in self._by_digest.values()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        """The configured key whose digest matches ``presented``, if any."""
        for kind in self._kinds:
            digest = hash_key(presented, self._pepper if kind == "hmac-sha256" else None)
            key = self._by_digest.get(digest)
            if key is not None and hmac.compare_digest(key.digest, digest):
                return key
        return None
