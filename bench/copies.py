"""N copies of a server command on one port: the floor's answer to ``sidegate serve --workers N``.

``python -m bench.copies N COMMAND...`` starts COMMAND N times (each must bind its port with
``SO_REUSEPORT``: ``python -m bench.passthrough --reuse-port``, say) and waits for them; SIGTERM
or SIGINT is passed on to every copy, and a copy that ends takes the others down with it; on
Linux a copy also gets SIGTERM if this process is killed outright (sidegate's own
``die_with_parent``, what ``sidegate serve --workers`` starts its workers with). The copies are
this process's direct children, so the harness's CPU samples of it count them
(``with_children``), as they count sidegate's workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sidegate.proxy.workers import die_with_parent, prctl_libc

__all__ = ["main"]

_POLL_S = 0.2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not args[0].isdigit() or int(args[0]) < 1:
        print("usage: python -m bench.copies N COMMAND...", file=sys.stderr)
        return 2
    parent, libc = os.getpid(), prctl_libc()
    copies = [
        subprocess.Popen(args[1:], preexec_fn=lambda: die_with_parent(parent, libc))
        for _ in range(int(args[0]))
    ]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(copy.poll() is None for copy in copies):
        time.sleep(_POLL_S)
    for copy in copies:
        if copy.poll() is None:
            copy.terminate()
    codes = [copy.wait() for copy in copies]
    return 0 if stopping else next((code for code in codes if code), 1)


if __name__ == "__main__":
    raise SystemExit(main())
