"""The embedded default backend: one SQLite file, opened by one server.

WAL mode so readers (the CLI, status pages) never block the server; synchronous=FULL so an event
acknowledged is an event kept, even across a power cut. Writes take the file's write lock at BEGIN
(IMMEDIATE), so two processes on one file serialize instead of failing half-way.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import StoreUnavailable

SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}  # PRAGMA synchronous's numbers, by name

class SqliteBackend:
    kind = "sqlite"
    # Dialect: how the few statements that differ are spelled here (see Store).
    float_type, id_column, blob_type = "REAL", "INTEGER PRIMARY KEY", "BLOB"
    skip_locked = row_lock = ""  # BEGIN IMMEDIATE already holds the only write lock there is
    group_commits = True  # see Store.group_commit

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.location = str(path)
        try:
            # isolation_level=None: transactions are opened explicitly, by begin().
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise self.unavailable(exc) from exc
        self._db.row_factory = sqlite3.Row
        self.execute("PRAGMA journal_mode=WAL")
        self.execute("PRAGMA synchronous=FULL")
        self.execute("PRAGMA foreign_keys=ON")
        self.execute("PRAGMA busy_timeout=5000")

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            raise self.unavailable(exc) from exc

    def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise self.unavailable(exc) from exc

    def durability(self) -> dict[str, str]:
        synchronous = self.execute("PRAGMA synchronous").fetchone()[0]
        return {"journal_mode": self.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": SYNCHRONOUS.get(synchronous, str(synchronous))}

    def changes(self) -> int | None:
        """Rows inserted, updated or deleted on this connection so far: whether a transaction wrote anything."""
        return self._db.total_changes

    def begin(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR): nothing left to undo.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error, StoreUnavailable):
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()

    # -- dialect ----------------------------------------------------------------------------------

    def json_text(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    json_number = json_text

    def lock_for_event(self) -> None:
        """Event ids are assigned in commit order already: one writer at a time."""

    def lock_table(self, table: str) -> None:
        """Nothing to do: the transaction holds the file's only write lock."""

    def identity_follows(self, table: str, column: str) -> None:
        """INTEGER PRIMARY KEY continues after the largest id by itself."""

    def schema_version(self) -> int:
        return self.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        self.execute(f"PRAGMA user_version={int(version)}")

    def lock_schema(self) -> None:
        """BEGIN IMMEDIATE serializes migrations already."""

    def unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        """What went wrong with the file (disk full, read-only, gone, locked), and what to do about it."""
        message = str(exc)
        if "full" in message:
            hint = f"free space on the file system holding {self.path.parent}"
        elif "locked" in message or "busy" in message:
            hint = "another process holds the store's write lock: stop it (bootserver commands only read)"
        else:  # "attempt to write a readonly database", "disk I/O error", "unable to open database file"
            hint = (f"check that {self.path.parent} and the files in it are writable by bootserver (a file system "
                    f"mounted or remounted read-only, an immutable file: lsattr) and the disk is healthy")
        return StoreUnavailable(f"the store {self.path} cannot be used ({message}): {hint}; "
                                f"nothing of this request was recorded")
