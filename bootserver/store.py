"""The store: machines and their event log in SQLite. The only module that speaks SQL.

WAL mode so readers (the CLI, status pages) never block the server; every write is its own
transaction, committed before the call returns, so a killed server loses no recorded event.
The schema is versioned with `PRAGMA user_version`; MIGRATIONS[n] takes version n to n+1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE machines (
        mac        TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen  REAL NOT NULL,
        facts      TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE events (
        id     INTEGER PRIMARY KEY,
        mac    TEXT NOT NULL REFERENCES machines(mac),
        time   REAL NOT NULL,
        kind   TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_mac ON events(mac, id);
    """,
    # Phone-home: one-time tokens (only their hashes), and what a node told us when it called.
    """
    CREATE TABLE tokens (
        id      TEXT PRIMARY KEY,
        hash    TEXT NOT NULL,
        mac     TEXT NOT NULL REFERENCES machines(mac),
        issued  REAL NOT NULL,
        expires REAL NOT NULL,
        used    REAL
    );
    CREATE INDEX tokens_by_mac ON tokens(mac);
    ALTER TABLE machines ADD COLUMN host_key TEXT;
    ALTER TABLE machines ADD COLUMN ip TEXT;
    ALTER TABLE machines ADD COLUMN reprovision INTEGER NOT NULL DEFAULT 0;
    """,
    # DHCP leases of full mode: one row per address; mac NULL for an address a client declined.
    """
    CREATE TABLE leases (
        ip      TEXT PRIMARY KEY,
        mac     TEXT UNIQUE,
        state   TEXT NOT NULL,
        expires REAL NOT NULL
    );
    """,
    # The address that fetched the boot script a token rides on: a phone-home from elsewhere is refused.
    # NULL for tokens issued before this column existed (they expire within token_minutes anyway).
    """
    ALTER TABLE tokens ADD COLUMN ip TEXT;
    """,
]


@dataclass(frozen=True)
class Node:
    """A machine as the store knows it: what it reported and how far it got."""

    mac: str
    state: str
    first_seen: float
    last_seen: float
    facts: dict[str, str] = field(default_factory=dict)
    host_key: str | None = None  # pinned when it phoned home; SSH trusts only this key
    ip: str | None = None  # the address it reported when it phoned home
    reprovision: bool = False  # an operator asked for the whole flow again, disk wipe allowed


@dataclass(frozen=True)
class Token:
    """A one-time phone-home token: the secret itself is never stored, only its hash."""

    id: str
    hash: str
    mac: str
    issued: float
    expires: float
    used: float | None = None
    ip: str | None = None  # who fetched the script it was issued with; None: not known (any address)


@dataclass(frozen=True)
class Lease:
    """An address held by a DHCP client: `offered` until it asks for it, `bound` once acknowledged.

    `declined` addresses (a client found them in use) have no MAC and are held back until `expires`.
    """

    ip: str
    mac: str | None
    state: str
    expires: float


@dataclass(frozen=True)
class Event:
    """One thing that happened to a machine: a script served, a file sent, a report received."""

    id: int
    mac: str
    time: float
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


class _Connection(sqlite3.Connection):
    """A connection whose failures of the environment (disk full, read-only, file gone, locked) are
    StoreUnavailable, a message a person can act on, rather than a bare sqlite3.OperationalError."""

    store_path: Path

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            raise unavailable(self.store_path, exc) from exc


