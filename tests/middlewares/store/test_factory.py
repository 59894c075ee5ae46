"""Opening a backend by name, and the package's public surface."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

import sidegate.middlewares.store as store
from sidegate.middlewares.store import MemoryStores, Scope, SqliteStores, open_stores


def test_all_is_complete() -> None:
    assert store.SqliteStores is not None  # imported on first use, bound in the package from then
    public = {
        name
        for name, value in vars(store).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }

    assert set(store.__all__) == public


async def test_open_memory_and_sqlite(tmp_path: Path) -> None:
    memory = await open_stores("memory")
    sqlite = await open_stores("sqlite", path=str(tmp_path / "s.db"))
    try:
        assert isinstance(memory, MemoryStores)
        assert isinstance(sqlite, SqliteStores)
        for opened in (memory, sqlite):
            await opened.ping()
            assert (await opened.budgets.reserve(Scope("t"), "total", 1, 1, "r", 1)).admitted
    finally:
        await sqlite.close()
        await memory.close()


async def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown store kind"):
        await open_stores("etcd")  # type: ignore[arg-type]


async def test_a_bad_redis_url_is_store_unavailable() -> None:
    with pytest.raises(store.StoreUnavailable):
        await open_stores("redis", url="mysql://nope")


def test_scopes_need_a_team() -> None:
    with pytest.raises(ValueError, match="team"):
        Scope("")
    with pytest.raises(ValueError, match="key id"):
        Scope("search", "")
