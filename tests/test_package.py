"""The package as users get it: its public names and the subpackages a wheel must contain."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import sidegate

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves() -> None:
    assert sidegate.__all__
    for name in sidegate.__all__:
        assert getattr(sidegate, name) is not None, name


def test_every_code_folder_is_packaged() -> None:
    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"sidegate"}
    for top in ("config", "proxy", "middlewares"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(("sidegate", *parts)))
    assert found == declared


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported once it has run ``code``."""
    script = f"import sys\n{code}\nprint(' '.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_config_imports_without_aiohttp() -> None:
    modules = _modules_after("import sidegate.config")
    assert "sidegate.config" in modules
    assert "aiohttp" not in modules


def test_sqlite_is_loaded_only_for_a_sqlite_store(tmp_path: Path) -> None:
    upstreams = (
        "upstreams: {m: {kind: meridian, base_url: 'http://127.0.0.1:9',"
        " keys: [{id: k, secret: sk-test-0000000000}], models: [m-1]}}\n"
    )
    stores = {
        "memory": "{kind: memory}",
        "redis": "{kind: redis, url: 'redis://127.0.0.1:6379/15'}",  # built, never connected
        "sqlite": f"{{kind: sqlite, path: '{tmp_path}/s.db'}}",
    }
    for kind, store in stores.items():
        config = tmp_path / f"{kind}.yaml"
        config.write_text(f"store: {store}\n{upstreams}")
        modules = _modules_after(f"from sidegate import create_app\ncreate_app({str(config)!r})")
        assert ("sqlite3" in modules) is (kind == "sqlite"), kind


def test_the_sqlite_backend_is_still_a_public_name_of_the_store_package() -> None:
    modules = _modules_after("from sidegate.middlewares.store import SqliteStores")
    assert "sqlite3" in modules
    from sidegate.middlewares import store

    assert store.SqliteStores.__name__ == "SqliteStores"
    assert "SqliteStores" in store.__all__
