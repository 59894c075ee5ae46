"""Opening a backend by name, as ``store:`` in the config describes it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from .memory import MemoryStores
from .protocols import Stores
from .types import COMMIT_RETENTION_S, StoreUnavailable

__all__ = ["REDIS_DEFAULTS", "StoreKind", "open_stores"]

StoreKind = Literal["memory", "sqlite", "redis"]

REDIS_DEFAULTS: Mapping[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
"""Client options of a Redis opened by URL: a budget check fails fast when Redis is gone."""


async def open_stores(
    kind: StoreKind,
    *,
    path: str = "sidegate.db",
    url: str = "redis://127.0.0.1:6379/0",
    clock: Callable[[], float] = time.time,
    commit_retention_s: float = COMMIT_RETENTION_S,
    redis_options: Mapping[str, Any] | None = None,
) -> Stores:
    """Open the ``kind`` backend: ``sqlite`` at ``path``, ``redis`` at ``url``; close it with
    ``await stores.close()``.

    ``redis`` is imported only here, and a missing ``redis`` extra is an ImportError naming it.
    The SQLite backend too is imported only when asked for (here, by the package's lazy
    ``SqliteStores``, or by ``create_app`` for a sqlite config): ``sqlite3`` and its modules are
    about 1 MB of a memory- or Redis-store process's RSS that it never uses.
    Opening Redis does not connect; the first operation (or :meth:`Stores.ping`) does, and an
    unreachable store raises :class:`StoreUnavailable` then. A Redis client made from ``url``
    retries once without backoff (``redis_options`` overrides that and :data:`REDIS_DEFAULTS`).
    """
    if kind == "memory":
        return MemoryStores(clock=clock, commit_retention_s=commit_retention_s)
    if kind == "sqlite":
        from .sqlite import SqliteStores

        return await SqliteStores.open(path, clock=clock, commit_retention_s=commit_retention_s)
    if kind == "redis":
        from .redis import RedisStores

        client = _redis_client(url, redis_options or {})
        return RedisStores(
            client, owns_client=True, clock=clock, commit_retention_s=commit_retention_s
        )
    raise ValueError(f"unknown store kind {kind!r}")


def _redis_client(url: str, options: Mapping[str, Any]) -> Any:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    merged = {**REDIS_DEFAULTS, "retry": Retry(NoBackoff(), 1), **options}
    try:
        return Redis.from_url(url, **merged)
    except ValueError as exc:
        raise StoreUnavailable("The redis store URL is not valid.") from exc
