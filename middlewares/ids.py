"""Random ids made on every request (request ids, reservation ids), without a system call each.

``os.urandom`` and ``secrets.token_hex`` read the kernel's random source on every call: one
``getrandom`` system call per id, a measurable share of a request on a virtual machine. Here the
same source is read a few kilobytes at a time and handed out in slices: every id is as random as
``secrets.token_hex`` would make it, and a forked child drops what its parent had read (no two
processes ever hand out the same bytes). A lock keeps slices apart between threads (an app
may run event loops in several).
"""

from __future__ import annotations

import os
import threading

__all__ = ["random_hex"]

_READ = 4096
"""Bytes read from the kernel at a time (hundreds of ids)."""


class _Entropy:
    __slots__ = ("buffer", "lock", "position")

    def __init__(self) -> None:
        self.drop()
        os.register_at_fork(after_in_child=self.drop)

    def drop(self) -> None:
        self.buffer = b""
        self.position = 0
        self.lock = threading.Lock()  # a new one in a child: the parent's may have been held

    def take(self, size: int) -> bytes:
        with self.lock:
            start = self.position
            end = start + size
            if end > len(self.buffer):
                self.buffer = os.urandom(max(_READ, size))
                start, end = 0, size
            self.position = end
            return self.buffer[start:end]


_entropy = _Entropy()


def random_hex(size: int) -> str:
    """``size`` random bytes from the kernel's source, in hex (as ``secrets.token_hex(size)``)."""
    return _entropy.take(size).hex()
