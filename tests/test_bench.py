"""The benchmark harness's pure parts, and its mock upstream and passthrough answering correctly.

No load is generated here (wrk never runs): speed is what ``python -m bench`` measures, never a
unit test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from bench import cli as bench_cli
from bench import pool, procstat, sse_client, targets
from bench.cli import select
from bench.embeddings_cache import resolution_note
from bench.knockout import create_knocked_out
from bench.knockout import main as knockout_main
from bench.load import LoadResult, cpu_speed_ms, parse_wrk_output, render_lua
from bench.passthrough import make_app
from bench.profile import package_of, parse_collapsed
from bench.report import fmt, meets, render, render_table, verdicts
from bench.runner import (
    ROWS,
    SECTIONS,
    TARGETS,
    Options,
    Results,
    _interleaved,
    _Live,
    _merged,
    _Slice,
    machine,
)
from bench.sidegate_setup import TEMPLATES, deep_merge, sidegate_env
from bench.stats import median, percentile, ratio
from bench.summary import Measurement, aggregate
from bench.targets import Process, free_port, probe, start_passthrough, wait_ready
from bench.upstream import UpstreamSettings, start_upstream
from bench.workloads import (
    BENCH_KEY,
    CHAT_BODY,
    EMBED_BODY,
    EMBED_DIMENSIONS,
    EMBED_INPUTS,
    STREAM_BODY,
    WORKLOADS,
)
from sidegate.config import load_config
from sidegate.proxy.state import STATE_KEY
from tests.conftest import AiohttpServer, Exits

AUTH = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
EVENTS = 5

# -- /proc -------------------------------------------------------------------------------------


def test_stat_ticks_are_utime_plus_stime_even_with_a_strange_command_name() -> None:
    fields = ["S", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "250", "75", "11", "12"]
    stat = "4242 (we (ird) name) " + " ".join(fields) + " 20 0 1 0 0"
    assert procstat.parse_stat_ticks(stat) == 325


def test_status_lines_in_kb() -> None:
    status = "Name:\tpython\nVmHWM:\t   76416 kB\nVmRSS:\t   69620 kB\n"
    assert procstat.parse_status_kb(status, "VmHWM") == 76416
    assert procstat.parse_status_kb(status, "VmRSS") == 69620
    assert procstat.parse_status_kb(status, "VmSwap") is None


def test_cpu_ms_per_request_from_two_samples() -> None:
    before = procstat.CpuSample(1_000, ticks_per_s=100)
    after = procstat.CpuSample(1_250, ticks_per_s=100)  # 2.5 s of CPU
    assert procstat.cpu_ms_per_request(before, after, 1_000) == pytest.approx(2.5)
    assert procstat.cpu_ms_per_request(before, after, 0) is None


def test_the_embeddings_benchmark_says_what_a_cpu_tick_is_worth_a_request() -> None:
    # 500 requests at 100 ticks a second: 0.48 against 0.50 ms is one tick apart.
    assert "ticks of 10 ms: 0.020 ms a request over 500" in resolution_note(500, 100)
    assert "0.005 ms a request over 2000" in resolution_note(2000, 100)
    assert "ticks of 4 ms: 0.002 ms a request over 2000" in resolution_note(2000, 250)


def test_the_noise_on_the_proxys_cpu_is_what_it_did_besides_the_proxy() -> None:
    stat = (
        "cpu  900 0 300 5000 10 0 0 0 0 0\n"
        "cpu0 400 0 100 2000 5 0 0 20 0 0\n"
        "cpu1 500 0 200 3000 5 0 0 0 0 0\n"
    )
    assert procstat.parse_core_ticks(stat, 0) == (520, 2525)  # steal counts as busy
    assert procstat.parse_core_ticks(stat, 1) == (700, 3705)
    with pytest.raises(ValueError, match="cpu2"):
        procstat.parse_core_ticks(stat, 2)
    # 1000 ticks elapsed, 900 busy, 800 of them the proxy's own: 10% went elsewhere.
    assert procstat.other_share((0, 0), (900, 1000), 800) == pytest.approx(0.1)
    assert procstat.other_share((0, 0), (900, 1000), 950) == 0.0
    assert procstat.other_share((5, 5), (5, 5), 0) is None


def test_a_cpu_line_without_a_steal_field_is_left_out_of_the_steal_shares() -> None:
    stat = "cpu  900 0 300 5000\ncpu0 400 0 100 1970 5 0 0 25\ncpu1 500 0 200 3000\n"
    assert procstat.parse_steal_shares(stat) == {"cpu0": 0.01}


def test_the_load_average_is_its_first_three_fields_or_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench_cli, "read_text", lambda path: "0.51 0.99 1.12 2/187 4242")
    assert bench_cli._loadavg() == "0.51 0.99 1.12"
    monkeypatch.setattr(bench_cli, "read_text", lambda path: None)  # no /proc, or unreadable
    assert bench_cli._loadavg() == "?"


def test_the_steal_between_two_samples_is_what_the_hypervisor_took_between_them() -> None:
    # Since boot the hypervisor took 1% of CPU 0; of the 1000 ticks between the samples, 30.
    before = "cpu  0 0 0 0\ncpu0 400 0 100 1970 5 0 0 25\ncpu1 500 0 200 3000 0 0 0 0\n"
    after = "cpu  0 0 0 0\ncpu0 900 0 200 2335 10 0 0 55\ncpu1 500 0 200 4000 0 0 0 0\n"
    assert procstat.parse_steal_shares(before) == {"cpu0": 0.01, "cpu1": 0.0}
    assert procstat.parse_steal_shares(after, since=before) == pytest.approx(
        {"cpu0": 0.03, "cpu1": 0.0}
    )
    assert procstat.parse_steal_shares(after, since=after) == {"cpu0": 0.0, "cpu1": 0.0}
    assert procstat.parse_steal_shares("", since=before) == {}


def test_py_spy_stacks_are_summed_by_their_innermost_frame() -> None:
    raw = (
        "<module> (bench/passthrough.py:72);run (asyncio/base_events.py:1) 7\n"
        "main (sidegate/proxy/cli.py:1);_transaction (sidegate/middlewares/store/db.py:9) 5\n"
        "main (sidegate/proxy/cli.py:1);_transaction (sidegate/middlewares/store/db.py:10) 3\n"
        "not a stack\n"
    )
    profile = parse_collapsed(raw)
    assert profile.samples == 15
    assert profile.packages == {"asyncio": 7, "sidegate": 8}
    assert profile.self_time["_transaction (sidegate/middlewares/store/db.py)"] == 8
    assert package_of("aiohttp/web_protocol.py") == "aiohttp"
    assert package_of("/usr/lib/python3.11/uuid.py") == "python stdlib/other"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_samples_of_a_live_process_and_its_children() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        parent = os.getpid()
        assert child.pid in procstat.children(parent)
        alone = procstat.sample_cpu(parent)
        family = procstat.sample_cpu(parent, with_children=True)
        assert family.ticks >= alone.ticks >= 0
        rss = procstat.memory_kb(parent)
        peak = procstat.memory_kb(parent, "VmHWM")
        assert rss is not None
        assert peak is not None
        assert peak >= rss > 0
    finally:
        child.kill()
        child.wait()


# -- statistics, aggregation, the table --------------------------------------------------------


def test_percentile_interpolates_and_median_skips_missing_values() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 50) == 2.5
    assert percentile(samples, 100) == 4.0
    assert percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile(samples, 101)
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None


def test_ratio() -> None:
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_a_rows_slices_add_up_to_one_measurement() -> None:
    """CPU per request is over all the slices' requests (a slow slice with few requests weighs
    by its requests, not as one slice in a mean); latencies are the slices' median."""
    ticks = procstat.TICKS_PER_S

    def piece(requests: int, cpu_s: float, p50: float, busy: int, total: int) -> _Slice:
        load = LoadResult(requests, 1, 2.0, p50, p50 * 3, detail="timeout 1")
        return _Slice(load, round(cpu_s * ticks), 1, (busy, total))

    merged = _merged(
        Measurement("chat-c16", "passthrough", 0),
        [
            piece(3000, 0.6, 1.0, 70, 100),
            piece(1000, 0.4, 4.0, 50, 100),  # a slow slice: 0.4 ms a request
            piece(3000, 0.6, 1.5, 60, 100),
        ],
    )
    assert merged.requests == 7000
    assert merged.errors == 3
    assert merged.rps == pytest.approx(7000 / 6.0)
    assert merged.cpu_ms == pytest.approx(1.6 * 1000 / 7000)  # not the mean of 0.2, 0.4, 0.2
    assert merged.p50_ms == pytest.approx(1.5)
    assert merged.p99_ms == pytest.approx(4.5)
    own = round(1.6 * ticks)
    assert merged.other_cpu_pct == pytest.approx((180 - own) / 300 * 100)
    assert merged.detail == "timeout 1"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_targets_take_a_rows_slices_in_turn_after_a_warm_up_each(tmp_path: Path) -> None:
    """What rows and the workers section share: A B C A B C ..., so a drift of the machine's
    speed weighs on every target (or worker count) alike, not on whichever ran during it."""
    sleeper = subprocess.Popen(["sleep", "30"])  # stands in for the mock: its CPU is sampled
    upstream = Process("upstream", sleeper, "http://127.0.0.1:9", tmp_path / "upstream.log")
    calls: list[tuple[str, float]] = []

    def load(url: str, seconds: float) -> LoadResult:
        calls.append((url, seconds))
        return LoadResult(len(calls), 0, seconds, 1.0, 2.0)

    live = [_Live(name, None, f"http://{name}") for name in ("a", "b", "c")]
    options = Options(duration_s=3.0, warmup_s=0.5, slices=3)
    try:
        taken = _interleaved(options, live, load, upstream, None)
    finally:
        sleeper.kill()
        sleeper.wait()
    urls = [url for url, _ in calls]
    assert urls == ["http://a", "http://b", "http://c"] * 4
    assert [seconds for _, seconds in calls] == [0.5] * 3 + [1.0] * 9
    assert [[one.result.requests for one in slices] for slices in taken] == [
        [4, 7, 10],
        [5, 8, 11],
        [6, 9, 12],
    ]


