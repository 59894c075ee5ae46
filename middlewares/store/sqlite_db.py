"""The ``sqlite`` backend's file: schema, one connection on one worker thread, transactions.

The file is in WAL mode. A *durable* write (spend, the ledger, a release) commits with
``synchronous=FULL``: it survives a crash or a power cut, so no acknowledged spend is lost. An
admission (rate-window counts and reservations) commits with ``synchronous=NORMAL``: it survives a
crash of the process but may be lost with a power cut of the machine — which ends every request it
was admitting, and those are then never charged — and it skips the fsync that would otherwise
come before the first byte of every budgeted request. The WAL is sequential, so the next durable
commit makes every earlier write durable too. Every write runs in ``BEGIN IMMEDIATE``, which takes
the file's write lock before reading, so a read-then-write (a reservation) is atomic across every
process using the file; a process waits up to ``busy_timeout_s`` for the lock. Any
``sqlite3.Error`` becomes :class:`~.types.StoreUnavailable`.

**Group commit.** Writes that arrive while the worker thread is busy wait in a queue; the next
batch runs them all in one transaction, each in its own savepoint, so one write's error rolls back
that write only. Each write still sees the ones before it, and none is acknowledged before the
transaction holding it has committed (and, with ``FULL``, reached the disk) — so sixteen
concurrent requests cost one fsync and one thread hop instead of sixteen.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from .types import StoreUnavailable

__all__ = ["SqliteDatabase"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    team TEXT NOT NULL, key TEXT NOT NULL, period TEXT NOT NULL, spent INTEGER NOT NULL,
    PRIMARY KEY (team, key, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    team TEXT NOT NULL, key TEXT NOT NULL, period TEXT NOT NULL, id TEXT NOT NULL,
    amount INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (team, key, period, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commits (
    team TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL, forget_at REAL NOT NULL,
    PRIMARY KEY (team, key, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commits_forget ON commits (forget_at);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY, team TEXT NOT NULL, at INTEGER NOT NULL, key_id TEXT,
    upstream TEXT NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, images INTEGER NOT NULL,
    cost_nano INTEGER NOT NULL, request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_team_at ON ledger (team, at);
CREATE TABLE IF NOT EXISTS rate_windows (
    team TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, window_s INTEGER NOT NULL,
    window INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (team, key, name, window_s)
) WITHOUT ROWID;
"""


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class _Failed:
    """A write of a batch that raised; its savepoint was rolled back."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


Write = Callable[[sqlite3.Connection], Any]


class SqliteDatabase:
    """One connection to ``path``, used only by one worker thread; open with :meth:`open`."""

    def __init__(self, path: str, busy_timeout_s: float) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sidegate-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Write, asyncio.Future[Any], bool]] = []
        self._batch_running = False
        self._synchronous = "FULL"  # of the worker thread's connection

    @classmethod
    async def open(cls, path: str, *, busy_timeout_s: float = 10.0) -> SqliteDatabase:
        """Open (creating if needed) the database file at ``path``."""
        db = cls(path, busy_timeout_s)
        try:
            await db._run(db._connect)
        except BaseException:
            await db.close()
            raise
        return db

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        self._conn = conn
        self._enter_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        try:
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        finally:
            _rollback(conn)

    def _enter_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL. Two processes creating the file at once can get "database is
        locked" here without the busy timeout being applied, so that is retried until it runs
        out."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)  # on the store's worker thread, before any request

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable() from exc

    def _conn_or_fail(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the database is closed")
        return self._conn

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._transaction("BEGIN IMMEDIATE", fn)

    def _transaction(self, begin: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn_or_fail()
        conn.execute(begin)
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        finally:
            _rollback(conn)
        return result

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` in a ``BEGIN IMMEDIATE`` transaction on the worker thread, batched with the
        writes queued meanwhile; returns once that transaction has committed — to the disk when
        ``durable`` (or when another write of the batch is).

        ``fn`` runs once even if the caller is cancelled while it waits.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, done, durable))
        if not self._batch_running:
            self._next_batch(loop)
        return await done

    def _next_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queue = self._queue, []
        self._batch_running = True
        durable = any(durable for _, _, durable in batch)
        fns = [fn for fn, _, _ in batch]
        job = loop.run_in_executor(self._executor, self._write_batch, fns, durable)
        job.add_done_callback(partial(self._batch_done, loop, batch))

    def _batch_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Write, asyncio.Future[Any], bool]],
        job: asyncio.Future[list[Any]],
    ) -> None:
        self._batch_running = False
        if self._queue:
            self._next_batch(loop)
        error = job.exception() if not job.cancelled() else asyncio.CancelledError()
        outcomes = job.result() if error is None else [_Failed(error)] * len(batch)
        for (_, done, _), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if not isinstance(outcome, _Failed):
                done.set_result(outcome)
            elif isinstance(outcome.error, sqlite3.Error):
                failure = StoreUnavailable()
                failure.__cause__ = outcome.error
                done.set_exception(failure)
            else:
                done.set_exception(outcome.error)

    def _write_batch(self, fns: list[Write], durable: bool) -> list[Any]:
        """One transaction for every write of ``fns``; a savepoint each when there are several."""
        synchronous = "FULL" if durable else "NORMAL"
        if synchronous != self._synchronous:
            self._conn_or_fail().execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        if len(fns) == 1:
            try:
                return [self._write(fns[0])]
            except Exception as exc:
                return [_Failed(exc)]
        conn = self._conn_or_fail()
        outcomes: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn in fns:
                conn.execute("SAVEPOINT sidegate_write")
                try:
                    outcomes.append(fn(conn))
                except Exception as exc:
                    conn.execute("ROLLBACK TO sidegate_write")
                    outcomes.append(_Failed(exc))
                conn.execute("RELEASE sidegate_write")
            conn.execute("COMMIT")
        finally:
            _rollback(conn)
        return outcomes

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a read transaction (one consistent snapshot) on the worker thread."""
        return await self._run(partial(self._transaction, "BEGIN DEFERRED", fn))

    async def close(self) -> None:
        """Close the connection and stop the worker thread."""
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
