"""Random ids handed out from a buffer of the kernel's random bytes."""

from __future__ import annotations

import os
import threading

from sidegate.middlewares import ids
from sidegate.middlewares.ids import random_hex
from tests.conftest import is_random_hex


def test_ids_are_hex_of_the_size_asked_and_never_repeat_across_refills() -> None:
    made = [random_hex(16) for _ in range(2_000)]  # 32,000 bytes: several reads of 4,096
    assert all(is_random_hex(value, 16) for value in made)
    assert len(set(made)) == len(made)
    assert is_random_hex(random_hex(12), 12)
    assert is_random_hex(random_hex(5_000), 5_000)  # more than one read at once


def test_a_forked_child_never_hands_out_what_its_parent_will() -> None:
    random_hex(16)  # the parent holds a buffer with bytes left in it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report its next ids, and leave at once
        os.write(write, ",".join(random_hex(16) for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    theirs = set(os.read(read, 1_000).decode().split(","))
    os.close(read)
    os.waitpid(child, 0)
    mine = {random_hex(16) for _ in range(4)}
    assert len(theirs) == 4
    assert not theirs & mine


def test_threads_never_share_a_slice() -> None:
    found: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(random_hex(8) for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(into,)) for into in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value for into in found for value in into]
    assert len(set(every)) == len(every) == 20_000
    assert ids._entropy.position <= len(ids._entropy.buffer)
