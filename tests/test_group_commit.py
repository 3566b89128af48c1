"""Group commit: the boot-script and phone-home requests of one event-loop turn share one COMMIT, and none
is answered before it. Checked from a second SQLite connection, as another process would see the file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bootserver.errors import StoreUnavailable
from bootserver.store import Committed, Store

MACS = [f"52:54:00:00:01:{i:02x}" for i in range(8)]


@pytest.fixture
def sqlite_store(tmp_path: Path):
    store = Store(tmp_path / "store.sqlite3", replica="test")
    yield store
    store.close()


def kept_events(path: Path) -> list[tuple[str, str]]:
    """What is on disk now, read by another connection: only committed rows."""
    with sqlite3.connect(path) as other:
        return other.execute("SELECT mac, kind FROM events ORDER BY id").fetchall()


async def test_writes_of_one_turn_share_one_commit_and_wait_for_it(sqlite_store: Store):
    batches = []

    async def request(mac: str) -> None:
        with sqlite_store.group_commit() as committed:
            sqlite_store.record(mac, "script-served", {})
        batches.extend(committed.batches)
        assert (mac, "script-served") not in kept_events(sqlite_store.path)  # not answered yet
        await asyncio.wait_for(_wait(committed), 5)
        assert (mac, "script-served") in kept_events(sqlite_store.path)

    await asyncio.gather(*(request(mac) for mac in MACS))
    assert len(batches) == len(MACS) and len({id(b) for b in batches}) == 1  # one batch, one COMMIT
    assert sorted(kept_events(sqlite_store.path)) == sorted((mac, "script-served") for mac in MACS)


async def test_a_write_outside_commits_the_open_batch_first(sqlite_store: Store):
    with sqlite_store.group_commit() as committed:
        sqlite_store.record(MACS[0], "script-served", {})
    sqlite_store.record(MACS[1], "file-served", {})  # durable on return, and so is everything before it
    assert kept_events(sqlite_store.path) == [(MACS[0], "script-served"), (MACS[1], "file-served")]
    await committed  # already done


async def test_a_failed_write_is_undone_alone(sqlite_store: Store):
    with sqlite_store.group_commit() as committed:
        sqlite_store.record(MACS[0], "script-served", {})
        with pytest.raises(RuntimeError), sqlite_store._transaction() as db:
            db.execute("INSERT INTO machines (mac, state, first_seen, last_seen) VALUES (?, 'x', 0, 0)", (MACS[1],))
            raise RuntimeError("a bug half-way through a write")
        sqlite_store.record(MACS[2], "script-served", {})
    await asyncio.wait_for(_wait(committed), 5)
    assert kept_events(sqlite_store.path) == [(MACS[0], "script-served"), (MACS[2], "script-served")]
    assert sqlite_store.node(MACS[1]) is None


async def test_a_batch_that_cannot_commit_fails_every_request_in_it_and_keeps_nothing(
        sqlite_store: Store, monkeypatch: pytest.MonkeyPatch):
    backend = sqlite_store._db
    real_commit = backend.commit

    def full_disk() -> None:  # fault injection: the COMMIT is where a full disk shows
        raise StoreUnavailable("the store cannot be used (database or disk is full)")

    monkeypatch.setattr(backend, "commit", full_disk)
    waits = []
    for mac in MACS[:3]:
        with sqlite_store.group_commit() as committed:
            sqlite_store.record(mac, "script-served", {})
        waits.append(committed)
    results = await asyncio.wait_for(asyncio.gather(*(_wait(w) for w in waits), return_exceptions=True), 5)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert sqlite_store.problem is not None
    monkeypatch.setattr(backend, "commit", real_commit)
    assert kept_events(sqlite_store.path) == [] and sqlite_store.node(MACS[0]) is None
    sqlite_store.record(MACS[0], "script-served", {})  # and the store records again
    assert kept_events(sqlite_store.path) == [(MACS[0], "script-served")] and sqlite_store.problem is None


async def _wait(committed: Committed) -> None:
    await committed


async def test_a_batch_the_database_rolled_back_fails_its_requests_and_keeps_no_later_write_apart(
        sqlite_store: Store):
    with sqlite_store.group_commit() as first:
        sqlite_store.record(MACS[0], "script-served", {})
    with pytest.raises(StoreUnavailable, match="full"), sqlite_store.group_commit(), \
            sqlite_store._transaction() as db:
        db.execute("INSERT INTO events (mac, time, kind, detail, replica) VALUES (?, 0, 'x', '{}', 't')", (MACS[0],))
        # Fault injection: what SQLite itself does after some SQLITE_FULL and SQLITE_IOERR errors.
        sqlite_store._db._db.execute("ROLLBACK")
        raise StoreUnavailable("the store cannot be used (database or disk is full)")
    assert "full" in (sqlite_store.problem or "")
    with sqlite_store.group_commit() as later:  # a new batch, committed with its own COMMIT, not alone at RELEASE
        sqlite_store.record(MACS[1], "script-served", {})
    assert kept_events(sqlite_store.path) == []
    with pytest.raises(StoreUnavailable, match="full"):
        await asyncio.wait_for(_wait(first), 5)
    await asyncio.wait_for(_wait(later), 5)
    assert kept_events(sqlite_store.path) == [(MACS[1], "script-served")]


async def test_a_cancelled_request_does_not_cancel_the_others_commit(sqlite_store: Store):
    async def request(mac: str) -> str:
        with sqlite_store.group_commit() as committed:
            sqlite_store.record(mac, "script-served", {})
        await committed
        return "answered"

    first, second = (asyncio.create_task(request(mac)) for mac in MACS[:2])
    await asyncio.sleep(0)  # both wait on the batch now
    first.cancel()
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
    assert isinstance(results[0], asyncio.CancelledError) and results[1] == "answered"
    assert sorted(kept_events(sqlite_store.path)) == [(MACS[0], "script-served"), (MACS[1], "script-served")]
    sqlite_store.record(MACS[2], "file-served", {})  # and the store goes on


async def test_postgresql_commits_each_write_at_once(store: Store):
    with store.group_commit() as committed:
        store.record(MACS[0], "script-served", {})
    if store.kind == "postgresql":
        assert committed.batches == []  # nothing to wait for: the write is committed already
    await asyncio.wait_for(_wait(committed), 5)
    assert [e.kind for e in store.events(MACS[0])] == ["script-served"]


def test_without_an_event_loop_nothing_is_left_open(sqlite_store: Store):
    with pytest.raises(RuntimeError), sqlite_store.group_commit():
        sqlite_store.record(MACS[0], "script-served", {})
    sqlite_store.record(MACS[1], "file-served", {})  # no transaction was left open by the failed one
    assert kept_events(sqlite_store.path) == [(MACS[1], "file-served")]
