"""Real ``sidegate serve`` subprocesses for the tests: start, wait until ready, talk to, stop.

Every server is a subprocess on a loopback port the test chose, logging JSON lines to
``stdout.log`` / ``stderr.log`` in its own directory. Waits on the process are bounded, and the
process is killed when the ``serve`` block ends if it is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml

from tests.conftest import DEMO as DEMO_HEADERS

__all__ = [
    "CLIENT_TIMEOUT",
    "EXIT_TIMEOUT_S",
    "POLL_TIMEOUT_S",
    "READY_TIMEOUT_S",
    "REPO",
    "RETRY_S",
    "SIDEGATE",
    "Served",
    "open_logs",
    "read_text",
    "serve",
    "write_yaml",
]

REPO = Path(__file__).resolve().parents[2]
SIDEGATE = Path(sys.executable).with_name("sidegate")

READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 15.0
POLL_TIMEOUT_S = 10.0
RETRY_S = 0.05
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)


def open_logs(directory: Path) -> tuple[IO[bytes], IO[bytes]]:
    return (directory / "stdout.log").open("wb"), (directory / "stderr.log").open("wb")


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically, so a watcher never sees half a file."""
    staging = path.with_name(path.name + ".new")
    staging.write_text(yaml.safe_dump(data, sort_keys=False))
    staging.replace(path)


@dataclass
class Served:
    """A ``sidegate serve`` subprocess and what it wrote."""

    proc: asyncio.subprocess.Process
    port: int
    directory: Path
    session: aiohttp.ClientSession
    answered: int = 0  # responses the test received, so access-log lines it caused

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return read_text(self.directory / "stdout.log") + read_text(self.directory / "stderr.log")

    def events(self) -> list[dict[str, Any]]:
        """Every log line, each of which must be one JSON object (``--log-format json``)."""
        events = []
        for line in self.output().splitlines():
            if line.strip():
                event = json.loads(line)
                assert isinstance(event, dict), line
                events.append(event)
        return events

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as response:
            self.answered += 1
            return response.status, await response.json()

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[aiohttp.ClientResponse, Any]:
        async with self.session.post(self.url + path, json=body, headers=headers) as response:
            self.answered += 1
            return response, await response.json()

    async def model_ids(self) -> set[str]:
        status, body = await self.get("/v1/models")
        assert status == 200, body
        return {model["id"] for model in body["data"]}

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while True:
            if self.proc.returncode is not None:
                pytest.fail(f"sidegate exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _ = await self.get("/readyz")
            except aiohttp.ClientConnectionError:
                status = None
            if status == 200:
                return
            if loop.time() > deadline:
                pytest.fail(f"sidegate not ready within {READY_TIMEOUT_S} s:\n{self.output()}")
            await asyncio.sleep(RETRY_S)

    async def wait_for_event(self, name: str) -> dict[str, Any]:
        """The latest ``name`` event, once there is one."""
        return (await self.wait_for_events(name, 1))[-1]

    async def wait_for_events(self, name: str, count: int) -> list[dict[str, Any]]:
        """Every ``name`` event, once there are at least ``count``. An access line (``request``)
        goes out at the end of the event-loop turn that logged it, which can be after its
        response reached the client: wait for ``answered`` of them rather than read at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_TIMEOUT_S
        while True:
            found = [event for event in self.events() if event.get("event") == name]
            if len(found) >= count:
                return found
            if loop.time() > deadline:
                pytest.fail(
                    f"{len(found)} of {count} {name!r} events within {POLL_TIMEOUT_S} s:\n"
                    f"{self.output()}"
                )
            await asyncio.sleep(RETRY_S)

    async def wait_for_model(self, model: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_TIMEOUT_S
        while model not in await self.model_ids():
            if loop.time() > deadline:
                pytest.fail(f"{model!r} not listed within {POLL_TIMEOUT_S} s:\n{self.output()}")
            await asyncio.sleep(RETRY_S)

    async def terminate(self) -> int:
        """SIGTERM, then the exit status (bounded)."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT_S)


@contextlib.asynccontextmanager
async def serve(
    config: Path,
    port: int,
    directory: Path,
    *,
    args: Sequence[str] = (),
    headers: Mapping[str, str] = DEMO_HEADERS,
    stop_grace_s: float = 0.0,
) -> AsyncIterator[Served]:
    """Run ``sidegate serve`` until the block ends; ready (``/readyz`` 200) when it starts.

    ``args`` are added to the command line (``--workers 2``, say); the session sends ``headers``
    (the demo key) with every request. When the block ends a process still running is sent
    SIGTERM first if ``stop_grace_s`` is positive (so a ``--workers`` parent stops its workers),
    then killed if it has not exited within that time. ``directory`` must exist.
    """
    stdout, stderr = open_logs(directory)
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            str(SIDEGATE),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-format",
            "json",
            *args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=REPO,
            env=dict(os.environ),
        )
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, headers=dict(headers)) as session:
            served = Served(proc, port, directory, session)
            await served.wait_ready()
            yield served
    finally:
        if proc is not None and proc.returncode is None and stop_grace_s > 0:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), stop_grace_s)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)
        stdout.close()
        stderr.close()
