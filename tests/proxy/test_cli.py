"""The ``sidegate`` command as a user runs it: check, schema, serve, SIGHUP, SIGTERM.

Every server here is a real ``sidegate serve`` subprocess on a free loopback port. Waits on the
process are bounded, and each subprocess is killed in a ``finally`` if it is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidegate.middlewares.api_keys import hash_key
from sidegate.proxy.mock import Fault
from tests.conftest import DEMO_KEY, Upstream
from tests.proxy.serving import EXIT_TIMEOUT_S, POLL_TIMEOUT_S, REPO, SIDEGATE, serve
from tests.proxy.serving import open_logs as _open_logs
from tests.proxy.serving import read_text as _read
from tests.proxy.serving import write_yaml as _write_yaml

DEMO = REPO / "examples" / "demo.yaml"
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hello there"}]}


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ)
    )


# -- check, schema, --help ---------------------------------------------------------------------


def test_check_accepts_the_demo_config() -> None:
    result = _run(str(SIDEGATE), "check", "--config", "examples/demo.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "examples/demo.yaml: ok"
    assert result.stderr == ""


BAD_CONFIG = """\
server:
  port: 99999
  colour: blue
store: {kind: memory}
upstreams:
  meridian:
    kind: meridian
    base_url: http://127.0.0.1:9
    keys:
      - {id: primary, secret: sk-literal-secret-0123456789, note: nope}
      - {id: backup, secret: "${SIDEGATE_CLI_TEST_SECRET}"}
    models: [meridian-1]
models:
  fast: {upstream: nowhere, model: meridian-1}
