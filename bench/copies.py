"""N copies of a server command on one port: the floor's answer to ``sidegate serve --workers N``.

``python -m bench.copies N COMMAND...`` runs COMMAND N times (each must bind its port with
``SO_REUSEPORT``: ``python -m bench.passthrough --reuse-port``, say) under the supervisor
``sidegate serve --workers`` runs its workers with (:func:`sidegate.proxy.workers.supervise`):
SIGTERM and SIGINT are passed on to every copy, a copy that ends takes the others down with it,
and on Linux a copy also gets SIGTERM if this process is killed outright. The copies are this
process's direct children, so the harness's CPU samples of it count them, as they count
sidegate's workers.
"""

from __future__ import annotations

import sys

from sidegate.proxy.workers import supervise

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not args[0].isdigit() or int(args[0]) < 1:
        print("usage: python -m bench.copies N COMMAND...", file=sys.stderr)
        return 2
    return supervise([args[1:]] * int(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
