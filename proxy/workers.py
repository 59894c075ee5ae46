"""``sidegate serve --workers N``: N server processes sharing one port through SO_REUSEPORT.

The parent validates the config, then starts N children, each a plain ``sidegate serve`` with the
same arguments plus the internal ``--worker-index I``, which makes it bind with ``reuse_port`` so
the kernel spreads connections over the workers. Workers share state only through the configured
store (sqlite or Redis), since each one loads the same config.

The parent serves nothing. It forwards SIGTERM, SIGINT and SIGHUP to every worker exactly once (the
workers run in their own process group, so a terminal's Ctrl-C reaches them only through it),
and exits when they have all exited: 0 if every worker exited 0, else 1. A worker that exits on
its own stops the others (SIGTERM), so a supervisor sees the group end instead of a gateway
quietly running at part capacity. On Linux a worker also gets SIGTERM if the parent dies, so no
worker outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Literal

import structlog

if TYPE_CHECKING:
    import ctypes

from sidegate.config import ConfigError, load_config

from .logs import configure_logging

__all__ = [
    "FORWARDED_SIGNALS",
    "WORKER_FLAG",
    "run_workers",
    "supervise",
    "worker_command",
    "worker_count",
]

log = structlog.get_logger("sidegate.workers")

WORKER_FLAG = "--worker-index"
"""The internal flag a worker is started with (its index); it binds with ``reuse_port``.

Not ``--worker``: argparse would take that (a prefix of ``--workers``) for a typo of it.
"""

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def worker_command(argv: Sequence[str], index: int) -> list[str]:
    """Worker ``index``'s command line: ``python -m sidegate <argv> --worker-index <index>``."""
    return [sys.executable, "-m", "sidegate", *argv, WORKER_FLAG, str(index)]


def _in_worker(parent: int, libc: ctypes.CDLL | None) -> None:
    """Runs in the child before exec: ignore SIGHUP until sidegate handles it; die with parent.

    ``libc`` (None off Linux) is loaded by the parent: nothing is imported between fork and
    exec."""
    # Ignored (not default) until the worker's own handler is installed, so a reload sent while
    # it is starting does not kill it; SIG_IGN survives exec, a Python handler would not.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: do not start at all
            os._exit(1)


def _libc() -> ctypes.CDLL | None:
    """The C library, for ``prctl`` in a new worker; None off Linux.

    ctypes is imported here, in the parent of ``--workers``, not at import: a worker (and a
    single ``serve``) never loads it, 0.6 MB of its idle RSS."""
    if sys.platform != "linux":
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def run_workers(
    count: int,
    argv: Sequence[str],
    *,
    config: str,
    port: int | None,
    log_level: str = "info",
    log_format: Literal["auto", "json", "console"] = "auto",
) -> int:
    """Run ``count`` workers of ``sidegate serve <argv>`` until they exit; their exit status.

    ``argv`` is the serve command line as given (``["serve", "--config", ...]``); ``config`` and
    ``port`` are checked here first, so a bad config is reported once, not by every worker.
    """
    if count < 2:
        raise ValueError("run_workers needs at least 2 workers; serve one in-process instead")
    try:
        loaded = load_config(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if (port if port is not None else loaded.server.port) == 0:
        print(
            "--workers needs a fixed port: with port 0 each worker would get its own",
            file=sys.stderr,
        )
        return 1
    configure_logging(log_level, log_format)
    return supervise([worker_command(argv, index) for index in range(count)])


def supervise(commands: Sequence[Sequence[str]]) -> int:
    """Run each of ``commands`` as a worker, and wait for them all: 0 if every one exited 0.

    What ``--workers`` runs its workers with (and the benchmark its floor's copies,
    ``bench.copies``): SIGTERM, SIGINT and SIGHUP are forwarded to every worker once (in their
    own process group, they get nothing from a terminal but through this); a worker that exits on
    its own stops the others; each ignores SIGHUP until it installs its own handler, and dies
    with this process (Linux). Call it where no other thread runs (``preexec_fn``).
    """
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for proc in workers.values():
            # os.kill, not Popen.send_signal: that polls, and would reap a worker behind waitpid.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    parent = os.getpid()
    libc = _libc()
    try:
        for command in commands:
            if stopping:
                break
            # preexec_fn is safe here: the parent runs no other thread.
            proc = subprocess.Popen(  # noqa: S603 - commands our own callers built
                command,
                stdin=subprocess.DEVNULL,
                process_group=0,
                preexec_fn=lambda: _in_worker(parent, libc),
            )
            workers[proc.pid] = proc
        if stopping:
            forward(signal.SIGTERM, None)
        log.info("workers_started", count=len(workers), pids=sorted(workers))
        while any(proc.returncode is None for proc in workers.values()):
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid not in workers:
                continue
            workers[pid].returncode = code = os.waitstatus_to_exitcode(status)
            if not stopping:
                log.error("worker_exited", pid=pid, exit_code=code, stopping_the_others=True)
                stopping = True
                forward(signal.SIGTERM, None)
        return 0 if all(proc.returncode == 0 for proc in workers.values()) else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for proc in workers.values():
            if proc.returncode is None:
                proc.kill()
                proc.wait()


def worker_count(text: str) -> int:
    """``--workers``: a whole number of processes, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers >= 1, not {text!r}")
    return count
