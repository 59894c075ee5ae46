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


def test_config_imports_without_aiohttp() -> None:
    code = "import sys, sidegate.config; print('aiohttp' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