def test_ratios_are_taken_within_a_run_then_the_median_over_runs() -> None:
    def m(target: str, run: int, cpu: float, rps: float, ttfb: float) -> Measurement:
        return Measurement("chat-c16", target, run, 100, 0, rps, 1.0, 2.0, cpu, ttfb_p50_ms=ttfb)

    aggs = aggregate(
        [
            m("passthrough", 0, 0.5, 2000, 1.0),
            m("sidegate-bare", 0, 0.6, 1800, 1.2),  # 1.2x the floor of run 0
            m("passthrough", 1, 1.0, 1000, 2.0),  # a slower run: the floor moved too
            m("sidegate-bare", 1, 1.4, 800, 2.4),  # 1.4x the floor of run 1
        ]
    )
    bare = aggs[("chat-c16", "sidegate-bare")]
    assert bare.runs == 2
    assert bare.requests == 200
    assert bare.cpu_ratio == pytest.approx(1.3)
    assert bare.cpu_ratios == pytest.approx([1.2, 1.4])
    assert bare.rps_ratio == pytest.approx(0.85)
    assert bare.ttfb_added_ms == pytest.approx(0.3)
    assert bare.get("cpu_ms") == pytest.approx(1.0)
    floor = aggs[("chat-c16", "passthrough")]
    assert floor.cpu_ratio is None


