"""The store: machines, their event log, tokens, leases and jobs. The only code that speaks SQL.

Two backends behind one class: SQLite (sqlite.py), the embedded default for one server, and
PostgreSQL (postgres.py), for several replicas on one database. Every query is written once, below,
with `?` placeholders in SQL both understand; the backends spell the few things that differ.

Every write is its own transaction, committed before the call returns, so a killed server loses no
recorded event. Two exceptions, for the busiest requests: group_commit() (phone-homes, and boot scripts' other
writes), whose writes share one COMMIT, the request answered only once that COMMIT is done; and record_behind()
(a boot script's event and its token's row), kept in memory and written within WRITE_BEHIND_SECONDS, the request
answered at once: what a server killed in that interval loses is the record of scripts whose signed tokens work
without it (tokens.py).

The schema (its versioned migrations) is schema.py; the records the store returns are records.py. The Store
class stays one long module on purpose: it is every query of the package, each written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..errors import BootserverError, StoreUnavailable
from . import records
from .behind import WRITE_BEHIND_LIMIT, WRITE_BEHIND_SECONDS, Behind, Pending
from .postgres import PostgresBackend
from .records import Committed, Event, JobClaim, Lease, Listed, Member, Node, Token
from .schema import MIGRATIONS, TABLES, TOTALS, TOTALS_VERSION
from .sqlite import SqliteBackend

log = logging.getLogger(__name__)

Backend = SqliteBackend | PostgresBackend


# What a Store counts in memory since it opened: largest_* are the most one write held, the rest totals.
FIGURES = ("group_commits", "group_committed_requests", "largest_group_commit", "behind_flushes", "written_behind",
           "largest_behind", "behind_waits", "queued_behind")


class Store:
    def __init__(self, location: Path | str, replica: str | None = None, migrate: bool = True) -> None:
        """`location`: an SQLite file (a path, or sqlite:///path) or a postgresql:// URL.
        `replica`: this server's name, stamped on every event it records (default: the host name).
        `migrate`: bring the schema up to date now (only `bootserver db migrate` does it later)."""
        self._db: Backend = open_backend(location)
        self.kind = self._db.kind
        self.location = self._db.location
        self.path = self._db.path if isinstance(self._db, SqliteBackend) else None  # SQLite's file
        self.replica = replica or socket.gethostname()
        # The last write's failure (StoreUnavailable's message); None once a write succeeds again.
        self.problem: str | None = None
        self._grouping = False  # inside group_commit(): writes join the open batch
        self._batch: asyncio.Future[None] | None = None  # the open batch's COMMIT; None: no batch open
        self._joined: list[asyncio.Future[None]] = []  # the batches the current group_commit() block wrote to
        self._members = 0  # group_commit() blocks (requests) that wrote to the open batch
        # Since this Store opened: batches committed, the requests they held, the most one held (for /metrics).
        self.group_commits = self.group_committed_requests = self.largest_group_commit = 0
        self._pending = Pending()  # record_behind()'s records, not yet written
        self._behind_timer: asyncio.TimerHandle | None = None  # when the queue is written next
        # record_behind()'s writes are made on a thread of their own, on a connection of their own (opened now, so
        # that a server's open files do not grow at its first boot script): the event loop serves on during their
        # COMMIT. One at a time: the one under way is the flight.
        self._executor: ThreadPoolExecutor | None = None
        self._writer: Backend = open_backend(location)
        self._flight: Future[None] | None = None
        # Since this Store opened: write-behind flushes, the records they wrote, the most one wrote, and the records
        # that found the queue full and waited for a synchronous write (for /metrics).
        self.behind_flushes = self.written_behind = self.largest_behind = self.behind_waits = 0
        if migrate:
            self._migrate()

    def close(self) -> None:
        if self._behind_timer is not None:
            self._behind_timer.cancel()
        try:
            self.flush_behind()
        except StoreUnavailable as exc:
            log.error("%d records kept in memory behind boot scripts could not be written, and are lost: %s",
                      len(self._pending), exc)
        self.flush()
        if self._executor is not None:
            self._executor.shutdown()
        self._writer.close()
        self._db.close()

    def durability(self) -> dict[str, str]:
        """The settings a commit's durability rests on, as the live connection has them (SQLite: journal_mode and
        synchronous; PostgreSQL: fsync and synchronous_commit): what /metrics reports, so a test or an operator can
        see them on a running server rather than trust the code that set them."""
        return self._db.durability()

    @property
    def schema_version(self) -> int:
        return self._db.schema_version()

    def migrate(self) -> tuple[int, int]:
        """Bring the schema to this bootserver's version: (from, to)."""
        before = self.schema_version
        self._migrate()
        return before, self.schema_version

    def _migrate(self) -> None:
        with self._transaction():
            self._db.lock_schema()
            version = self._db.schema_version()
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{self.location} has schema version {version}, newer than this "
                                   f"bootserver knows ({len(MIGRATIONS)}): upgrade bootserver")
            types = {"float": self._db.float_type, "id": self._db.id_column, "blob": self._db.blob_type}
            for step in MIGRATIONS[version:]:
                for statement in filter(str.strip, step.format(**types).split(";")):
                    self._db.execute(statement)
            if version < TOTALS_VERSION <= len(MIGRATIONS):
                self._sum_totals_from_events()
            if version < len(MIGRATIONS):
                self._db.set_schema_version(len(MIGRATIONS))

    def _sum_totals_from_events(self) -> None:
        db = self._db
        for kind, (prefix, key, number) in TOTALS.items():
            name, amount = db.json_text("detail", key), db.json_number("detail", number)
            db.execute(f"INSERT INTO totals (name, count, value) SELECT '{prefix}' || COALESCE({name}, 'None'), "
                       f"COUNT(*), COALESCE(SUM({amount}), 0) FROM events WHERE kind = '{kind}' GROUP BY 1")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Backend]:
        """One transaction: committed when the block ends, rolled back whole if anything fails, COMMIT
        included (a full disk often shows only there), so a failed write leaves nothing behind."""
        if self._pending:  # what was recorded before this is written before it: the event log keeps its order
            self.flush_behind()
        if self._grouping:
            with self._in_batch() as db:
                yield db
            return
        self.flush()  # a write outside group_commit() is durable when it returns: so is the batch before it
        changes = self._db.changes()
        try:
            self._db.begin()
            try:
                yield self._db
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
        except StoreUnavailable as exc:
            self._failed(exc)
            raise
        # A transaction that changed no row (a job poll that found none) proves nothing: SQLite commits it without
        # writing a byte, even on a file system turned read-only, and must not clear the problem every second.
        if changes is None or self._db.changes() != changes:
            self._succeeded()

    def _failed(self, exc: StoreUnavailable) -> None:
        if self.problem is None:
            log.warning("%s", exc)  # once per outage, not once per refused request
        self.problem = str(exc)

    def _succeeded(self) -> None:
        if self.problem is not None:
            log.warning("the store %s can be written again", self.location)
        self.problem = None

    # -- group commit ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def group_commit(self) -> Iterator[Committed]:
        """Writes in this block join a batch that commits once, on the event loop's next turn, together
        with every other request's of this turn: one fsync for all of them instead of one each (a fifth of
        a phone-home's time, a third of a boot script's). Await the yielded Committed before answering:
        it raises StoreUnavailable if the batch could not be committed, and then nothing of it was kept.
        The block itself must not await: every write made while it runs joins the batch, whoever makes it.

        SQLite only. On PostgreSQL the writes commit one by one as usual: a batch would hold one replica's
        row locks and its event-order lock together for a whole turn (a deadlock with another replica),
        and the database groups concurrent commits itself.
        """
        committed = Committed()
        if not self._db.group_commits:
            yield committed
            return
        outermost, self._grouping = not self._grouping, True
        joined, self._joined = self._joined, committed.batches
        try:
            yield committed
        finally:
            self._joined = joined
            if outermost:
                self._grouping = False

    @contextlib.contextmanager
    def _in_batch(self) -> Iterator[Backend]:
        """One write of a batch: a savepoint in the batch's transaction, undone alone if it fails."""
        try:
            if self._batch is not None and not self._db.in_transaction():
                self._lose_batch(StoreUnavailable(f"the store {self.location} rolled back this turn's writes"))
            if self._batch is None:
                loop = asyncio.get_running_loop()  # first: a failure here must not leave a transaction open
                batch = loop.create_future()
                # Nobody may be left waiting on a failed batch; that must not be logged as "never retrieved".
                batch.add_done_callback(lambda f: f.cancelled() or f.exception())
                self._db.begin()
                self._batch, self._members = batch, 0
                loop.call_soon(self.flush)
            if self._batch not in self._joined:
                self._joined.append(self._batch)
                self._members += 1
            self._db.execute("SAVEPOINT write")
            try:
                yield self._db
                self._db.execute("RELEASE write")
            except BaseException as exc:
                if self._db.in_transaction():
                    self._db.execute("ROLLBACK TO write")
                    self._db.execute("RELEASE write")
                else:  # SQLite rolled the whole batch back by itself (a full disk, an I/O error)
                    self._lose_batch(exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(
                        f"the store {self.location} rolled back this turn's writes: {exc}"))
                raise
        except StoreUnavailable as exc:
            self._failed(exc)
            raise

    def _lose_batch(self, exc: StoreUnavailable) -> None:
        """The open batch is gone: everyone waiting on it is told, and the next write starts a new one."""
        batch, self._batch = self._batch, None
        self._db.rollback()
        if batch is not None and not batch.done():
            batch.set_exception(exc)

    def flush(self) -> None:
        """Commit the open batch, if there is one, and tell everyone waiting on it."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._db.commit()
        except Exception as exc:
            self._db.rollback()
            if isinstance(exc, StoreUnavailable):
                self._failed(exc)
            if not batch.done():
                batch.set_exception(exc)
            return
        self._succeeded()
        self.group_commits += 1
        self.group_committed_requests += self._members
        self.largest_group_commit = max(self.largest_group_commit, self._members)
        if not batch.done():
            batch.set_result(None)

    def _rows(self, sql: str, parameters: Any = ()) -> list[Any]:
        return self._db.execute(sql, parameters).fetchall()

    def _row(self, sql: str, parameters: Any = ()) -> Any:
        return self._db.execute(sql, parameters).fetchone()

    def _insert_event(self, db: Backend, mac: str, now: float, kind: str, detail: dict[str, Any]) -> int:
        """Last in its transaction: on PostgreSQL event writers pass here one at a time (ids in commit order),
        so a writer holding this lock must not then wait for a row another writer holds (a deadlock): the
        event's running total, a row of its own, is added before the lock."""
        total = _total_of(kind, detail)
        if total is not None:
            db.execute(_ADD_TOTAL, total)
        db.lock_for_event()
        return db.execute("INSERT INTO events (mac, time, kind, detail, replica) VALUES (?, ?, ?, ?, ?) "
                          "RETURNING id", (mac, now, kind, json.dumps(detail, sort_keys=True),
                                           self.replica)).fetchone()["id"]

    def record(self, mac: str, kind: str, detail: dict[str, Any] | None = None, *,
               state: str | None = None, facts: dict[str, str] | None = None, token: Token | None = None,
               only_from: Iterable[str] | None = None) -> Event:
        """Append an event for `mac`, creating the machine on first sight, in one transaction.

        `state` moves the machine to a new state (if it is in one of `only_from`, when given); `facts` merges
        into what it has reported; `token` is kept with it (as add_token does), in the same transaction: one
        commit per boot script, not two.
        """
        now = time.time()
        state = None if state is None else str(state)  # a lifecycle State is stored as its text
        with self._transaction() as db:
            # Two replicas may see a new machine at once: one inserts, the other updates.
            created = db.execute("INSERT INTO machines (mac, state, first_seen, last_seen, facts) "
                                 "VALUES (?, ?, ?, ?, ?) ON CONFLICT (mac) DO NOTHING",
                                 (mac, (only_from is None and state) or "discovered", now, now,
                                  json.dumps(facts or {}))).rowcount
            if not created:
                _seen(db, mac, now, facts, state, only_from)
            if token is not None:
                _insert_token(db, token)
            event_id = self._insert_event(db, mac, now, kind, detail or {})
        return Event(event_id, mac, now, kind, detail or {}, self.replica)

    # -- write-behind --------------------------------------------------------------------------------

    def record_behind(self, mac: str, kind: str, detail: dict[str, Any] | None = None, *,
                      state: str | None = None, facts: dict[str, str] | None = None, token: Token | None = None,
                      only_from: Iterable[str] | None = None) -> None:
        """record(), written behind: kept in memory and written with the others of its interval within
        WRITE_BEHIND_SECONDS, before any other write (the event log keeps its order), and at close. The caller
        answers at once: use it only where losing the record to a killed server loses no guarantee (a boot script
        with a signed token). Never dropped: when WRITE_BEHIND_LIMIT records wait, this one waits for a synchronous
        write (StoreUnavailable if there is none to be had). While the last write failed (`problem`), and outside an
        event loop, it is record(): a store known to be failing refuses the request instead of promising a write."""
        state = None if state is None else str(state)
        only = only_from if only_from is None or isinstance(only_from, frozenset) else frozenset(map(str, only_from))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self.problem is not None:
            self.record(mac, kind, detail, state=state, facts=facts, token=token, only_from=only)
            return
        if len(self._pending) >= WRITE_BEHIND_LIMIT:  # a caller that could wait did (room_behind)
            self.behind_waits += 1
            self.flush_behind()
        self._pending.add(Behind(mac, time.time(), kind, detail or {}, state, facts, token, only))
        if self._behind_timer is None and self._flight is None:  # else _landed sets the next one
            self._behind_timer = loop.call_later(WRITE_BEHIND_SECONDS, self._write_behind_later)

    async def room_behind(self) -> None:
        """Wait until the write-behind queue has room: WRITE_BEHIND_LIMIT records waiting would make record_behind
        write them on the spot, holding the event loop (stalls of hundreds of ms, every request of this process
        with them). Here the caller waits for the writer thread instead and the loop serves on. A store known to
        be failing does not wait: record_behind refuses the request at once."""
        if len(self._pending) < WRITE_BEHIND_LIMIT:
            return
        self.behind_waits += 1
        while len(self._pending) >= WRITE_BEHIND_LIMIT and self.problem is None:
            if self._flight is None:  # its interval not over yet: the write starts now
                if self._behind_timer is not None:
                    self._behind_timer.cancel()
                self._write_behind_later()
            flight = self._flight
            if flight is None:
                return
            try:
                await asyncio.wrap_future(flight)
            except Exception:  # _landed queues its records again (or marks the store failing): not ours to retry
                return
            await asyncio.sleep(0)  # _landed runs on the loop once the flight is done

    def _write_behind_later(self) -> None:
        """The interval is over: what is queued is written on the writer thread, the event loop serving on."""
        self._behind_timer = None
        if self._flight is not None or not self._pending.records:
            return
        records = self._pending.take()
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="bootserver-store")
        flight = self._executor.submit(self._write_apart, records)
        self._flight = flight
        flight.add_done_callback(lambda done: _call_soon(loop, self._landed, done))

    def _write_apart(self, records: list[Behind]) -> None:
        """On the writer thread, on a connection of its own: one transaction (its COMMIT's fsync blocks only here)."""
        db = self._writer
        try:
            db.begin()
            self._write_behind(db, records)
            db.commit()
        except BaseException:
            db.rollback()
            raise

    def _landed(self, flight: Future[None]) -> None:
        """The writer thread's write is over: counted, or its records queued again (first). On the event loop."""
        if flight is not self._flight:
            return  # seen to already, by _land_flight
        self._flight = None
        exc = flight.exception()
        if exc is None:
            self._counted_behind(len(self._pending.flying))
            self._pending.landed()
            self._succeeded()
        else:
            self._pending.failed()
            if isinstance(exc, StoreUnavailable):
                self._failed(exc)
            else:
                log.error("writing %d records kept behind boot scripts failed, trying again in 1 s: %r",
                          len(self._pending), exc)
        if self._pending.records and self._behind_timer is None:
            with contextlib.suppress(RuntimeError):  # no event loop (any more): close() writes what waits
                delay = WRITE_BEHIND_SECONDS if exc is None else 1.0
                self._behind_timer = asyncio.get_running_loop().call_later(delay, self._write_behind_later)

    def _land_flight(self) -> None:
        """Wait for the writer thread's write, if one is under way: nothing is written before it lands."""
        flight = self._flight
        if flight is None:
            return
        self.flush()  # an open group-commit batch holds the write lock that write may be waiting for
        wait([flight])
        self._landed(flight)

    @property
    def queued_behind(self) -> int:
        return len(self._pending)

    def figures(self) -> dict[str, int]:
        """What this Store counted since it opened (for /metrics; names as the attributes)."""
        return {name: getattr(self, name) for name in FIGURES}

    def _written(self) -> None:
        """Before a read of machines or events: what record_behind queued is written, so the read sees it."""
        if self._pending:
            self.flush_behind()

    def flush_behind(self) -> None:
        """Write every record_behind() record now, on this thread; on failure they stay queued, in order.

        Never in a group_commit() batch, whose COMMIT comes later and may fail with nobody to put them back: in
        a transaction of their own (after the open batch, if there is one, is committed)."""
        self._land_flight()
        if not self._pending.records:
            return
        records = self._pending.take()
        grouping, self._grouping = self._grouping, False
        try:
            with self._transaction() as db:
                self._write_behind(db, records)
        except BaseException:
            self._pending.failed()
            raise
        finally:
            self._grouping = grouping
        self._counted_behind(len(records))
        self._pending.landed()

    def _counted_behind(self, written: int) -> None:
        self.behind_flushes += 1
        self.written_behind += written
        self.largest_behind = max(self.largest_behind, written)

    def _write_behind(self, db: Backend, records: list[Behind]) -> None:
        """What record() would write for each, folded by machine: one row update per machine, each machine's tokens
        (retired but its newest), every event. Machines in one order (every replica's rows lock in it), events last."""
        by_mac: dict[str, list[Behind]] = {}
        for record in records:
            by_mac.setdefault(record.mac, []).append(record)
        for mac in sorted(by_mac):
            mine = by_mac[mac]
            # A machine first seen in these records is written as they leave it, in one statement (a boot storm's
            # scripts are mostly such); one we had is read, locked, and written back with what they change.
            state, facts = _folded("discovered", {}, mine)
            if not db.execute("INSERT INTO machines (mac, state, first_seen, last_seen, facts) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (mac) DO NOTHING",
                              (mac, state, mine[0].time, mine[-1].time, json.dumps(facts))).rowcount:
                row = db.execute("SELECT facts, state FROM machines WHERE mac = ?" + db.row_lock, (mac,)).fetchone()
                state, facts = _folded(row["state"], json.loads(row["facts"]), mine)
                db.execute("UPDATE machines SET last_seen = ?, state = ?, facts = ? WHERE mac = ?",
                           (mine[-1].time, state, json.dumps(facts), mac))
            issued = [r.token for r in mine if r.token is not None]
            if issued:
                newest = issued[-1]  # the last one served (two in one millisecond have one issue time)
                _retire_tokens(db, newest)
                db.execute_many(_INSERT_TOKEN + " ON CONFLICT (id) DO NOTHING",
                                [_token_row(t, None if t is newest else newest.issued) for t in issued])
        for record in records:
            total = _total_of(record.kind, record.detail)
            if total is not None:
                db.execute(_ADD_TOTAL, total)
        db.lock_for_event()
        db.execute_many("INSERT INTO events (mac, time, kind, detail, replica) VALUES (?, ?, ?, ?, ?)",
                        [(r.mac, r.time, r.kind, json.dumps(r.detail, sort_keys=True), self.replica)
                         for r in records])

    # -- one-time tokens --------------------------------------------------------------------------

    def add_token(self, token: Token) -> None:
        """Keep a new token (its secret only hashed); older unused tokens of the machine stop working."""
        with self._transaction() as db:
            _insert_token(db, token)

    def token(self, token_id: str) -> Token | None:
        """A token's row by id (one still queued by record_behind included), as it stands: spent, retired or live."""
        queued = self._pending.token(token_id)
        if queued is not None:
            return queued
        row = self._row("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return None if row is None else self._pending.retired(records.token(row))

    def live_token(self, mac: str, now: float | None = None) -> Token | None:
        """The machine's newest token that is neither spent nor expired: the claim of the boot under way."""
        now = now or time.time()
        queued = self._pending.newest(mac)
        if queued is not None and queued.expires > now:
            return queued
        row = self._row("SELECT * FROM tokens WHERE mac = ? AND used IS NULL AND expires > ? AND purpose = 'boot' "
                        "ORDER BY issued DESC LIMIT 1", (mac, now))
        return records.token(row) if row else None

    def phoned_home(self, token: Token, ip: str, host_key: str, detail: dict[str, Any],
                    facts: dict[str, str] | None = None) -> bool:
        """Spend `token` (a boot token, checked by tokens.check), pin the node's host key, merge `facts` (what the
        agent read on the machine) into its facts and queue its provisioning job, in one transaction.

        False if the token was spent meanwhile (by a concurrent phone-home, to this replica or another), a newer
        one of the machine retired it, or the machine's claims are held: exactly one caller wins, so exactly one
        job is queued. The token's row need not exist (its issue may not have been written: tokens.py).
        """
        now, mac = time.time(), token.mac
        with self._transaction() as db:
            # The machine first, as record() takes it: a script served to this machine at this moment (its token
            # written under the machine's lock) waits for us, instead of each holding what the other needs.
            # Its row, if the script's record is not written yet (another replica's, or lost with a killed server).
            db.execute("INSERT INTO machines (mac, state, first_seen, last_seen, facts) VALUES (?, 'discovered', ?, ?, "
                       "'{}') ON CONFLICT (mac) DO NOTHING", (mac, token.issued, now))
            machine = db.execute("SELECT held FROM machines WHERE mac = ?" + db.row_lock, (mac,)).fetchone()
            # Not while the machine's claims are held: a conflict found after the check in the core wins.
            if machine["held"] is not None or db.execute(
                    "SELECT 1 FROM tokens WHERE mac = ? AND purpose = 'boot' AND issued > ? AND id <> ?",
                    (mac, token.issued, token.id)).fetchone() is not None:
                return False
            # Once: the row is made spent, or an unspent one spent. Atomic on both backends (PostgreSQL re-checks
            # `used IS NULL` after waiting for a competing row lock).
            spent = db.execute(_INSERT_TOKEN + " ON CONFLICT (id) DO UPDATE SET used = excluded.used "
                               "WHERE tokens.used IS NULL AND tokens.mac = excluded.mac AND tokens.purpose = 'boot'",
                               _token_row(token, used=now)).rowcount
            if spent != 1:
                return False
            # The provisioning window closes at the first accepted phone-home.
            db.execute("UPDATE machines SET host_key = ?, ip = ?, state = 'phoned-home', last_seen = ?, "
                       "window_until = NULL WHERE mac = ?", (host_key, ip, now, mac))
            _seen(db, mac, now, facts)
            self._queue_job(db, mac, now)
            self._insert_event(db, mac, now, "phoned-home", detail)
        return True

    def installed(self, mac: str, os_host_key: str, report_token: Token, detail: dict[str, Any]) -> Event:
        """An OS is on the machine's disk: pin the host key the server made for it and keep the token its first
        boot reports with, in one transaction with the event."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE machines SET os_host_key = ?, last_seen = ? WHERE mac = ?", (os_host_key, now, mac))
            _insert_token(db, report_token)
            event_id = self._insert_event(db, mac, now, "installed", detail)
        return Event(event_id, mac, now, "installed", detail, self.replica)

    def os_reported(self, token_id: str, mac: str, ip: str, detail: dict[str, Any],
                    facts: dict[str, str] | None = None) -> bool:
        """The installed OS reported its first boot: spend its report token, note its address, merge `facts` into
        its facts, move it to booted and queue the job that runs its health checks. False if the token was
        spent meanwhile."""
        now = time.time()
        with self._transaction() as db:
            db.execute("SELECT mac FROM machines WHERE mac = ?" + db.row_lock, (mac,))
            spent = db.execute("UPDATE tokens SET used = ? WHERE id = ? AND mac = ? AND used IS NULL "
                               "AND expires > ? AND purpose = 'report'", (now, token_id, mac, now)).rowcount
            if spent != 1:
                return False
            db.execute("UPDATE machines SET ip = ?, state = 'booted', last_seen = ? WHERE mac = ?", (ip, now, mac))
            _seen(db, mac, now, facts)
            self._queue_job(db, mac, now)
            self._insert_event(db, mac, now, "booted", detail)
        return True

    def _queue_job(self, db: Backend, mac: str, now: float) -> None:
        # Queued under the replica that accepted it: if that replica restarts before a claim, the job is its
        # to settle (interrupted); any replica may claim it meanwhile.
        db.execute("INSERT INTO jobs (mac, state, owner, created, updated) VALUES (?, 'queued', ?, ?, ?) "
                   "ON CONFLICT (mac) DO UPDATE SET state = 'queued', owner = excluded.owner, "
                   "lease_until = NULL, updated = excluded.updated", (mac, self.replica, now, now))

    def prune_tokens(self, expired_before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` tokens that expired before `expired_before`; how many went.

        Bounded so that the first prune of a long-running store does not hold the event loop or the
        database for long: the next call goes on. A pruned token presented later is "unknown" instead of
        "used already" or "expired", refused all the same.
        """
        with self._transaction() as db:
            return db.execute("DELETE FROM tokens WHERE id IN (SELECT id FROM tokens WHERE expires < ? "
                              "ORDER BY expires LIMIT ?)", (expired_before, limit)).rowcount

    def prune_events(self, before: float, limit: int = 10_000) -> int:
        """Delete events recorded before `before` among the oldest `limit` (by id); how many went.

        Looks at the oldest ids only, so a call on a store with nothing to prune costs one short index
        scan, not a pass over every event; the next call goes on where this one stopped. Metrics do not
        change: their totals are kept apart (the totals table).
        """
        with self._transaction() as db:
            return db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?) "
                              "AND time < ?", (limit, before)).rowcount

    def open_window(self, mac: str, until: float, kind: str, detail: dict[str, Any], *, state: str | None = None,
                    reprovision: bool | None = None) -> Event:
        """An operator approved `mac` (seen or not): it may be provisioned until `until`; held claims are let go.
        The event `kind` says which action did it; `state` and `reprovision` change with it, in one transaction."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO machines (mac, state, first_seen, last_seen, facts) VALUES (?, 'new', ?, ?, '{}') "
                       "ON CONFLICT (mac) DO NOTHING", (mac, now, now))
            db.execute("UPDATE machines SET window_until = ?, held = NULL, state = COALESCE(?, state), "
                       "reprovision = COALESCE(?, reprovision) WHERE mac = ?",
                       (until, state, None if reprovision is None else int(reprovision), mac))
            event_id = self._insert_event(db, mac, now, kind, detail)
        return Event(event_id, mac, now, kind, detail, self.replica)

    def hold(self, mac: str, why: str, detail: dict[str, Any]) -> Event:
        """Two addresses claimed `mac`: hold its claims (no token, no phone-home) until an operator approves."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE machines SET held = ?, last_seen = ? WHERE mac = ?", (why, now, mac))
            event_id = self._insert_event(db, mac, now, "claim-conflict", detail)
        return Event(event_id, mac, now, "claim-conflict", detail, self.replica)

    def touch(self, mac: str, facts: dict[str, str] | None = None) -> None:
        """`mac` asked again for what it was told before (a waiting machine polls): last seen, no new event."""
        with self._transaction() as db:
            _seen(db, mac, time.time(), facts)

    def set_reprovision(self, mac: str, wanted: bool) -> None:
        with self._transaction() as db:
            db.execute("UPDATE machines SET reprovision = ? WHERE mac = ?", (int(wanted), mac))

    # -- provisioning jobs (one per machine; any replica may claim a queued one) ------------------------

    def claim_job(self, owner: str, lease_seconds: float, busy: Iterable[str] = ()) -> JobClaim | None:
        """Take the oldest queued job, or one whose owner's lease lapsed (that replica died), for `owner`;
        not one of a machine at an address in `busy` (that address has all the jobs it may have at once)."""
        now = time.time()
        skip = list(busy)
        unless = (f" AND mac NOT IN (SELECT mac FROM machines WHERE ip IN ({','.join('?' * len(skip))}))"
                  if skip else "")
        claimable = "(state = 'queued' OR (state = 'running' AND lease_until < ? AND owner <> ?))" + unless
        parameters = (now, owner, *skip)
        # Most polls (one a second) find nothing: they only read. A transaction would first write what
        # record_behind queued and wait for the write lock behind every process's writer thread, on the event
        # loop: stalls of up to a few hundred ms with worker processes (benchmarks/loop_stalls.py), their p99.
        if self._row(f"SELECT 1 FROM jobs WHERE {claimable} LIMIT 1", parameters) is None:
            return None
        with self._transaction() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE {claimable} ORDER BY created LIMIT 1{db.skip_locked}",
                             parameters).fetchone()
            if row is None:
                return None
            lapsed = row["owner"] if row["state"] == "running" else None
            until = now + lease_seconds
            db.execute("UPDATE jobs SET state = 'running', owner = ?, lease_until = ?, attempt = attempt + 1, "
                       "updated = ? WHERE mac = ?", (owner, until, now, row["mac"]))
        return JobClaim(row["mac"], owner, row["attempt"] + 1, until, lapsed)

    def renew_jobs(self, owner: str, macs: Iterable[str], lease_seconds: float) -> set[str]:
        """Extend `owner`'s leases on `macs`; the MACs it still holds (a missing one was taken over)."""
        wanted = list(macs)
        if not wanted:
            return set()
        now = time.time()
        marks = ",".join("?" * len(wanted))
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET lease_until = ?, updated = ? WHERE owner = ? AND state = 'running' "
                       f"AND mac IN ({marks})", (now + lease_seconds, now, owner, *wanted))
            rows = db.execute(f"SELECT mac FROM jobs WHERE owner = ? AND state = 'running' AND mac IN ({marks})",
                              (owner, *wanted)).fetchall()
        return {row["mac"] for row in rows}

    def finish_job(self, mac: str, owner: str) -> bool:
        """The job is over (whatever its outcome); False when `owner` no longer held it."""
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET state = 'done', lease_until = NULL, updated = ? "
                              "WHERE mac = ? AND owner = ? AND state <> 'done'",
                              (time.time(), mac, owner)).rowcount == 1

    def requeue_job(self, mac: str) -> None:
        """Queue the machine's job again, for whichever replica claims next (work that is safe to redo)."""
        now = time.time()
        with self._transaction() as db:
            self._queue_job(db, mac, now)

    def unfinished_jobs(self, owner: str) -> list[JobClaim]:
        """The jobs `owner` accepted (queued) or holds (running): after its own restart, what it left."""
        return [records.job(row) for row in self._rows("SELECT * FROM jobs WHERE owner = ? AND state <> 'done' "
                                                "ORDER BY created", (owner,))]

    def job(self, mac: str) -> JobClaim | None:
        row = self._row("SELECT * FROM jobs WHERE mac = ?", (mac,))
        return records.job(row) if row else None

    # -- secrets every replica shares (encrypted by the caller) ---------------------------------------

    def secret(self, name: str) -> bytes | None:
        row = self._row("SELECT value FROM secrets WHERE name = ?", (name,))
        return bytes(row["value"]) if row else None

    def put_secret_once(self, name: str, value: bytes) -> bytes:
        """Keep `value` unless `name` is stored already; what is stored. Replicas that start together
        each generate one: the first to commit wins, and all use its value."""
        with self._transaction() as db:
            db.execute("INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, value))
            return bytes(db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()["value"])

    def copy_into(self, target: Store) -> dict[str, int]:
        """Copy everything into `target`, an empty store (SQLite to PostgreSQL): rows copied, by table."""
        return _copy_into(self, target)

    # -- machines ---------------------------------------------------------------------------------

    def nodes_in_state(self, *states: str) -> list[Node]:
        return self.nodes(states=states)

    def node(self, mac: str) -> Node | None:
        self._written()
        return self.written_node(mac)

    def written_node(self, mac: str) -> Node | None:
        """The machine's row without first writing what record_behind queued: for the boot-script path, where no
        queued record can change what the next script decides (a queued script leaves the machine in a state that
        expects a boot, as the written row does), and a write per request is what record_behind spares."""
        row = self._row("SELECT * FROM machines WHERE mac = ?", (mac,))
        return records.node(row) if row else None

    def nodes(self, after: str | None = None, limit: int | None = None,
              states: Iterable[str] = ()) -> list[Node]:
        """Machines by MAC: those after `after`, at most `limit`, only in `states` when given."""
        self._written()
        where, parameters = ["mac > ?"], [after or ""]
        wanted = list(states)
        if wanted:
            where.append(f"state IN ({','.join('?' * len(wanted))})")
            parameters += wanted
        sql = f"SELECT * FROM machines WHERE {' AND '.join(where)} ORDER BY mac"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)
        return [records.node(row) for row in self._rows(sql, parameters)]

    def listing(self, states: Iterable[str] = ()) -> list[Listed]:
        """Every machine (in `states`, when given) with only what the list sorts by: a sorted page of 10,000
        machines without loading each whole (its facts are most of a row's cost)."""
        self._written()
        wanted = list(states)
        where = f" WHERE state IN ({','.join('?' * len(wanted))})" if wanted else ""
        return [Listed(row["mac"], row["state"], row["ip"], row["last_seen"])
                for row in self._rows(f"SELECT mac, state, ip, last_seen FROM machines{where}", wanted)]

    def nodes_of(self, macs: Iterable[str]) -> list[Node]:
        """These machines (those that exist), in the order given."""
        self._written()
        wanted = list(macs)
        if not wanted:
            return []
        rows = self._rows(f"SELECT * FROM machines WHERE mac IN ({','.join('?' * len(wanted))})", wanted)
        found = {row["mac"]: records.node(row) for row in rows}
        return [found[mac] for mac in wanted if mac in found]

    def members(self) -> list[Member]:
        """Every admitted machine's address and the facts that choose its group: what a group's member list needs,
        for each job, without loading every machine whole. Admitted: it phoned home with a token we issued (a
        MAC that only asked for files, as anyone on the boot network may, is no member of anything)."""
        self._written()
        # The two facts picked out by the database: decoding every machine's facts in Python made a group's list
        # of 1,000 machines cost each job ~4 ms (every job of a 1,000-machine storm asks).
        arch, platform = self._db.json_text("facts", "arch"), self._db.json_text("facts", "platform")
        rows = self._rows(f"SELECT mac, ip, {arch} AS arch, {platform} AS platform FROM machines "
                          "WHERE host_key IS NOT NULL")
        return [Member(row["mac"], row["ip"], row["arch"], row["platform"]) for row in rows]

    def node_count(self) -> int:
        self._written()
        return self._row("SELECT COUNT(*) AS n FROM machines")["n"]

    def events(self, mac: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events of `mac` with id greater than `after`, oldest first."""
        self._written()
        rows = self._rows("SELECT * FROM events WHERE mac = ? AND id > ? ORDER BY id LIMIT ?", (mac, after, limit))
        return [records.event(r) for r in rows]

    # -- status pages and metrics (read-only queries) ---------------------------------------------

    def events_after(self, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events of every machine with id greater than `after`, oldest first (the live overview, the fleet): what is
        written, without writing what waits first (a live view polls; a record written behind follows within
        WRITE_BEHIND_SECONDS, its id after every id already read, as every write comes after what waits)."""
        rows = self._rows("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [records.event(r) for r in rows]

    def last_event_id(self, mac: str | None = None) -> int:
        """The newest event's id (of `mac`, or of any machine) written; 0 when there is none (see events_after)."""
        if mac is None:
            row = self._row("SELECT MAX(id) AS last FROM events")
        else:
            row = self._row("SELECT MAX(id) AS last FROM events WHERE mac = ?", (mac,))
        return row["last"] or 0

    def state_counts(self) -> dict[str, int]:
        """How many machines are in each state."""
        self._written()
        rows = self._rows("SELECT state, COUNT(*) AS n FROM machines GROUP BY state ORDER BY state")
        return {row["state"]: row["n"] for row in rows}

    def bytes_served(self) -> dict[str, int]:
        """Bytes of files served to machines, over all file-served events, by protocol (http, tftp)."""
        return {name: int(value) for name, (_, value) in self._totals(TOTALS["file-served"][0]).items()}

    def step_durations(self) -> dict[str, tuple[int, float]]:
        """Finished provisioning steps, by step: (how many, total seconds), over all step-done events."""
        return self._totals(TOTALS["step-done"][0])

    def claim_conflicts(self) -> int:
        """Times two addresses claimed one MAC at once (held or refused), over all claim-conflict events."""
        return sum(count for count, _ in self._totals(TOTALS["claim-conflict"][0]).values())

    def held_count(self) -> int:
        self._written()
        return self._row("SELECT COUNT(*) AS n FROM machines WHERE held IS NOT NULL")["n"]

    def _totals(self, prefix: str) -> dict[str, tuple[int, float]]:
        self._written()
        rows = self._rows("SELECT name, count, value FROM totals WHERE name LIKE ? ORDER BY name", (prefix + "%",))
        return {row["name"].removeprefix(prefix): (row["count"], float(row["value"])) for row in rows}

    def recent_events(self, mac: str, limit: int = 500) -> list[Event]:
        """The newest `limit` events of `mac`, oldest first: what a status page shows of a long history."""
        self._written()
        rows = self._rows("SELECT * FROM (SELECT * FROM events WHERE mac = ? ORDER BY id DESC LIMIT ?) AS recent "
                          "ORDER BY id", (mac, limit))
        return [records.event(r) for r in rows]

    # -- DHCP leases (full mode) -------------------------------------------------------------------
    # Each call is one transaction holding the leases table, so two servers (two replicas, or two
    # processes on one SQLite file) can never hand out one address twice.

    def lease_of(self, mac: str) -> Lease | None:
        row = self._row("SELECT * FROM leases WHERE mac = ?", (mac,))
        return records.lease(row) if row else None

    def lease_at(self, ip: str) -> Lease | None:
        row = self._row("SELECT * FROM leases WHERE ip = ?", (ip,))
        return records.lease(row) if row else None

    def leases(self) -> list[Lease]:
        return [records.lease(row) for row in self._rows("SELECT * FROM leases ORDER BY ip")]

    def offer_lease(self, mac: str, candidates: Iterable[str], expires: float) -> Lease | None:
        """Hold an address for `mac`: the one it holds already if that is a candidate, else the first
        candidate nobody holds (or whose lease has run out). None when every candidate is taken."""
        now = time.time()
        with self._transaction() as db:
            db.lock_table("leases")
            wanted = list(candidates)
            row = db.execute("SELECT * FROM leases WHERE mac = ?", (mac,)).fetchone()
            if row is not None and row["ip"] in wanted:
                # An offer never shortens a lease the client holds already.
                db.execute("UPDATE leases SET expires = CASE WHEN expires > ? THEN expires ELSE ? END "
                           "WHERE mac = ?", (expires, expires, mac))
                return records.lease(db.execute("SELECT * FROM leases WHERE mac = ?", (mac,)).fetchone())
            held = {r["ip"] for r in db.execute("SELECT ip FROM leases WHERE expires > ? AND "
                                                "(mac IS NULL OR mac <> ?)", (now, mac)).fetchall()}
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
            db.lock_table("leases")
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


def _copy_rows(source: Store, db: Backend, table: str, columns: tuple[str, ...]) -> int:
    """Streamed a thousand rows at a time: a store of years holds millions of events."""
    names, marks = ", ".join(columns), ", ".join("?" * len(columns))
    insert = f"INSERT INTO {table} ({names}) VALUES ({marks})"
    rows, copied = source._db.execute(f"SELECT {names} FROM {table}"), 0
    while batch := rows.fetchmany(1000):
        db.execute_many(insert, [tuple(row[c] for c in columns) for row in batch])
        copied += len(batch)
    return copied


def _copy_into(source: Store, target: Store) -> dict[str, int]:
    if target.node_count() or target.last_event_id():
        raise BootserverError(f"{target.location} holds machines already: copy only into an empty database")
    with target._transaction() as db:
        counts = {table: _copy_rows(source, db, table, columns) for table, columns in TABLES.items()}
        db.identity_follows("events", "id")  # new events continue after the copied ids
    return counts


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """`callback` on `loop` from another thread, unless the loop is gone (close() has seen to it, or nobody will)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def open_backend(location: Path | str) -> Backend:
    """The backend `location` names: a postgresql:// URL, else an SQLite file (a path or sqlite:///path)."""
    if isinstance(location, str) and location.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(location)
    if isinstance(location, str) and location.startswith("sqlite://"):
        location = location.removeprefix("sqlite://")
    return SqliteBackend(Path(location))


def _total_of(kind: str, detail: dict[str, Any]) -> tuple[str, float] | None:
    """The running total an event adds to (name, amount), if any: what /metrics reports."""
    if kind not in TOTALS:
        return None
    prefix, key, number = TOTALS[kind]
    return f"{prefix}{detail.get(key)}", float(detail.get(number) or 0)


def _seen(db: Backend, mac: str, now: float, facts: dict[str, str] | None, state: str | None = None,
          only_from: Iterable[str] | None = None) -> None:
    """A known machine was seen: last seen now, `facts` merged into what it reported, moved to `state` (if it is in
    one of `only_from`, when given). Nothing when there is no such machine."""
    row = db.execute("SELECT facts, state FROM machines WHERE mac = ?" + db.row_lock, (mac,)).fetchone()
    if row is None:
        return
    if only_from is not None and row["state"] not in only_from:
        state = None  # the lifecycle does not move it from where it is
    db.execute("UPDATE machines SET last_seen = ?, state = COALESCE(?, state), facts = ? WHERE mac = ?",
               (now, state, json.dumps({**json.loads(row["facts"]), **(facts or {})}), mac))


_ADD_TOTAL = ("INSERT INTO totals (name, count, value) VALUES (?, 1, ?) ON CONFLICT (name) DO UPDATE "
              "SET count = totals.count + 1, value = totals.value + excluded.value")
_INSERT_TOKEN = ("INSERT INTO tokens (id, hash, mac, issued, expires, ip, uuid, purpose, used) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _insert_token(db: Backend, token: Token) -> None:
    """A new token for its machine; the machine's older unused ones stop working (the live-token index)."""
    _retire_tokens(db, token)
    db.execute(_INSERT_TOKEN, _token_row(token))


def _folded(state: str, facts: dict[str, str], records: list[Behind]) -> tuple[str, dict[str, str]]:
    """A machine's state and facts once `records` (its, in order) are applied to them."""
    for record in records:
        if record.state is not None and (record.only_from is None or state in record.only_from):
            state = record.state
        facts.update(record.facts or {})
    return state, facts


def _retire_tokens(db: Backend, newest: Token) -> None:
    """The machine's unused tokens issued no later than `newest` stop working: the newest boot's is the one live."""
    db.execute("UPDATE tokens SET used = ? WHERE mac = ? AND used IS NULL AND issued <= ? AND id <> ?",
               (newest.issued, newest.mac, newest.issued, newest.id))


def _token_row(token: Token, used: float | None = None) -> tuple[Any, ...]:
    """The token's row; `used`: when it was spent or retired, if not already."""
    return (token.id, token.hash, token.mac, token.issued, token.expires, token.ip, token.uuid, token.purpose,
            token.used if used is None else used)


__all__ = ["MIGRATIONS", "TOTALS", "Committed", "Event", "JobClaim", "Lease", "Listed", "Member", "Node", "Store",
           "Token", "open_backend"]