"""
ENV_SECRET = "sk-from-env-secret-9876543210"


def test_check_lists_every_problem_with_file_and_line_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEGATE_CLI_TEST_SECRET", ENV_SECRET)
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    result = _run(str(SIDEGATE), "check", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    expected = [
        f"{path}:2: server.port: ",
        f"{path}:3: server.colour: unknown key 'colour'",
        f"{path}:10: upstreams.meridian.keys[0].note: unknown key 'note'",
        f"{path}:14: models.fast.upstream: ",
    ]
    for prefix in expected:
        assert sum(line.startswith(prefix) for line in lines) == 1, (prefix, result.stderr)
    assert len(lines) == len(expected), result.stderr
    output = result.stdout + result.stderr
    assert "sk-literal-secret" not in output
    assert ENV_SECRET not in output


def test_check_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = _run(str(SIDEGATE), "check", "--config", str(missing))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{missing}: cannot read the config file")


def test_schema_prints_the_config_json_schema() -> None:
    result = _run(str(SIDEGATE), "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    properties = schema["properties"]
    for section in ("server", "store", "upstreams", "models", "pricing", "auth", "teams"):
        assert section in properties, section
    assert "upstreams" in schema["required"]
    assert schema["additionalProperties"] is False
    server_ref = properties["server"]["$ref"]
    assert server_ref.startswith("#/$defs/")
    server = schema["$defs"][server_ref.removeprefix("#/$defs/")]
    assert {"host", "port", "shutdown_grace_s", "watch_config"} <= server["properties"].keys()


def test_python_dash_m_sidegate_help(tmp_path: Path) -> None:
    # From an unrelated directory: the import package, not the checkout, provides the command.
    result = _run(sys.executable, "-m", "sidegate", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sidegate")
    for command in ("serve", "check", "schema", "mock"):
        assert command in result.stdout


def test_a_missing_command_is_a_usage_error() -> None:
    result = _run(str(SIDEGATE))
    assert result.returncode == 2
    assert "usage: sidegate" in result.stderr


# -- serve ---------------------------------------------------------------------------------------


def _demo() -> dict[str, Any]:
    data = yaml.safe_load(DEMO.read_text())
    assert isinstance(data, dict)
    return data


async def test_serve_the_demo_logs_one_json_line_per_request_and_exits_0_on_sigterm(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    async with serve(DEMO, unused_tcp_port, tmp_path) as served:
        response, body = await served.post(
            "/v1/chat/completions", CHAT, headers={"x-request-id": "cli-chat-1"}
        )
        assert response.status == 200
        assert response.headers["x-request-id"] == "cli-chat-1"
        assert body["object"] == "chat.completion"
        assert body["model"] == "meridian-1-turbo"  # the alias, renamed on the way upstream
        assert body["choices"][0]["message"]["content"]

        requests = await served.wait_for_events("request", served.answered)
        assert len(requests) == served.answered
        chat = [event for event in requests if event["request_id"] == "cli-chat-1"]
        assert len(chat) == 1
        line = chat[0]
        assert line["method"] == "POST"
        assert line["path"] == "/v1/chat/completions"
        assert line["status"] == 200
        assert line["upstream"] == "meridian"
        assert line["model"] == "fast"
        assert isinstance(line["latency_ms"], int | float)
        assert line["latency_ms"] >= 0
        ready = [event for event in requests if event["path"] == "/readyz"]
        assert len(ready) == served.answered - 1
        assert all(event["status"] == 200 and event["method"] == "GET" for event in ready)
        assert len({event["request_id"] for event in requests}) == len(requests)

        assert await served.terminate() == 0


async def test_serve_with_an_invalid_config_exits_1_without_listening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unused_tcp_port: int
) -> None:
    monkeypatch.setenv("SIDEGATE_CLI_TEST_SECRET", ENV_SECRET)
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    stdout, stderr = _open_logs(tmp_path)
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            str(SIDEGATE),
            "serve",
            "--config",
            str(path),
            "--port",
            str(unused_tcp_port),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(os.environ),
        )
        assert await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S) == 1
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)
        stdout.close()
        stderr.close()
    output = _read(tmp_path / "stderr.log")
    assert f"{path}:2: server.port: " in output
    assert f"{path}:14: models.fast.upstream: " in output
    assert ENV_SECRET not in output
    assert "sk-literal-secret" not in output


# -- reload ----------------------------------------------------------------------------------------


async def test_sighup_reloads_and_an_invalid_config_keeps_the_running_one(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    config = _demo()
    config["server"]["watch_config"] = False  # only the signal reloads
    path = tmp_path / "sidegate.yaml"
    _write_yaml(path, config)
    async with serve(path, unused_tcp_port, tmp_path) as served:
        assert "fresh" not in await served.model_ids()
        config["models"]["fresh"] = {"upstream": "meridian", "model": "meridian-1"}
        _write_yaml(path, config)
        served.proc.send_signal(signal.SIGHUP)
        await served.wait_for_model("fresh")
        assert (await served.wait_for_event("config_reloaded"))["path"] == str(path)
        _, ready = await served.get("/readyz")
        loaded_at = ready["config_loaded_at"]

        response, answer = await served.post("/v1/chat/completions", {**CHAT, "model": "fresh"})
        assert response.status == 200
        assert answer["model"] == "meridian-1"

        broken = _demo()  # without `fresh`, and with two problems
        broken["server"]["port"] = "not-a-port"
        broken["models"]["stale"] = {"upstream": "nowhere", "model": "meridian-1"}
        _write_yaml(path, broken)
        served.proc.send_signal(signal.SIGHUP)
        rejected = await served.wait_for_event("config_reload_rejected")
        assert rejected["path"] == str(path)
        assert rejected["level"] == "error"
        assert "server.port" in rejected["problems"]
        assert "models.stale.upstream" in rejected["problems"]
        assert all(line.startswith(f"{path}:") for line in rejected["problems"].splitlines())

        ids = await served.model_ids()
        assert "fresh" in ids
        assert "stale" not in ids
        response, answer = await served.post("/v1/chat/completions", {**CHAT, "model": "fresh"})
        assert response.status == 200, answer
        status, ready = await served.get("/readyz")
        assert status == 200
        assert ready["config_loaded_at"] == loaded_at
        assert served.proc.returncode is None
        assert await served.terminate() == 0


async def test_a_changed_file_is_reloaded_without_a_signal(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    config = _demo()
    config["server"].update(watch_config=True, watch_interval_s=0.1)
    path = tmp_path / "sidegate.yaml"
    _write_yaml(path, config)
    async with serve(path, unused_tcp_port, tmp_path) as served:
        assert "watched" not in await served.model_ids()
        config["models"]["watched"] = {"upstream": "meridian", "model": "meridian-1"}
        _write_yaml(path, config)
        await served.wait_for_model("watched")
        response, answer = await served.post("/v1/chat/completions", {**CHAT, "model": "watched"})
        assert response.status == 200
        assert answer["model"] == "meridian-1"
        assert await served.terminate() == 0


# -- graceful shutdown ---------------------------------------------------------------------------


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


def _graceful_config(tmp_path: Path, upstream_url: str, *, grace_s: float) -> Path:
    """A config file fronting the test's mock Meridian with ``shutdown_grace_s``."""
    config = {
        "auth": {"api_keys": [{"id": "demo", "team": "demo", "hash": hash_key(DEMO_KEY)}]},
        "teams": {"demo": {}},
        "server": {"shutdown_grace_s": grace_s, "watch_config": False},
        "store": {"kind": "memory"},
        "upstreams": {
            "meridian": {
                "kind": "meridian",
                "base_url": upstream_url,
                "keys": [{"id": "k", "secret": "sk-test"}],
                "models": ["meridian-1"],
            }
        },
    }
    path = tmp_path / "sidegate.yaml"
    _write_yaml(path, config)
    return path