def _invocation_json(
    directory: Path,
    floors: list[float],
    ratios: list[float],
    scales: list[float],
    steal: dict[str, float] | None = None,
) -> Path:
    """A results.json with one sse-c1 row per run (the floor, and bare at ``ratio`` times it),
    and what the hypervisor took during the invocation when ``steal`` is given."""
    measurements = []
    workers = []
    for run, (floor, r, scale) in enumerate(zip(floors, ratios, scales, strict=True)):
        measurements += [
            Measurement("sse-c1", "passthrough", run, 100, 0, 1000, cpu_ms=floor, ttfb_p50_ms=1.0),
            Measurement(
                "sse-c1", "sidegate-bare", run, 100, 0, 900, cpu_ms=floor * r, ttfb_p50_ms=1.5
            ),
        ]
        workers += [
            Measurement("workers-1", "sidegate-bare", run, 100, 0, rps=1000.0),
            Measurement("workers-2", "sidegate-bare", run, 100, 0, rps=1000.0 * scale),
        ]
    directory.mkdir()
    (directory / "results.json").write_bytes(
        orjson.dumps(
            {
                "meta": {} if steal is None else {"steal_during": steal},
                "measurements": [m.to_json() for m in measurements],
                "workers": [m.to_json() for m in workers],
            }
        )
    )
    return directory


