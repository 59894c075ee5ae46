"""The command line of ``python -m bench``: select, run, print the report, write the JSON.

Needs ``wrk`` (Debian package ``wrk``) and ``taskset`` (``util-linux``); ``--profile`` needs
``py-spy`` in the same environment as Python.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import orjson

from sidegate.proxy.cli import LOOPS, event_loop_factory

from .procstat import parse_steal_shares, read_text
from .report import render, summary_json
from .runner import ROWS, SECTIONS, TARGETS, Options, machine, run
from .targets import REPO

__all__ = ["main", "select"]

RESULTS = Path(__file__).with_name("results")
_NEEDS = {"wrk": "apt-get install -y wrk", "taskset": "apt-get install -y util-linux"}


def select(only: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]:
    """Targets, rows and sections that ``--only`` names (all when None), and a note.

    ``--only`` is a comma-separated list of targets, rows and sections. Rows or sections named
    limit the rows or sections run; targets named limit the targets. The floor (passthrough)
    is always measured with a sidegate target, since every sidegate figure is a ratio to it.
    """
    row_names = tuple(row.name for row in ROWS)
    if not only:
        return TARGETS, row_names, SECTIONS, ""
    tokens = [token.strip() for token in only.split(",") if token.strip()]
    known = set(TARGETS) | set(row_names) | set(SECTIONS)
    unknown = [token for token in tokens if token not in known]
    if unknown:
        raise ValueError(
            f"unknown in --only: {', '.join(unknown)} (choose from {', '.join(sorted(known))})"
        )
    targets = tuple(t for t in TARGETS if t in tokens)
    rows = tuple(r for r in row_names if r in tokens)
    sections = tuple(s for s in SECTIONS if s in tokens)
    note = ""
    if not targets:
        targets = TARGETS
    elif any(t.startswith("sidegate") for t in targets) and "passthrough" not in targets:
        targets = tuple(t for t in TARGETS if t in {*targets, "passthrough"})
        note = "--only: passthrough added (the floor every sidegate row is compared with)"
    if not rows and not sections:
        rows, sections = row_names, SECTIONS
    return targets, rows, sections, note


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per row, 1 run")
    parser.add_argument(
        "--only",
        help="comma-separated targets, rows, sections: "
        + ", ".join([*TARGETS, *(row.name for row in ROWS), *SECTIONS]),
    )
    parser.add_argument("--runs", type=int, help="runs (default 2; medians over them)")
    parser.add_argument("--duration", type=float, help="seconds per row (default 10)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before a row (default 2)")
    parser.add_argument(
        "--slices",
        type=int,
        default=5,
        help="slices of each row, taken by the targets in turn (default 5; at least 1 s each)",
    )
    parser.add_argument("--sustain", type=float, help="seconds of each memory load (default 60)")
    parser.add_argument("--events", type=int, default=20, help="content deltas per SSE stream")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--floor-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the passthrough's event loop (default asyncio: the issue's floor; uvloop: the "
        "same loop as sidegate's, to see the chain's own cost)",
    )
    parser.add_argument(
        "--sidegate-loop",
        choices=LOOPS,
        default="auto",
        help="sidegate serve --loop (default auto: as shipped, uvloop when installed)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy profiles instead of measurements"
    )
    return parser


def _missing_tools(profile: bool) -> list[str]:
    missing = [f"{tool} (install: {how})" for tool, how in _NEEDS.items() if not shutil.which(tool)]
    if profile and not Path(sys.executable).with_name("py-spy").exists():
        missing.append("py-spy (install it into this Python's environment)")
    return missing


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO, check=False, timeout=30
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head}+uncommitted changes" if git("status", "--porcelain") else head


def _loop(choice: str) -> str:
    """What ``sidegate serve --loop choice`` runs on here: what serve itself would choose (this
    Python is the one the targets run on)."""
    try:
        factory = event_loop_factory(choice)
    except RuntimeError:
        return f"{choice} (not installed: sidegate will not start)"
    name = factory.__module__.partition(".")[0]
    return f"{name} (auto)" if choice == "auto" else name


def _loadavg() -> str:
    return " ".join((read_text(Path("/proc/loadavg")) or "?").split()[:3])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = _missing_tools(args.profile)
    if missing:
        print("bench needs: " + "; ".join(missing), file=sys.stderr)
        return 2
    try:
        targets, rows, sections, note = select(args.only)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    quick = args.quick
    pin = not args.no_pin and {0, 1} <= os.sched_getaffinity(0)
    options = Options(
        duration_s=args.duration or (2.0 if quick else 10.0),
        warmup_s=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        runs=args.runs or (1 if quick else 2),
        slices=max(1, args.slices),
        sustain_s=args.sustain or (6.0 if quick else 60.0),
        events=args.events,
        targets=targets,
        rows=rows,
        sections=sections,
        floor_loop=args.floor_loop,
        sidegate_loop=args.sidegate_loop,
        proxy_cpus="0" if pin else None,
        load_cpus="1" if pin else None,
        all_cpus="0,1" if pin else None,
    )
    if pin:
        os.sched_setaffinity(0, {1})  # the orchestrator stays off the proxy's CPU
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y%m%d-%H%M%S") + ("-profile" if args.profile else "")
    directory = RESULTS / (stamp + ("-quick" if quick else ""))
    directory.mkdir(parents=True, exist_ok=True)
    if args.profile:
        from .profile import profile

        profiled = rows if args.only and rows else ("chat-c16", "sse-c16")
        report = profile(options, directory, tuple(r for r in profiled if r != "sse-c1"), _say)
        (directory / "profile.md").write_text(report + "\n")
        print(report)
        _say(f"raw stacks and the report: {directory}")
        return 0
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "commit": _commit(),
        "runs": options.runs,
        "duration_s": options.duration_s,
        "warmup_s": options.warmup_s,
        "slices": options.slices,
        "loops": f"passthrough {options.floor_loop}, sidegate {_loop(options.sidegate_loop)}",
        "pinning": (
            "proxy under test on CPU 0; mock upstream, wrk, SSE client on CPU 1"
            if pin
            else "none (fewer than 2 usable CPUs, or --no-pin): figures are noisier"
        ),
    }
    meta["load_before"] = _loadavg()
    stat = Path("/proc/stat")  # what the hypervisor took during the run, as well as since boot
    stat_before = read_text(stat) or ""
    results = run(options, directory, _say)
    meta["load_after"] = _loadavg()
    meta["steal_during"] = parse_steal_shares(read_text(stat) or "", since=stat_before)
    if note:
        results.notes.insert(0, note)
    report = render(results, meta)
    (directory / "report.md").write_text(report + "\n")
    (directory / "results.json").write_bytes(
        orjson.dumps(summary_json(results, meta), option=orjson.OPT_INDENT_2)
    )
    print(report)
    _say(f"results: {directory / 'results.json'}")
    return 1 if results.problems else 0
