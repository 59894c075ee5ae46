"""``sidegate serve --workers N``: one port, N processes, signals forwarded, exit status.

Each server is a real ``sidegate serve`` subprocess on a free loopback port, killed in a
``finally`` (its workers with it) if still running. Which worker answered a connection is read
from ``/proc``: the worker holding the server side of the established TCP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bench.procstat import ESTABLISHED, LISTEN, children, tcp_sockets
from sidegate.proxy.workers import WORKER_FLAG, run_workers, worker_command, worker_count
from tests.conftest import DEMO, Exits

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo.yaml"
SIDEGATE = Path(sys.executable).with_name("sidegate")
READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 15.0
CONNECTIONS = 24
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hello"}]}

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


async def _all_listening(workers: list[int], port: int) -> None:
    """Wait until every worker holds a socket listening on ``port``: a worker logs ``serving``
    before it binds, and the first one bound answers the readiness probe alone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while not all(_socket_inodes(pid) & tcp_sockets(port, LISTEN) for pid in workers):
        if loop.time() > deadline:
            pytest.fail(f"not every worker listens on {port} within {READY_TIMEOUT_S} s")
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


@dataclass
class Group:
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON events called ``name`` the parent and its workers logged so far."""
        # Decoded object by object, not line by line: a worker's line and its newline are two
        # writes (print to the unbuffered stderr), so two workers' lines may run together.
        text = self.log.read_text(errors="replace")
        decoder = json.JSONDecoder()
        found, index = [], 0
        while (index := text.find("{", index)) >= 0:
            try:
                event, index = decoder.raw_decode(text, index)
            except json.JSONDecodeError:  # a line still being written
                break
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    async def wait_for(self, name: str, count: int) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXIT_TIMEOUT_S
        while len(found := self.events(name)) < count:
            if loop.time() > deadline:
                pytest.fail(f"{count} x {name!r} not logged:\n{self.log.read_text()}")
            await asyncio.sleep(0.05)
        return found

    async def exit_status(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT_S)


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, port: int, workers: int) -> AsyncIterator[Group]:
    """``sidegate serve --workers N`` on a copy of the demo config (no file watching)."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["server"].update(watch_config=False, shutdown_grace_s=0)
    path = tmp_path / "sidegate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = tmp_path / "serve.log"
    command = [str(SIDEGATE), "serve", "--config", str(path), "--port", str(port)]
    command += ["--workers", str(workers), "--log-format", "json"]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO
        )
    group = Group(proc, port, log, path)
    try:
        await _wait_ready(group)
        yield group
    finally:
        if proc.returncode is None:
            for child in children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.kill()
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)


async def _wait_ready(group: Group) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            if group.proc.returncode is not None:
                pytest.fail(f"exited with {group.proc.returncode}:\n{group.log.read_text()}")
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(group.url + "/readyz") as response:
                    if response.status == 200:
                        return
            if loop.time() > deadline:
                pytest.fail(f"not ready within {READY_TIMEOUT_S} s:\n{group.log.read_text()}")
            await asyncio.sleep(0.05)


async def _chat_on_many_connections(session: aiohttp.ClientSession, url: str, model: str) -> None:
    async def one() -> None:
        body = {**CHAT, "model": model}
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["object"] == "chat.completion"

    await asyncio.gather(*(one() for _ in range(CONNECTIONS)))


async def test_two_workers_share_the_port_take_sighup_and_stop_on_sigterm(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    async with serve(tmp_path, unused_tcp_port, workers=2) as group:
        workers = children(group.proc.pid)
        assert len(workers) == 2
        started = await group.wait_for("workers_started", 1)
        assert sorted(started[0]["pids"]) == sorted(workers)
        assert len(await group.wait_for("serving", 2)) == 2
        await _all_listening(workers, group.port)

        connector = aiohttp.TCPConnector(limit=CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector, headers=DEMO) as session:
            await _chat_on_many_connections(session, group.url, "fast")
            # The connections stay open in the pool: each is held by the worker that accepted it.
            established = tcp_sockets(group.port, ESTABLISHED)
            assert len(established) == CONNECTIONS
            held = {pid: len(_socket_inodes(pid) & established) for pid in workers}
            assert sum(held.values()) == CONNECTIONS
            assert all(count > 0 for count in held.values()), held

            config = yaml.safe_load(group.config.read_text())
            config["models"]["fresh"] = {"upstream": "meridian", "model": "meridian-1"}
            group.config.write_text(yaml.safe_dump(config, sort_keys=False))
            group.proc.send_signal(signal.SIGHUP)
            assert len(await group.wait_for("config_reloaded", 2)) == 2  # one per worker
            await _chat_on_many_connections(session, group.url, "fresh")

        group.proc.send_signal(signal.SIGTERM)
        assert await group.exit_status() == 0
        for pid in workers:
            assert not _alive(pid), f"worker {pid} outlived the parent"
        assert group.events("worker_exited") == []


async def test_a_worker_that_dies_stops_the_others_and_the_parent_fails(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    async with serve(tmp_path, unused_tcp_port, workers=2) as group:
        first, second = children(group.proc.pid)
        os.kill(first, signal.SIGKILL)
        assert await group.exit_status() == 1
        assert not _alive(second)
        (exited,) = group.events("worker_exited")
        assert exited["pid"] == first
        assert exited["exit_code"] == -signal.SIGKILL


async def test_workers_die_with_a_parent_killed_outright(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    """SIGKILL leaves the parent no chance to forward anything: each worker was started with
    ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` and stops on its own."""
    async with serve(tmp_path, unused_tcp_port, workers=2) as group:
        workers = children(group.proc.pid)
        assert len(workers) == 2
        assert len(await group.wait_for("serving", 2)) == 2
        exits = Exits(workers)  # opened while the workers still run
        group.proc.kill()
        await group.exit_status()
        living = await asyncio.to_thread(exits.wait, EXIT_TIMEOUT_S)
        for pid in living:  # orphans: no longer the parent's, for serve() to clean up
            os.kill(pid, signal.SIGKILL)
        assert living == [], f"workers outlived a killed parent by {EXIT_TIMEOUT_S} s"


async def test_one_worker_is_todays_single_process(tmp_path: Path, unused_tcp_port: int) -> None:
    async with serve(tmp_path, unused_tcp_port, workers=1) as group:
        assert children(group.proc.pid) == []
        assert group.events("workers_started") == []
        group.proc.send_signal(signal.SIGTERM)
        assert await group.exit_status() == 0


def test_an_invalid_config_or_port_0_is_reported_once_and_no_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 99999}\nupstreams: {}\n")
    argv = ["serve", "--config", str(bad), "--workers", "2"]
    assert run_workers(2, argv, config=str(bad), port=None) == 1
    assert capsys.readouterr().err.count(f"{bad}:1: server.port") == 1
    assert run_workers(2, argv, config=str(DEMO_CONFIG), port=0) == 1
    assert "--workers needs a fixed port" in capsys.readouterr().err


def test_worker_count_and_command() -> None:
    assert worker_count("4") == 4
    for bad in ("0", "-1", "two"):
        with pytest.raises(Exception, match="number of workers"):
            worker_count(bad)
    argv = ["serve", "--config", "x.yaml", "--workers", "2"]
    assert worker_command(argv, 1) == [sys.executable, "-m", "sidegate", *argv, WORKER_FLAG, "1"]