def test_runs_of_several_invocations_are_pooled_against_their_own_floors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The two invocations number their runs alike but their floors differ fourfold: a run matched
    # with the other invocation's floor would read 0.3x or 4.8x, not its own ratio.
    first = _invocation_json(
        tmp_path / "a", [0.2, 0.2], [1.1, 1.3], [1.7, 1.5], {"cpu0": 0.0279, "cpu1": 0.0739}
    )
    second = _invocation_json(tmp_path / "b", [0.8, 0.8], [1.15, 1.25], [1.8, 1.65])
    invocations = [pool.load(first), pool.load(second)]
    assert [i.steal_during for i in invocations] == [{"cpu0": 0.0279, "cpu1": 0.0739}, None]

    (bare,) = pool.pool(invocations)
    assert (bare.row, bare.target, bare.line) == ("sse-c1", "sidegate-bare", 1.2)
    assert sorted(bare.ratios) == pytest.approx([1.1, 1.15, 1.25, 1.3])
    assert bare.median == pytest.approx(1.2)
    assert bare.over == 2
    assert bare.by_invocation == pytest.approx([1.2, 1.2])

    (scaling,) = pool.pool_workers(invocations)
    assert sorted(scaling.ratios) == pytest.approx([1.5, 1.65, 1.7, 1.8])
    assert scaling.over == 1  # under 1.6x: the one run that missed the workers goal
    assert scaling.by_invocation == pytest.approx([1.6, 1.725])

    assert pool.main([str(first), str(second)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "| sse-c1 | sidegate-bare | 4 | 1.200× | 1.100–1.300 | 2 over 1.2× | 1.200, 1.200 |" in out
    )
    assert "| sidegate-bare | 4 | 0.500 |" in out  # the stream's added first byte, pooled
    assert (
        "| workers | sidegate-bare | 4 | 1.675× | 1.500–1.800 | 1 under 1.6× | 1.600, 1.725 |"
        in out
    )
    # the hypervisor's share during each invocation that recorded it; none said for the other
    assert "| a | cpu0 2.79%, cpu1 7.39% |" in out
    assert "| b |" not in out
    assert pool.main([]) == 2


def test_a_ratio_is_written_to_two_decimals_unless_two_would_hide_its_side_of_the_line() -> None:
    assert pool.figure(1.172, 1.2) == "1.17"
    assert pool.figure(1.185, 1.2) == "1.185"  # a final 5 is not rounded either way
    assert pool.figure(1.1989, 1.2) == "1.199"  # "1.20" would read the line itself
    assert pool.figure(1.2041, 1.2) == "1.204"
    assert pool.figure(1.996, 2.0) == "1.996"
    assert pool.figure(1.996, 1.2) == "2.00"  # far from its own line: two decimals


def test_pooled_rows_print_as_the_readme_writes_a_sets_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _invocation_json(tmp_path / "a", [0.2, 0.2], [1.24, 1.3], [1.7, 1.7])
    second = _invocation_json(tmp_path / "b", [0.8, 0.8], [1.16, 1.3], [1.7, 1.7])

    assert pool.main(["--markdown", str(first), str(second)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "| row | bare | full | bare by invocation | full by invocation | floor CPU ms/req |"
    )
    # bare's median over the four runs misses its line: bold; no full chain measured: a dash
    assert lines[2] == "| sse-c1 | **1.27×** (1.16–1.30) | — | 1.27, 1.23 | — | 0.200–0.800 |"
    assert len(lines) == 3


ROUND = Path(__file__).resolve().parents[1] / "bench" / "round.sh"
CHAT_COMMAND = (
    "python -m bench --only passthrough,sidegate-bare,sidegate-full,chat-c1,chat-c16,chat-c64,"
    "sse-c16 --runs 3"
)


def test_a_vms_round_lists_commands_the_harness_has() -> None:
    done = subprocess.run(
        ["bash", str(ROUND)],
        env={**os.environ, "DRY": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    commands = done.stdout.splitlines()
    # two sets of three chat invocations, the diagnoses between them
    chats = [i for i, command in enumerate(commands) if command == CHAT_COMMAND]
    assert chats[:3] == [0, 1, 2]
    assert len(chats) == 6
    assert chats[3:] == [chats[3], chats[3] + 1, chats[3] + 2]
    between = commands[chats[2] + 1 : chats[3]]
    assert any(command.startswith("BUSY=1 bench/cpu_split.sh") for command in between)
    for command in commands:
        words = command.split()
        settings = [w for w in words if re.fullmatch(r"[A-Z]+=\S+", w)]
        assert {s.split("=")[0] for s in settings} <= {"BUSY", "CACHESIM", "WITHOUT"}, command
        program, *args = words[len(settings) :]
        if program == "python":
            assert args[0] == "-m"
            module = args[1]
            if module == "bench":
                select(args[args.index("--only") + 1])  # every row, section and target known
            else:
                assert (ROUND.parents[1] / Path(*module.split("."))).with_suffix(".py").is_file()
        else:
            script = ROUND.parents[1] / program
            assert script.is_file(), command
            assert os.access(script, os.X_OK), command


def test_table_aligns_numbers_right_and_text_left() -> None:
    table = render_table(
        ["row", "req/s", "ratio"], [["chat-c1", "1,234", "1.20×"], ["x", "5", "—"]]
    )
    assert table.splitlines() == [
        "| row     | req/s | ratio |",
        "| ------- | ----: | ----: |",
        "| chat-c1 | 1,234 | 1.20× |",
        "| x       |     5 |     — |",
    ]
    with pytest.raises(ValueError, match="cells"):
        render_table(["a", "b"], [["only one"]])
    assert fmt(None) == "—"
    assert fmt(1234.5, 0) == "1,234"
    assert fmt(1.23456, 3, " ms") == "1.235 ms"


# -- wrk, --only, the configs --------------------------------------------------------------------

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:9301/v1/chat/completions
  1 threads and 16 connections
Requests/sec:   2100.10
BENCH_RESULT {"requests": 4200, "duration_us": 2000000, "bytes": 1, "errors": {"connect": 0, \
"read": 0, "write": 0, "status": 3, "timeout": 1}, "latency_us": {"p50": 7245, "p90": 10478, \
"p99": 21265, "mean": 7741.6, "max": 33831}}
"""


def test_wrk_output_is_parsed_from_the_lua_done_line() -> None:
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.requests == 4200
    assert result.rps == pytest.approx(2100.0)
    assert (result.p50_ms, result.p99_ms) == (pytest.approx(7.245), pytest.approx(21.265))
    assert result.errors == 4
    assert result.detail == "status 3, timeout 1"
    with pytest.raises(ValueError, match="BENCH_RESULT"):
        parse_wrk_output("Requests/sec: 1\n")


def test_each_workload_renders_a_lua_script(tmp_path: Path) -> None:
    for workload in WORKLOADS.values():
        text = render_lua(workload, tmp_path).read_text()
        assert f'wrk.path = "{workload.path}"' in text
        assert f"[==[{workload.body.decode()}]==]" in text
        assert f"Bearer {BENCH_KEY}" in text
        assert "function done(summary, latency, requests)" in text


TEMPLATE_NAMES = ("full.yaml", "limits.yaml")


def test_the_shell_tools_get_the_harness_configs_and_environment(tmp_path: Path) -> None:
    # bench/instructions.sh and bench/cpu_split.sh eval what this prints.
    done = subprocess.run(
        [sys.executable, "-m", "bench.sidegate_setup", str(tmp_path), "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    exported = dict(
        line.removeprefix("export ").split("=", 1)
        for line in done.stdout.splitlines()
        if line.startswith("export ")
    )
    assert exported == {
        **sidegate_env("http://127.0.0.1:9", tmp_path / "db.sqlite"),
        "BENCH_BARE": str(tmp_path / "sidegate-bare.yaml"),
        "BENCH_FULL": str(tmp_path / "sidegate-full.yaml"),
        "BENCH_CHAT_LUA": str(tmp_path / "wrk-chat.lua"),
    }
    full, limits = (yaml.safe_load((TEMPLATES / name).read_text()) for name in TEMPLATE_NAMES)
    with_limits = deep_merge(full, limits)
    assert yaml.safe_load((tmp_path / "sidegate-full.yaml").read_text()) == with_limits
    assert f"Bearer {BENCH_KEY}" in (tmp_path / "wrk-chat.lua").read_text()


def test_only_selects_targets_rows_and_sections_and_keeps_the_floor() -> None:
    every_row = tuple(row.name for row in ROWS)
    assert select(None) == (TARGETS, every_row, SECTIONS, "")
    targets, rows, sections, note = select("sidegate-full,chat-c16")
    assert targets == ("passthrough", "sidegate-full")
    assert (rows, sections) == (("chat-c16",), ())
    assert "passthrough added" in note
    assert select("memory")[1:3] == ((), ("memory",))
    assert select("direct")[:3] == (("direct",), every_row, SECTIONS)
    with pytest.raises(ValueError, match="unknown in --only: nope"):
        select("nope")


def test_the_config_templates_are_valid_sidegate_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in sidegate_env("http://127.0.0.1:9", tmp_path / "b.db").items():
        monkeypatch.setenv(name, value)
    bare = load_config(TEMPLATES / "bare.yaml")
    assert bare.retry.max_attempts == 1
    assert bare.store.kind == "memory"
    full = load_config(TEMPLATES / "full.yaml")
    assert len(full.upstreams["meridian"].keys) == 2
    assert full.rate_limit_headers.mode == "team"
    merged = deep_merge(
        yaml.safe_load((TEMPLATES / "full.yaml").read_text()),
        yaml.safe_load((TEMPLATES / "limits.yaml").read_text()),
    )
    assert merged["teams"]["bench"]["models"]  # kept from full.yaml
    assert merged["teams"]["bench"]["budget"]  # added by limits.yaml
    path = tmp_path / "full-with-limits.yaml"
    path.write_text(yaml.safe_dump(merged))
    with_limits = load_config(path)
    assert with_limits.store.kind == "sqlite"


# -- the mock upstream and the passthrough -----------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    server, url = await start_upstream(settings=UpstreamSettings(events=EVENTS))
    try:
        yield url
    finally:
        server.close()
        await server.wait_closed()


async def _post(url: str, body: bytes, headers: dict[str, str] = AUTH) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, response.headers, await response.read()


def _check_chat(status: int, headers: Any, body: bytes) -> None:
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    answer = orjson.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["total_tokens"] > 0


def _check_stream(status: int, headers: Any, body: bytes, events: int = EVENTS) -> None:
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    frames = [frame for frame in body.split(b"\n\n") if frame]
    assert frames[-1] == b"data: [DONE]"
    chunks = [orjson.loads(frame.removeprefix(b"data: ")) for frame in frames[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == events
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _check_embeddings(status: int, body: bytes) -> None:
    assert status == 200
    answer = orjson.loads(body)
    assert [item["index"] for item in answer["data"]] == list(range(len(EMBED_INPUTS)))
    assert all(len(item["embedding"]) == EMBED_DIMENSIONS for item in answer["data"])


async def test_the_mock_answers_every_workload_with_rate_limit_headers(upstream: str) -> None:
    status, headers, body = await _post(upstream + "/v1/chat/completions", CHAT_BODY)
    _check_chat(status, headers, body)
    for name in ("limit", "remaining", "reset"):
        assert int(headers[f"x-ratelimit-{name}-requests"]) > 0
        assert int(headers[f"x-ratelimit-{name}-tokens"]) > 0
    status, headers, body = await _post(upstream + "/v1/chat/completions", STREAM_BODY)
    _check_stream(status, headers, body)
    more = {**AUTH, "x-bench-events": "12"}
    status, headers, body = await _post(upstream + "/v1/chat/completions", STREAM_BODY, more)
    _check_stream(status, headers, body, events=12)
    status, _, body = await _post(upstream + "/v1/embeddings", EMBED_BODY)
    _check_embeddings(status, body)
    first = orjson.loads(body)["data"][3]["embedding"]
    one = orjson.dumps({"model": "meridian-embed-3", "input": [EMBED_INPUTS[3]]})
    status, _, body = await _post(upstream + "/v1/embeddings", one)
    assert orjson.loads(body)["data"][0]["embedding"] == first  # a vector per text, not per slot


async def test_the_mock_sends_usage_only_when_asked_and_refuses_without_a_key(
    upstream: str,
) -> None:
    asked = orjson.dumps({**orjson.loads(STREAM_BODY), "stream_options": {"include_usage": True}})
    _, _, body = await _post(upstream + "/v1/chat/completions", asked)
    assert b'"usage":{"prompt_tokens"' in body
    _, _, body = await _post(upstream + "/v1/chat/completions", STREAM_BODY)
    assert b'"usage"' not in body
    status, _, body = await _post(upstream + "/v1/chat/completions", CHAT_BODY, {})
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, _ = await _post(upstream + "/v1/nothing", CHAT_BODY)
    assert status == 404


async def test_the_mock_reads_requests_split_across_packets_and_kept_alive(upstream: str) -> None:
    host, _, port = upstream.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Content-Length: %d\r\n\r\n" % len(CHAT_BODY)
    )
    try:
        for _ in range(2):  # twice on one connection
            for piece in (head[:20], head[20:], CHAT_BODY[:10], CHAT_BODY[10:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            status_line = await reader.readline()
            assert status_line == b"HTTP/1.1 200 OK\r\n"
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert orjson.loads(await reader.readexactly(length))["object"] == "chat.completion"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_paced_stream_arrives_event_by_event(upstream: str) -> None:
    paced = await sse_client.paced(upstream + "/v1/chat/completions", events=4, pace_ms=40.0)
    assert paced.status == 200
    assert len(paced.arrivals_ms) == 4
    assert paced.arrivals_ms[-1] - paced.arrivals_ms[0] >= 3 * 40.0 * 0.8
    assert paced.streamed
    buffered = sse_client.PacedResult(4, 40.0, [120.0, 120.1, 120.2, 120.3], 200)
    assert not buffered.streamed


async def test_the_ttfb_client_times_streams(upstream: str) -> None:
    result = await sse_client.ttfb(upstream + "/v1/chat/completions", 2, 0.2)
    assert result.requests > 0
    assert result.errors == 0
    assert all(0 < t <= total for t, total in zip(result.ttfb_ms, result.total_ms, strict=True))
    summary = result.summary()
    assert summary["requests"] == result.requests


async def test_the_passthrough_forwards_every_workload(
    upstream: str, aiohttp_server: AiohttpServer
) -> None:
    server = await aiohttp_server(make_app(upstream))
    url = str(server.make_url("")).rstrip("/")
    status, headers, body = await _post(url + "/v1/chat/completions", CHAT_BODY)
    _check_chat(status, headers, body)
    assert "x-ratelimit-limit-requests" in headers
    status, headers, body = await _post(url + "/v1/chat/completions", STREAM_BODY)
    _check_stream(status, headers, body)
    status, _, body = await _post(url + "/v1/embeddings", EMBED_BODY)
    _check_embeddings(status, body)
    status, _, _ = await _post(url + "/v1/chat/completions", CHAT_BODY, {})
    assert status == 401  # the mock's answer, passed through
    assert await asyncio.to_thread(probe, url) == []


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_the_floor_runs_on_the_event_loop_it_is_given(
    upstream: str, tmp_path: Path, loop: str
) -> None:
    process = start_passthrough(
        free_port(), upstream, cpus=None, log=tmp_path / "floor.log", loop=loop
    )
    try:
        await asyncio.to_thread(wait_ready, process)
        assert await asyncio.to_thread(probe, process.url) == []
        maps = await asyncio.to_thread(Path(f"/proc/{process.popen.pid}/maps").read_text)
        assert ("/uvloop/" in maps) is (loop == "uvloop")
    finally:
        process.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_sockets_listening_on_a_port_are_counted_one_per_worker() -> None:
    port = free_port()
    sockets = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sockets.append(sock)
    try:
        assert procstat.listeners(port) == 0  # bound, not yet listening
        sockets[0].listen()
        assert procstat.listeners(port) == 1
        sockets[1].listen()
        with socket.create_connection(("127.0.0.1", port)):  # a connection is not a listener
            assert procstat.listeners(port) == 2
        sockets[0].close()
        assert procstat.listeners(port) == 1
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_a_process_is_ready_only_once_every_worker_listens(
    upstream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker answering is not enough: a load started then would be all that worker's."""
    monkeypatch.setattr(targets, "READY_TIMEOUT_S", 0.5)
    sleeper = await asyncio.to_thread(subprocess.Popen, ["sleep", "30"])  # the mock answers
    try:
        one = Process("one", sleeper, upstream, tmp_path / "one.log")
        await asyncio.to_thread(wait_ready, one)
        two = Process("two", sleeper, upstream, tmp_path / "two.log", workers=2)
        with pytest.raises(RuntimeError, match="1 of 2 listening"):
            await asyncio.to_thread(wait_ready, two)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
async def two_copies(upstream: str, tmp_path: Path) -> AsyncIterator[tuple[Process, list[int]]]:
    """The floor as two copies sharing its port, ready, and the copies' pids; afterwards the
    supervisor is stopped and any copy still there killed, whatever the test did."""
    process = start_passthrough(
        free_port(), upstream, cpus=None, log=tmp_path / "floor.log", workers=2
    )
    copies: list[int] = []
    try:
        await asyncio.to_thread(wait_ready, process)
        copies = procstat.children(process.pid)
        yield process, copies
    finally:
        await asyncio.to_thread(process.stop)
        for pid in copies:  # no orphan is left serving the port
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_two_copies_of_the_floor_share_its_port_and_stop_with_it(
    two_copies: tuple[Process, list[int]],
) -> None:
    process, copies = two_copies
    assert len(copies) == 2
    assert process.with_children
    assert procstat.listeners(process.port) == 2  # both, once ready
    for _ in range(8):  # a connection each, all answered through the shared port
        assert await asyncio.to_thread(probe, process.url) == []
    assert await asyncio.to_thread(process.stop) == 0
    # each copy was stopped and reaped, not left behind
    left = await asyncio.to_thread(lambda: [pid for pid in copies if Path(f"/proc/{pid}").exists()])
    assert left == []


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and pidfds are Linux's")
async def test_the_copies_stop_when_their_supervisor_is_killed_outright(
    two_copies: tuple[Process, list[int]],
) -> None:
    process, copies = two_copies
    assert len(copies) == 2
    exits = Exits(copies)  # opened while they are still its children
    process.popen.kill()  # SIGKILL: no chance to pass anything on
    await asyncio.to_thread(process.popen.wait)
    assert await asyncio.to_thread(exits.wait, 10.0) == []


def test_the_floors_scaling_is_reported_beside_the_workers_goal() -> None:
    def m(target: str, run: int, count: int, rps: float) -> Measurement:
        return Measurement(f"workers-{count}", target, run, 100, 0, rps, 1.0, 2.0, 0.2)

    results = Results()
    results.workers = [
        m("passthrough", 0, 1, 1000),
        m("passthrough", 0, 2, 1500),
        m("sidegate-bare", 0, 1, 1000),
        m("sidegate-bare", 0, 2, 1595),
    ]
    rows = {row[0]: row for row in verdicts(results)}
    # under the goal by 0.005, and shown so: not rounded up to the goal it misses
    assert rows["sidegate-bare --workers 2 req/s vs 1"][1:] == ["1.595×", "≥ 1.6×", "MISSED"]
    assert rows["the floor, 2 copies req/s vs 1 (reference)"][1] == "1.5×"
    assert "sidegate-full --workers 2 req/s vs 1" not in rows  # not measured: no verdict


def test_cpu_verdicts_judge_each_target_on_its_own_line_on_every_row() -> None:
    def m(row: str, target: str, cpu: float) -> Measurement:
        return Measurement(row, target, 0, 100, 0, 1000, 1.0, 2.0, cpu)

    results = Results()
    results.measurements = [
        m("chat-c1", "passthrough", 0.5),
        m("chat-c1", "sidegate-bare", 0.61),  # 1.22x: over bare's line
        m("chat-c1", "sidegate-full", 0.95),  # 1.9x: under the full chain's
        m("sse-c16", "passthrough", 0.5),
        m("sse-c16", "sidegate-bare", 0.55),  # 1.1x: under bare's line
        m("sse-c16", "sidegate-full", 1.05),  # 2.1x: over
        m("sse-c1", "passthrough", 0.5),
        m("sse-c1", "sidegate-bare", 0.65),  # 1.3x: over bare's line, on a stream
        m("sse-c1", "sidegate-full", 0.75),
    ]
    rows = {row[0]: row[1:] for row in verdicts(results)}
    assert rows["bare CPU/req vs floor, chat-c1"] == ["1.22×", "≤ 1.2×", "MISSED"]
    assert rows["full CPU/req vs floor, chat-c1"] == ["1.9×", "≤ 2×", "met"]
    assert rows["full CPU/req vs floor, sse-c16"] == ["2.1×", "≤ 2×", "MISSED"]
    # bare's goal is held on the streams too, as the README's *Where it stands* holds it
    assert rows["bare CPU/req vs floor, sse-c16"] == ["1.1×", "≤ 1.2×", "met"]
    assert rows["bare CPU/req vs floor, sse-c1"] == ["1.3×", "≤ 1.2×", "MISSED"]
    assert rows["full CPU/req vs floor, sse-c1"] == ["1.5×", "≤ 2×", "met"]
    assert "bare CPU/req vs floor, chat-c16" not in rows  # not measured: no verdict


def test_a_figure_on_its_line_meets_the_goal_from_either_side() -> None:
    assert meets(1.2, 1.2)  # at most: CPU, memory, first byte
    assert not meets(1.2001, 1.2)
    assert meets(1.6, 1.6, at_most=False)  # at least: --workers 2
    assert not meets(1.5999, 1.6, at_most=False)
    # bench.pool counts the runs on the wrong side with the same judgement
    pooled = pool.Pooled("workers", "sidegate-bare", [1.6, 1.59, 1.7], [], 1.6, at_most=False)
    assert pooled.over == 1


HALTS = "an idle CPU halts at once"


def _fake_machine(root: Path, *, driver: str | None, poll: str | None, flags: str | None) -> None:
    flagged = f"flags\t\t: {flags}\n" if flags is not None else ""
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text(
        f"processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n{flagged}\n"
        "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    )
    (root / "proc/stat").write_text(
        "cpu  10 0 10 60 0 0 0 20 0 0\n"
        "cpu0 5 0 5 30 0 0 0 10 0 0\n"  # 10 stolen ticks of 50
        "cpu1 5 0 5 30 0 0 0 0 0 0\n"
        "intr 1234\n"
    )
    if driver is not None:
        (root / "sys/devices/system/cpu/cpuidle").mkdir(parents=True)
        (root / "sys/devices/system/cpu/cpuidle/current_driver").write_text(driver + "\n")
    if poll is not None:
        (root / "sys/module/haltpoll/parameters").mkdir(parents=True)
        (root / "sys/module/haltpoll/parameters/guest_halt_poll_ns").write_text(poll + "\n")


def _meta(described: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": "2026-12-05 17:00 UTC",
        "machine": described,
        "python": "3.11.7",
        "aiohttp": "3.14.5",
        "commit": "abc1234",
        "command": "python -m bench",
        "runs": 2,
        "duration_s": 1.0,
        "warmup_s": 1.0,
        "pinning": "none",
        "load_before": "0.0",
    }


@pytest.mark.parametrize(
    ("driver", "poll", "flags", "said"),
    [
        ("haltpoll", "0", None, f"cpuidle driver haltpoll, guest_halt_poll_ns 0 ({HALTS})"),
        ("haltpoll", "200000", None, "cpuidle driver haltpoll, guest_halt_poll_ns 200000."),
        ("intel_idle", None, "fpu monitor", "cpuidle driver intel_idle."),
        (None, None, None, "no cpuidle driver."),
        # VM Q: the kernel writes "none", the haltpoll module's parameter governs nothing, and
        # without MONITOR/MWAIT the kernel's default idle is HLT
        ("none", "200000", "fpu hypervisor avx512f", f"no cpuidle driver ({HALTS})."),
        ("none", None, "fpu monitor hypervisor", "no cpuidle driver."),
    ],
)
def test_the_report_says_how_an_idle_cpu_waits_and_what_the_hypervisor_took(
    tmp_path: Path, driver: str | None, poll: str | None, flags: str | None, said: str
) -> None:
    _fake_machine(tmp_path, driver=driver, poll=poll, flags=flags)
    described = machine(tmp_path)
    assert (described["cpu_model"], described["cpu_family"], described["cpu_model_number"]) == (
        "AMD EPYC",
        "25",
        "17",
    )
    assert described["steal_since_boot"] == {"cpu0": 0.2, "cpu1": 0.0}
    report = render(Results(), _meta(described))
    assert "CPUs (AMD EPYC, family 25 model 17)" in report
    assert f"Idle CPUs: {said}" in report
    assert "Stolen by the hypervisor since boot: cpu0 20.00%, cpu1 0.00%." in report
    during = render(Results(), {**_meta(described), "steal_during": {"cpu0": 0.0219, "cpu1": 0.0}})
    assert (
        "Stolen by the hypervisor since boot: cpu0 20.00%, cpu1 0.00%; "
        "during this invocation: cpu0 2.19%, cpu1 0.00%." in during
    )


def test_the_cpus_speed_is_measured_where_asked_and_none_when_it_cannot_be() -> None:
    ms = cpu_speed_ms(str(min(os.sched_getaffinity(0))))
    assert ms is not None
    assert ms > 0
    assert cpu_speed_ms("4096") is None  # no such CPU: taskset refuses


@pytest.mark.parametrize(
    ("speeds", "line", "note"),
    [
        ([20.0, 21.0, 20.5], "20.0–21.0, the slowest 5% over the fastest.", None),
        (
            [20.0, 21.0, 40.0],
            "20.0–40.0, the slowest 100% over the fastest.",
            "ran Python 100% slower before run 2's chat-c64 than before run 1's chat-c1",
        ),
        ([None, None, None], None, None),  # bench.calibrate could not run: nothing said
    ],
)
def test_a_change_in_the_machines_speed_within_an_invocation_is_noted(
    tmp_path: Path, speeds: list[float | None], line: str | None, note: str | None
) -> None:
    results = Results()
    results.speed = [
        {"run": run, "row": row, "ms": ms}
        for (run, row), ms in zip(
            [(0, "chat-c1"), (1, "chat-c1"), (1, "chat-c64")], speeds, strict=True
        )
    ]
    report = render(results, _meta(machine(tmp_path)))
    header = "Python on the proxies' CPU before each row"
    if line is None:
        assert header not in report
    else:
        assert f"{header} (`python -m bench.calibrate`, ms, best of 3): {line}" in report
    assert ("the machine's speed changed during the invocation" in report) == (note is not None)
    if note is not None:
        assert note in report


def test_a_machine_without_proc_is_described_with_what_is_known(tmp_path: Path) -> None:
    described = machine(tmp_path)
    assert described["cpu_model"] == "?"
    assert described["idle"] == {"driver": None, "guest_halt_poll_ns": None, "halts": None}
    assert described["steal_since_boot"] == {}


def test_the_report_names_the_loop_sidegate_serve_would_choose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench.cli import _loop

    assert (_loop("auto"), _loop("uvloop"), _loop("asyncio")) == (
        "uvloop (auto)",
        "uvloop",
        "asyncio",
    )
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert _loop("auto") == "asyncio (auto)"
    assert _loop("uvloop") == "uvloop (not installed: sidegate will not start)"


async def test_the_limits_microbenchmark_runs_on_both_stores() -> None:
    from bench.limits_micro import run

    for sqlite in (False, True):
        wall, cpu, entries = await run(50, sqlite=sqlite, warmup=10, count=True)
        assert wall > 0
        assert cpu > 0
        assert entries == 60  # every request was metered and written to the store


def test_the_limits_microbenchmark_prints_how_fast_python_ran_around_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.limits_micro import main

    assert main(["20"]) == 0
    line = capsys.readouterr().out
    figures = re.fullmatch(
        r"limits policy: [0-9.]+ us wall, [0-9.]+ us CPU a request \(20 requests\); "
        r"python -m bench\.calibrate read ([0-9.]+) ms before, ([0-9.]+) ms after\n",
        line,
    )
    assert figures is not None, line
    assert all(float(reading) > 0 for reading in figures.groups())
    assert main(["20", "--no-calibrate"]) == 0
    assert "calibrate" not in capsys.readouterr().out


async def test_a_knock_out_takes_its_parts_out_and_the_rest_still_answers(
    upstream: str, aiohttp_server: AiohttpServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in sidegate_env(upstream, tmp_path / "b.db").items():
        monkeypatch.setenv(name, value)
    twice = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]

    async def answers(parts: set[str]) -> tuple[bool, int, tuple[str, ...], str]:
        app = create_knocked_out(parts, TEMPLATES / "bare.yaml")
        server = await aiohttp_server(app)
        url = str(server.make_url("/v1/chat/completions"))
        status, headers, body = await _post(url, CHAT_BODY)
        _check_chat(status, headers, body)
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=CHAT_BODY, headers=[*AUTH.items(), *twice]) as response,
            session.get(server.make_url("/nowhere")) as missing,
        ):
            names = app[STATE_KEY].active.names if app[STATE_KEY].active else ()
            refused = (await missing.json())["error"]["code"]  # the envelope, either way
            return "x-request-id" in headers, response.status, names, refused

    # As shipped: every response has its request id; retry refuses two Idempotency-Keys.
    assert await answers(set()) == (
        True,
        400,
        ("auth", "routing", "ratelimit_headers", "retry", "key_rotation"),
        "not_found",
    )
    # Without the access log (which stamps responses) and retry: no request id, the two keys
    # reach the upstream.
    assert await answers({"access_log", "retry", "ratelimit_headers"}) == (
        False,
        200,
        ("auth", "routing", "key_rotation"),
        "not_found",
    )
    with pytest.raises(RuntimeError, match="has no limits"):
        await answers({"limits"})
    assert knockout_main(["auth", "--", "--config", "x.yaml"]) == 2  # the handler needs it
    assert knockout_main(["retry"]) == 2  # no "--": the usage, not a server