async def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_connections(
    tmp_path: Path, unused_tcp_port: int, meridian: Upstream
) -> None:
    path = _graceful_config(tmp_path, meridian.url, grace_s=10)
    meridian.state.script(Fault(pace_s=0.05), path="/v1/chat/completions")
    body = {**CHAT, "model": "meridian-1", "stream": True}
    async with serve(path, unused_tcp_port, tmp_path) as served:
        url = served.url + "/v1/chat/completions"
        async with served.session.post(url, json=body) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            first = await asyncio.wait_for(response.content.readline(), POLL_TIMEOUT_S)
            assert first.startswith(b"data: {")
            assert meridian.state.open_streams == 1

            served.proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + POLL_TIMEOUT_S
            while not await _refused(unused_tcp_port):
                assert loop.time() < deadline, "sidegate still accepts connections after SIGTERM"
                await asyncio.sleep(0.01)
            # Refused while the upstream is still streaming: shutdown began mid-stream.
            assert meridian.state.open_streams == 1

            rest = await asyncio.wait_for(response.read(), POLL_TIMEOUT_S)
            served.answered += 1
        assert rest.endswith(b"data: [DONE]\n\n")
        events = [first.strip(), *(line for line in rest.split(b"\n") if line)]
        assert events[-1] == b"data: [DONE]"
        chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
        deltas = [chunk["choices"][0]["delta"].get("content", "") for chunk in chunks]
        assert len(deltas) == meridian.state.stream_chunks + 2  # role, words, finish
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(deltas[1:-1])

        assert await asyncio.wait_for(served.proc.wait(), EXIT_TIMEOUT_S) == 0
        assert meridian.state.disconnects == 0
        received = meridian.state.received[-1]
        assert received.headers["Authorization"] == "Bearer sk-test"
        stream_lines = [
            event
            for event in served.events()
            if event.get("event") == "request" and event["path"] == "/v1/chat/completions"
        ]
        assert len(stream_lines) == 1
        assert stream_lines[0]["status"] == 200
        assert stream_lines[0]["stream"] is True