def unavailable(path: Path, exc: sqlite3.Error) -> StoreUnavailable:
    """What went wrong with the store at `path`, and what to do about it."""
    message = str(exc)
    if "full" in message:
        hint = f"free space on the file system holding {path.parent}"
    elif "locked" in message or "busy" in message:
        hint = "another process holds the store's write lock: stop it (bootserver commands only read)"
    else:  # "attempt to write a readonly database", "disk I/O error", "unable to open database file"
        hint = (f"check that {path.parent} and the files in it are writable by bootserver (a file system "
                f"mounted or remounted read-only, an immutable file: lsattr) and the disk is healthy")
    return StoreUnavailable(f"the store {path} cannot be used ({message}): {hint}; "
                            f"nothing of this request was recorded")


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The last write's failure (StoreUnavailable's message); None once a write succeeds again.
        self.problem: str | None = None
        try:
            # isolation_level=None: we open transactions ourselves, explicitly, in _transaction().
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=_Connection)
        except sqlite3.OperationalError as exc:
            raise unavailable(path, exc) from exc
        self._db.store_path = path
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an event acknowledged is an event kept
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self._transaction():
            version = self.schema_version
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this "
                                   f"bootserver knows ({len(MIGRATIONS)}): upgrade bootserver")
            for step in MIGRATIONS[version:]:
                for statement in filter(str.strip, step.split(";")):
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={len(MIGRATIONS)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back whole if anything fails, COMMIT
        included (a full disk often shows only there), so a failed write leaves nothing behind."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except StoreUnavailable as exc:
            if self.problem is None:
                log.warning("%s", exc)  # once per outage, not once per refused request
            self.problem = str(exc)
            raise
        if self.problem is not None:
            log.warning("the store %s can be written again", self.path)
        self.problem = None

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR): nothing left to undo.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error, StoreUnavailable):
                self._db.execute("ROLLBACK")

    def record(self, mac: str, kind: str, detail: dict[str, Any] | None = None, *,
               state: str | None = None, facts: dict[str, str] | None = None) -> Event:
        """Append an event for `mac`, creating the machine on first sight, in one transaction.

        `state` moves the machine to a new state; `facts` merges into what it has reported.
        """
        now = time.time()
        body = json.dumps(detail or {}, sort_keys=True)
        with self._transaction() as db:
            row = db.execute("SELECT facts FROM machines WHERE mac = ?", (mac,)).fetchone()
            if row is None:
                db.execute("INSERT INTO machines (mac, state, first_seen, last_seen, facts) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (mac, state or "discovered", now, now, json.dumps(facts or {})))
            else:
                merged = {**json.loads(row["facts"]), **(facts or {})}
                db.execute("UPDATE machines SET last_seen = ?, state = COALESCE(?, state), facts = ? "
                           "WHERE mac = ?", (now, state, json.dumps(merged), mac))
            cursor = db.execute("INSERT INTO events (mac, time, kind, detail) VALUES (?, ?, ?, ?)",
                                (mac, now, kind, body))
        return Event(cursor.lastrowid or 0, mac, now, kind, detail or {})

    # -- one-time tokens --------------------------------------------------------------------------

    def add_token(self, token: Token) -> None:
        """Keep a new token (its secret only hashed); older unused tokens of the machine stop working."""
        with self._transaction() as db:
            db.execute("UPDATE tokens SET used = ? WHERE mac = ? AND used IS NULL", (token.issued, token.mac))
            db.execute("INSERT INTO tokens (id, hash, mac, issued, expires, ip) VALUES (?, ?, ?, ?, ?, ?)",
                       (token.id, token.hash, token.mac, token.issued, token.expires, token.ip))

    def token(self, token_id: str) -> Token | None:
        row = self._db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            return None
        return Token(row["id"], row["hash"], row["mac"], row["issued"], row["expires"], row["used"], row["ip"])

    def phoned_home(self, token_id: str, mac: str, ip: str, host_key: str, detail: dict[str, Any]) -> bool:
        """Spend the token and pin the node's host key, in one transaction.

        False if the token was spent meanwhile (by a concurrent phone-home): exactly one caller wins.
        """
        now = time.time()
        with self._transaction() as db:
            spent = db.execute("UPDATE tokens SET used = ? WHERE id = ? AND mac = ? AND used IS NULL "
                               "AND expires > ?", (now, token_id, mac, now)).rowcount
            if spent != 1:
                return False
            db.execute("UPDATE machines SET host_key = ?, ip = ?, state = 'phoned-home', last_seen = ? "
                       "WHERE mac = ?", (host_key, ip, now, mac))
            db.execute("INSERT INTO events (mac, time, kind, detail) VALUES (?, ?, 'phoned-home', ?)",
                       (mac, now, json.dumps(detail, sort_keys=True)))
        return True

    def set_reprovision(self, mac: str, wanted: bool) -> None:
        with self._transaction() as db:
            db.execute("UPDATE machines SET reprovision = ? WHERE mac = ?", (int(wanted), mac))

    def nodes_in_state(self, *states: str) -> list[Node]:
        marks = ",".join("?" * len(states))
        return [_node(r) for r in self._db.execute(f"SELECT * FROM machines WHERE state IN ({marks})", states)]

    def node(self, mac: str) -> Node | None:
        row = self._db.execute("SELECT * FROM machines WHERE mac = ?", (mac,)).fetchone()
        return _node(row) if row else None

    def nodes(self) -> list[Node]:
        return [_node(row) for row in self._db.execute("SELECT * FROM machines ORDER BY mac")]

    def events(self, mac: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events of `mac` with id greater than `after`, oldest first."""
        rows = self._db.execute("SELECT * FROM events WHERE mac = ? AND id > ? ORDER BY id LIMIT ?",
                                (mac, after, limit))
        return [Event(r["id"], r["mac"], r["time"], r["kind"], json.loads(r["detail"])) for r in rows]

    # -- status pages and metrics (read-only queries) ---------------------------------------------

    def events_after(self, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events of every machine with id greater than `after`, oldest first (the live overview)."""
        rows = self._db.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [Event(r["id"], r["mac"], r["time"], r["kind"], json.loads(r["detail"])) for r in rows]

    def last_event_id(self, mac: str | None = None) -> int:
        """The newest event's id (of `mac`, or of any machine); 0 when there is none."""
        if mac is None:
            row = self._db.execute("SELECT MAX(id) FROM events").fetchone()
        else:
            row = self._db.execute("SELECT MAX(id) FROM events WHERE mac = ?", (mac,)).fetchone()
        return row[0] or 0

    def state_counts(self) -> dict[str, int]:
        """How many machines are in each state."""
        rows = self._db.execute("SELECT state, COUNT(*) FROM machines GROUP BY state ORDER BY state")
        return {state: count for state, count in rows}

    def bytes_served(self) -> dict[str, int]:
        """Bytes of files served to machines, summed over file-served events, by protocol (http, tftp)."""
        rows = self._db.execute("SELECT json_extract(detail, '$.protocol'), SUM(json_extract(detail, '$.bytes')) "
                                "FROM events WHERE kind = 'file-served' GROUP BY 1 ORDER BY 1")
        return {str(protocol): int(total or 0) for protocol, total in rows}

    def step_durations(self) -> dict[str, tuple[int, float]]:
        """Finished provisioning steps, by step: (how many, total seconds), from step-done events."""
        rows = self._db.execute("SELECT json_extract(detail, '$.step'), COUNT(*), "
                                "SUM(json_extract(detail, '$.seconds')) "
                                "FROM events WHERE kind = 'step-done' GROUP BY 1 ORDER BY 1")
        return {str(step): (count, float(total or 0.0)) for step, count, total in rows}

    def recent_events(self, mac: str, limit: int = 500) -> list[Event]:
        """The newest `limit` events of `mac`, oldest first: what a status page shows of a long history."""
        rows = self._db.execute("SELECT * FROM (SELECT * FROM events WHERE mac = ? ORDER BY id DESC LIMIT ?) "
                                "ORDER BY id", (mac, limit))
        return [Event(r["id"], r["mac"], r["time"], r["kind"], json.loads(r["detail"])) for r in rows]

    # -- DHCP leases (full mode) -------------------------------------------------------------------
    # Each call is one transaction, so two servers on one store file can never hand out one address twice.

    def lease_of(self, mac: str) -> Lease | None:
        row = self._db.execute("SELECT * FROM leases WHERE mac = ?", (mac,)).fetchone()
        return _lease(row) if row else None

    def leases(self) -> list[Lease]:
        return [_lease(row) for row in self._db.execute("SELECT * FROM leases ORDER BY ip")]

    def offer_lease(self, mac: str, candidates: Iterable[str], expires: float) -> Lease | None:
        """Hold an address for `mac`: the one it holds already if that is a candidate, else the first
        candidate nobody holds (or whose lease has run out). None when every candidate is taken."""
        now = time.time()
        with self._transaction() as db:
            wanted = list(candidates)
            row = db.execute("SELECT * FROM leases WHERE mac = ?", (mac,)).fetchone()
            if row is not None and row["ip"] in wanted:
                # An offer never shortens a lease the client holds already.
                db.execute("UPDATE leases SET expires = MAX(expires, ?) WHERE mac = ?", (expires, mac))
                return _lease(db.execute("SELECT * FROM leases WHERE mac = ?", (mac,)).fetchone())
            held = {r["ip"] for r in db.execute("SELECT ip FROM leases WHERE expires > ? AND mac IS NOT ?",
                                                (now, mac))}
            free = next((ip for ip in wanted if ip not in held), None)
            if free is None:
                return None
            db.execute("DELETE FROM leases WHERE mac = ? OR ip = ?", (mac, free))
            db.execute("INSERT INTO leases (ip, mac, state, expires) VALUES (?, ?, 'offered', ?)",
                       (free, mac, expires))
        return Lease(free, mac, "offered", expires)

    def bind_lease(self, mac: str, ip: str, expires: float) -> bool:
        """Give `ip` to `mac` until `expires`; False (nothing changed) while another client holds it."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM leases WHERE ip = ?", (ip,)).fetchone()
            if row is not None and row["mac"] != mac and row["expires"] > now:
                return False
            db.execute("DELETE FROM leases WHERE mac = ? OR ip = ?", (mac, ip))
            db.execute("INSERT INTO leases (ip, mac, state, expires) VALUES (?, ?, 'bound', ?)", (ip, mac, expires))
        return True

    def release_lease(self, mac: str, ip: str | None = None) -> bool:
        """The client gives its address back (or chose another server's offer); True if it held one."""
        with self._transaction() as db:
            if ip is None:
                return db.execute("DELETE FROM leases WHERE mac = ?", (mac,)).rowcount > 0
            return db.execute("DELETE FROM leases WHERE mac = ? AND ip = ?", (mac, ip)).rowcount > 0

    def decline_lease(self, mac: str, ip: str, until: float) -> bool:
        """The client found its address in use on the wire: hold the address back from everyone until `until`."""
        with self._transaction() as db:
            return db.execute("UPDATE leases SET mac = NULL, state = 'declined', expires = ? "
                              "WHERE mac = ? AND ip = ?", (until, mac, ip)).rowcount > 0


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(row["ip"], row["mac"], row["state"], row["expires"])


def _node(row: sqlite3.Row) -> Node:
    return Node(row["mac"], row["state"], row["first_seen"], row["last_seen"], json.loads(row["facts"]),
                row["host_key"], row["ip"], bool(row["reprovision"]))
