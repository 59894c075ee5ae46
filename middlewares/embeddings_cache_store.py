"""Where the embeddings cache keeps its vectors: in process, or in a Redis shared by replicas.

A :class:`VectorCache` maps a 32-byte key (a sha256 digest) to a stored vector (bytes, as
:mod:`.embeddings_cache_codec` writes them), each entry living ``ttl_s`` seconds from its last
write. Two backends:

* :class:`MemoryVectorCache` — a cachetools ``TLRUCache`` bounded by ``max_bytes`` of stored data
  (each entry counts its vector's bytes plus its 32-byte key), least recently used first out;
  it tells an observer the bytes it holds and the entries it evicted for room.
* :class:`RedisVectorCache` — a ``redis.asyncio`` client the caller made (``decode_responses``
  off; give it short socket timeouts and no retries, a miss is cheaper than a wait). One ``MGET``
  per lookup and one pipelined batch of ``SET … EX`` per write, one round trip each. Its size is
  Redis's to bound (``maxmemory`` with an ``allkeys-lru`` or ``volatile-ttl`` policy).

A backend that cannot be reached raises :class:`CacheUnavailable`; the middleware then answers
from the upstream (the cache fails open).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cachetools import TLRUCache

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

__all__ = [
    "KEY_BYTES",
    "CacheUnavailable",
    "EmbeddingsCacheObserver",
    "MemoryVectorCache",
    "RedisVectorCache",
    "VectorCache",
]

KEY_BYTES = 32


class CacheUnavailable(Exception):
    """The cache backend could not be reached; the request goes to the upstream instead."""


class VectorCache(Protocol):
    """Stored vectors (bytes) by 32-byte key.

    ``get_many`` answers position by position (``None`` for a key it does not hold, or no longer
    holds); ``set_many`` stores each entry for ``ttl_s`` seconds, replacing an existing one. Both
    raise :class:`CacheUnavailable` when the backend cannot be reached, and nothing else.
    """

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def set_many(self, entries: Mapping[bytes, bytes], ttl_s: int) -> None: ...


class EmbeddingsCacheObserver(Protocol):
    """Told what the cache does (metrics). Counts are of input items (positions in a request):
    ``hit``/``missed`` per lookup, ``saved`` the items not sent upstream (cache hits and
    duplicates within a batch); ``evicted`` entries dropped for room and ``held`` the bytes held
    now, from the memory backend."""

    def hit(self, items: int) -> None: ...
    def missed(self, items: int) -> None: ...
    def saved(self, items: int) -> None: ...
    def evicted(self, entries: int) -> None: ...
    def held(self, bytes_held: int) -> None: ...


def _size(vector: bytes) -> int:
    return len(vector) + KEY_BYTES


class _Entries(TLRUCache[bytes, bytes]):
    """A TLRU cache that counts the entries it evicts for room (expiry is not eviction)."""

    evictions = 0

    def popitem(self) -> tuple[bytes, bytes]:
        item = super().popitem()
        self.evictions += 1
        return item


class MemoryVectorCache:
    """In-process vectors, at most ``max_bytes`` of vector and key bytes; ``timer`` is the
    monotonic clock the TTL is measured on."""

    def __init__(
        self,
        max_bytes: int,
        *,
        observer: EmbeddingsCacheObserver | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._observer = observer
        self._ttl_s = 0.0
        self._entries = _Entries(max_bytes, self._expires, timer, _size)

    def _expires(self, _key: bytes, _vector: bytes, now: float) -> float:
        # ttu has no per-item argument: set_many sets the TTL and inserts with no await between.
        return now + self._ttl_s

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        entries = self._entries
        return [entries.get(key) for key in keys]

    async def set_many(self, entries: Mapping[bytes, bytes], ttl_s: int) -> None:
        before = self._entries.evictions
        self._ttl_s = float(ttl_s)
        for key, vector in entries.items():
            if _size(vector) <= self.max_bytes:
                self._entries[key] = vector
        observer = self._observer
        if observer is not None:
            evicted = self._entries.evictions - before
            if evicted:
                observer.evicted(evicted)
            observer.held(int(self._entries.currsize))

    @property
    def bytes_held(self) -> int:
        """Vector and key bytes of the entries not yet expired (never above ``max_bytes``)."""
        self._entries.expire()
        return int(self._entries.currsize)

    @property
    def evictions(self) -> int:
        """Entries evicted for room so far."""
        return self._entries.evictions

    def __len__(self) -> int:
        self._entries.expire()
        return len(self._entries)


class RedisVectorCache:
    """Vectors in Redis under ``<prefix><hex key>``, shared by every replica using it.

    The client is the caller's (not closed here). A ``redis`` error, or a connection failure,
    becomes :class:`CacheUnavailable`. With a ``RedisCluster`` client the lookup is split by slot
    (``mget_nonatomic``); the keys carry no hash tag, so entries spread over the cluster.
    """

    def __init__(self, client: Redis | RedisCluster, *, prefix: str = "sg:emb:") -> None:
        try:
            from redis.asyncio import RedisCluster
            from redis.exceptions import RedisError
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                "The redis embeddings cache needs the 'redis' extra: pip install 'sidegate[redis]'"
            ) from exc
        if client.get_encoder().decode_responses:
            raise ValueError("the embeddings cache stores bytes: use decode_responses=False")
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self.prefix = prefix

    def _name(self, key: bytes) -> str:
        return self.prefix + key.hex()

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        names = [self._name(key) for key in keys]
        client: Any = self._client
        try:
            if self._cluster:
                values = await client.mget_nonatomic(names)
            else:
                values = await client.mget(names)
        except self._errors as exc:
            raise CacheUnavailable(f"redis: {exc}") from exc
        return [v if isinstance(v, bytes) and v else None for v in values]

    async def set_many(self, entries: Mapping[bytes, bytes], ttl_s: int) -> None:
        if not entries:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, vector in entries.items():
                    pipe.set(self._name(key), vector, ex=ttl_s)
                await pipe.execute()
        except self._errors as exc:
            raise CacheUnavailable(f"redis: {exc}") from exc