@pytest.mark.parametrize(("args", "loop"), [((), "uvloop"), (("--loop", "asyncio"), "asyncio")])
async def test_serve_runs_on_uvloop_unless_asked_for_asyncio_and_streams_on_either(
    tmp_path: Path, unused_tcp_port: int, meridian: Upstream, args: tuple[str, ...], loop: str
) -> None:
    path = _graceful_config(tmp_path, meridian.url, grace_s=1)
    meridian.state.script(Fault(pace_s=0.05), path="/v1/chat/completions")
    body = {**CHAT, "model": "meridian-1", "stream": True}
    async with serve(path, unused_tcp_port, tmp_path, args=args) as served:
        serving = await served.wait_for_event("serving")
        assert serving["loop"] == loop
        async with served.session.post(served.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            first = await asyncio.wait_for(response.content.readline(), POLL_TIMEOUT_S)
            assert first.startswith(b"data: {")
            assert meridian.state.open_streams == 1  # passed on while the upstream still streams
            rest = await asyncio.wait_for(response.read(), POLL_TIMEOUT_S)
            served.answered += 1
        assert rest.endswith(b"data: [DONE]\n\n")
        assert await served.terminate() == 0


def test_loop_uvloop_is_refused_without_uvloop_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvloop

    from sidegate.proxy.cli import event_loop_factory, main

    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an import finds when it is missing
    assert event_loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        event_loop_factory("uvloop")
    assert main(["serve", "--config", str(DEMO), "--loop", "uvloop"]) == 2
    assert capsys.readouterr().err == "sidegate: --loop uvloop, but uvloop is not installed\n"


async def test_a_zero_shutdown_grace_does_not_wait_for_streams(
    tmp_path: Path, unused_tcp_port: int, meridian: Upstream
) -> None:
    path = _graceful_config(tmp_path, meridian.url, grace_s=0)
    meridian.state.script(Fault(pace_s=0.5), path="/v1/chat/completions")  # ~5 s in all
    body = {**CHAT, "model": "meridian-1", "stream": True}
    async with serve(path, unused_tcp_port, tmp_path) as served:
        url = served.url + "/v1/chat/completions"
        async with served.session.post(url, json=body) as response:
            assert response.status == 200
            first = await asyncio.wait_for(response.content.readline(), POLL_TIMEOUT_S)
            assert first.startswith(b"data: {")
            served.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(served.proc.wait(), 2.0) == 0
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.read(), POLL_TIMEOUT_S)


def test_keys_new_prints_a_key_once_and_the_config_line_with_its_hash(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(SIDEGATE),
            "keys",
            "new",
            "--team",
            "search",
            "--id",
            "search-prod",
            "--role",
            "admin",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    key = lines[0].removeprefix("key: ")
    assert key.startswith("sg-")
    assert result.stdout.count(key) == 1
    entry = yaml.safe_load(lines[-1].strip())[0]
    assert entry == {
        "id": "search-prod",
        "team": "search",
        "hash": hash_key(key),
        "roles": ["admin"],
    }
    config = tmp_path / "peppered.yaml"
    config.write_text(
        "upstreams: {m: {kind: meridian, mock: true, models: [m-1]}}\n"
        "auth: {pepper: pepper-0123456789abcdef}\n"
    )
    peppered = subprocess.run(
        [str(SIDEGATE), "keys", "new", "--team", "t", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    out = peppered.stdout.splitlines()
    entry = yaml.safe_load(out[-1].strip())[0]
    assert entry["hash"] == hash_key(out[0].removeprefix("key: "), b"pepper-0123456789abcdef")
    assert entry["id"].startswith("t-")


async def test_serve_keeps_the_collector_off_start_up_objects_and_requests_in_flight() -> None:
    from aiohttp import web

    from sidegate.proxy.cli import _freeze_startup_objects

    threshold = gc.get_threshold()
    try:
        await _freeze_startup_objects(web.Application())
        assert gc.get_freeze_count() > 0  # start-up's objects: no full collection walks them
        assert gc.get_threshold() == (10_000, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_a_served_process_loads_neither_ctypes_nor_difflib() -> None:
    """Idle RSS is a target (issue 7): what only ``--workers``' parent (ctypes, for ``prctl``)
    or a config with an unknown model (difflib, for "did you mean") needs is imported there."""
    script = (
        "import sys\n"
        "from sidegate.proxy.app import create_app\n"
        "from sidegate.proxy.cli import main\n"
        f"create_app({str(DEMO)!r})\n"
        "print(sorted(m for m in ('ctypes', 'difflib') if m in sys.modules))\n"
    )
    result = _run(sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
