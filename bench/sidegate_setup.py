"""The sidegate configs under test, rendered into the run's directory from ``bench/configs/``.

``bare.yaml`` and ``full.yaml`` are used as they are (``${BENCH_*}`` is sidegate's own environment
interpolation, set by :func:`sidegate_env`). ``limits.yaml`` (budgets and per-team rate limits) is
merged deeply into ``full.yaml`` when ``sidegate check`` accepts the result; when it does not, the
full chain runs without it and the report says so.

``python -m bench.sidegate_setup DIR UPSTREAM`` does the same for the shell tools
(``bench/instructions.sh``, ``bench/cpu_split.sh``): it writes the configs and the chat wrk script
into DIR and prints the ``export`` lines they run with (``BENCH_*``, ``BENCH_BARE``,
``BENCH_FULL``, ``BENCH_CHAT_LUA``).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .load import render_lua
from .targets import REPO, SIDEGATE
from .workloads import BENCH_KEY, WORKLOADS

__all__ = ["Configs", "deep_merge", "render_configs", "sidegate_env", "workers_supported"]

TEMPLATES = Path(__file__).with_name("configs")


@dataclass(frozen=True, slots=True)
class Configs:
    """The rendered configs, and whether the full chain carries budgets and limits."""

    bare: Path
    full: Path
    limits: bool
    note: str


def sidegate_env(upstream: str, db: Path) -> dict[str, str]:
    """The environment the config templates interpolate."""
    digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    return {"BENCH_UPSTREAM": upstream, "BENCH_KEY_HASH": f"sha256:{digest}", "BENCH_DB": str(db)}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in: mappings key by key, anything else replaced."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((TEMPLATES / name).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"bench/configs/{name} is not a mapping")
    return data


def _check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIDEGATE), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={**os.environ, **env},
    )


def render_configs(directory: Path, env: dict[str, str]) -> Configs:
    """Write ``sidegate-bare.yaml`` and ``sidegate-full.yaml`` into ``directory``.

    Raises RuntimeError when the bare or the full config (without limits) does not pass
    ``sidegate check``: the harness itself is out of date then.
    """
    bare = directory / "sidegate-bare.yaml"
    bare.write_text((TEMPLATES / "bare.yaml").read_text())
    full = directory / "sidegate-full.yaml"
    done = _check(bare, env)
    if done.returncode != 0:
        raise RuntimeError(f"bench/configs/bare.yaml fails sidegate check:\n{done.stderr}")
    with_limits = deep_merge(_load("full.yaml"), _load("limits.yaml"))
    full.write_text(yaml.safe_dump(with_limits, sort_keys=False))
    done = _check(full, env)
    if done.returncode == 0:
        return Configs(bare, full, True, "budgets + per-team rate limits (limits.yaml) accepted")
    first = (done.stderr.strip().splitlines() or ["?"])[0]
    full.write_text((TEMPLATES / "full.yaml").read_text())
    again = _check(full, env)
    if again.returncode != 0:
        raise RuntimeError(f"bench/configs/full.yaml fails sidegate check:\n{again.stderr}")
    return Configs(
        bare,
        full,
        False,
        f"this sidegate refuses limits.yaml ({first}); sidegate-full runs WITHOUT budgets and "
        "per-team rate limits",
    )


def workers_supported() -> bool:
    """Whether the installed ``sidegate serve`` has ``--workers``."""
    done = subprocess.run(
        [str(SIDEGATE), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    return "--workers" in done.stdout


def main(argv: list[str] | None = None) -> int:
    """Render the configs and the chat wrk script into DIR; print the environment to export."""
    directory, upstream = (sys.argv[1:] if argv is None else argv)[:2]
    work = Path(directory)
    env = sidegate_env(upstream, work / "db.sqlite")
    configs = render_configs(work, env)
    env |= {
        "BENCH_BARE": str(configs.bare),
        "BENCH_FULL": str(configs.full),
        "BENCH_CHAT_LUA": str(render_lua(WORKLOADS["chat"], work)),
    }
    print("".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()), end="")
    if not configs.limits:
        print(f"echo {shlex.quote('note: ' + configs.note)} >&2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
