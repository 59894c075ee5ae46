"""The ``sqlite`` backend's ledger: one row per charged request, indexed by team and time."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .ledger import aggregate_entries
from .sqlite_db import SqliteDatabase
from .types import Granularity, LedgerEntry, UsageReport, from_micros, to_micros

__all__ = ["SqliteLedger", "append_entries"]

_LEDGER_COLUMNS = (
    "at, team, key_id, upstream, model, kind, prompt_tokens, completion_tokens, images, "
    "cost_nano, request_id"
)


def append_entries(conn: sqlite3.Connection, entries: Iterable[LedgerEntry]) -> None:
    """Insert ``entries`` in the transaction open on ``conn`` (a budget commit's, or their own)."""
    conn.executemany(
        f"INSERT INTO ledger ({_LEDGER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        [
            (
                to_micros(entry.timestamp),
                entry.team,
                entry.key_id,
                entry.upstream,
                entry.model,
                entry.kind,
                entry.prompt_tokens,
                entry.completion_tokens,
                entry.images,
                entry.cost_nano,
                entry.request_id,
            )
            for entry in entries
        ],
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    at, team, key_id, upstream, model, kind, prompt, completion, images, cost, request_id = row
    return LedgerEntry(
        timestamp=from_micros(at),
        team=team,
        key_id=key_id,
        upstream=upstream,
        model=model,
        kind=kind,
        prompt_tokens=prompt,
        completion_tokens=completion,
        images=images,
        cost_nano=cost,
        request_id=request_id,
    )


class SqliteLedger:
    """:class:`~.protocols.Ledger` in the ``ledger`` table, indexed by team and time."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def record(self, entry: LedgerEntry) -> None:
        await self._db.write(lambda conn: append_entries(conn, (entry,)))

    async def query(self, team: str, since: datetime, until: datetime) -> list[LedgerEntry]:
        bounds = (team, to_micros(since), to_micros(until))

        def run(conn: sqlite3.Connection) -> list[LedgerEntry]:
            rows = conn.execute(
                f"SELECT {_LEDGER_COLUMNS} FROM ledger"  # noqa: S608
                " WHERE team = ? AND at BETWEEN ? AND ? ORDER BY at, seq",
                bounds,
            ).fetchall()
            return [_entry(row) for row in rows]

        return await self._db.read(run)

    async def aggregate(
        self, team: str, since: datetime, until: datetime, granularity: Granularity
    ) -> UsageReport:
        return aggregate_entries(await self.query(team, since, until), granularity)
