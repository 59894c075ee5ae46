"""Starting, probing and stopping the processes under test, each pinned with ``taskset``.

A target is what the load is sent to: ``direct`` (the upstream mock itself), ``passthrough`` (the
floor, :mod:`bench.passthrough`), ``sidegate-bare`` and ``sidegate-full`` (``sidegate serve`` with
the configs rendered by :mod:`bench.configs`).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import orjson

from .procstat import listeners
from .workloads import BENCH_KEY, CHAT_BODY, EMBED_BODY, EMBED_DIMENSIONS, EMBED_INPUTS, STREAM_BODY

__all__ = [
    "REPO",
    "Process",
    "free_port",
    "probe",
    "start_passthrough",
    "start_sidegate",
    "start_upstream",
    "wait_ready",
]

REPO = Path(__file__).resolve().parents[1]
SIDEGATE = Path(sys.executable).with_name("sidegate")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Process:
    """A started process, where it writes, and how to reach it."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path
    log_file: IO[bytes] | None = field(default=None, repr=False)
    workers: int = 1
    """Processes serving the URL's port (sidegate's workers, the floor's copies): as many sockets
    listen on it once all are up; more than one are this process's children."""

    @property
    def port(self) -> int:
        """The TCP port of :attr:`url`."""
        port = urlsplit(self.url).port
        assert port is not None, self.url
        return port

    @property
    def with_children(self) -> bool:
        """Whether its CPU and memory are its children's too (its workers serve, not it)."""
        return self.workers > 1

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
        if self.log_file is not None:
            self.log_file.close()
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def free_port() -> int:
    """A TCP port free on the loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pinned(cpus: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def _spawn(
    name: str,
    command: list[str],
    *,
    cpus: str | None,
    url: str,
    log: Path,
    env: dict[str, str] | None = None,
    workers: int = 1,
) -> Process:
    out = log.open("wb")
    popen = subprocess.Popen(
        _pinned(cpus, command),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    return Process(name, popen, url, log, out, workers)


def start_upstream(port: int, *, cpus: str | None, log: Path, events: int) -> Process:
    """The mock upstream (:mod:`bench.upstream`)."""
    command = [sys.executable, "-m", "bench.upstream", "--port", str(port)]
    command += ["--events", str(events)]
    return _spawn("upstream", command, cpus=cpus, url=f"http://127.0.0.1:{port}", log=log)


def start_passthrough(
    port: int,
    upstream: str,
    *,
    cpus: str | None,
    log: Path,
    loop: str = "asyncio",
    workers: int = 1,
) -> Process:
    """The floor (:mod:`bench.passthrough`) in front of ``upstream``, on ``loop``; ``workers``
    copies of it sharing the port (:mod:`bench.copies`) when more than one."""
    command = [sys.executable, "-m", "bench.passthrough", "--port", str(port)]
    command += ["--upstream", upstream, "--loop", loop]
    if workers != 1:
        command = [sys.executable, "-m", "bench.copies", str(workers), *command, "--reuse-port"]
    return _spawn(
        "passthrough",
        command,
        cpus=cpus,
        url=f"http://127.0.0.1:{port}",
        log=log,
        workers=workers,
    )


def start_sidegate(
    name: str,
    config: Path,
    port: int,
    *,
    cpus: str | None,
    log: Path,
    log_level: str,
    env: dict[str, str],
    workers: int = 1,
    loop: str = "auto",
) -> Process:
    """``sidegate serve`` for ``config`` (JSON log lines to ``log``), ``--loop loop``."""
    command = [str(SIDEGATE), "serve", "--config", str(config), "--port", str(port)]
    command += ["--log-level", log_level, "--log-format", "json"]
    if loop != "auto":
        command += ["--loop", loop]
    if workers != 1:
        command += ["--workers", str(workers)]
    return _spawn(
        name,
        command,
        cpus=cpus,
        url=f"http://127.0.0.1:{port}",
        log=log,
        env=env,
        workers=workers,
    )


@contextlib.contextmanager
def _connection(url: str, timeout: float = 10.0) -> Iterator[http.client.HTTPConnection]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        yield connection
    finally:
        connection.close()


def _post(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    with _connection(url) as connection:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()


def wait_ready(process: Process, *, path: str = "/v1/chat/completions") -> None:
    """Wait until ``process`` answers a chat request with 200 and all its workers listen (or
    fail with its log's tail). The first worker up answers for all of them: a load started then
    would open every connection to it, and measure one worker where two were asked for."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(
                f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}"
            )
        try:
            status, body = _post(process.url, path, CHAT_BODY)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status != 200:
                last = f"status {status}: {body[:300]!r}"
            elif (listening := listeners(process.port)) >= process.workers:
                return
            else:
                last = f"{listening} of {process.workers} listening"
        time.sleep(0.05)
    raise RuntimeError(
        f"{process.name} not ready in {READY_TIMEOUT_S} s ({last}):\n{process.tail()}"
    )


def probe(url: str) -> list[str]:
    """Check every workload's answer through ``url``; returns the problems (none: all good)."""
    problems = []
    status, body = _post(url, "/v1/chat/completions", CHAT_BODY)
    if status != 200 or not orjson.loads(body).get("choices"):
        problems.append(f"chat: status {status}: {body[:200]!r}")
    status, body = _post(url, "/v1/chat/completions", STREAM_BODY)
    if status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
        problems.append(f"stream: status {status}: {body[-200:]!r}")
    status, body = _post(url, "/v1/embeddings", EMBED_BODY)
    data = orjson.loads(body).get("data") if status == 200 else None
    if (
        not isinstance(data, list)
        or len(data) != len(EMBED_INPUTS)
        or any(len(item["embedding"]) != EMBED_DIMENSIONS for item in data)
    ):
        problems.append(f"embeddings: status {status}: {body[:200]!r}")
    return problems
