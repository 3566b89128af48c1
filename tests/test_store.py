"""Store: schema version, events survive reopening, WAL mode, records written behind."""

import asyncio
import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.require import require_root

from bootserver.errors import StoreUnavailable
from bootserver.store import MIGRATIONS, Store
from bootserver.tokens import Signer


def test_events_and_state_survive_reopen(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.record("52:54:00:00:00:01", "script-served", {"profile": "p"}, state="script-served",
                 facts={"platform": "efi"})
    store.record("52:54:00:00:00:01", "file-served", {"file": "vmlinuz"}, state="kernel-served",
                 facts={"arch": "x86_64"})
    store.record("52:54:00:00:00:02", "no-boot", {"reason": "r"})
    store.close()

    store = Store(path)
    node = store.node("52:54:00:00:00:01")
    assert node.state == "kernel-served"
    assert node.facts == {"platform": "efi", "arch": "x86_64"}  # facts merge across events
    assert store.node("52:54:00:00:00:02").state == "discovered"
    events = store.events("52:54:00:00:00:01")
    assert [e.kind for e in events] == ["script-served", "file-served"]
    assert events[1].detail == {"file": "vmlinuz"}
    assert [e.kind for e in store.events("52:54:00:00:00:01", after=events[0].id)] == ["file-served"]
    assert [n.mac for n in store.nodes()] == ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    assert store.schema_version == len(MIGRATIONS)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="upgrade bootserver"):
        Store(path)


def test_unknown_machine_has_no_node(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    assert store.node("52:54:00:00:00:09") is None
    assert store.events("52:54:00:00:00:09") == []


def test_tokens_of_an_older_store_have_no_address(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    for step in MIGRATIONS[:3]:  # the schema before tokens kept the address
        db.executescript(step.format(float="REAL", id="INTEGER PRIMARY KEY", blob="BLOB"))
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO machines (mac, state, first_seen, last_seen) VALUES ('52:54:00:00:00:01', 's', 0, 0)")
    db.execute("INSERT INTO tokens (id, hash, mac, issued, expires) VALUES ('t', 'h', '52:54:00:00:00:01', 0, 1)")
    db.commit()
    db.close()
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS) == 9
    assert store.token("t").ip is None
    assert store.token("t").purpose == "boot"  # tokens before installed OSes were all phone-home tokens
    store.close()


def test_a_report_token_reports_a_boot_once_and_never_phones_home(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    mac = "52:54:00:00:00:01"
    store.record(mac, "script-served", state="finishing")
    signer = Signer(b"test key")
    _, boot = signer.issue(mac, 5)
    store.add_token(boot)
    _, report = signer.issue(mac, 5, purpose="report")
    store.installed(mac, "ssh-ed25519 AAAA", report, {"kernel": "6.1"})
    assert store.node(mac).os_host_key == "ssh-ed25519 AAAA"
    assert store.token(boot.id).used is not None  # the report token replaced every older one
    assert store.live_token(mac) is None  # a report token is no claim on a boot
    assert not store.phoned_home(report, "10.0.0.5", "ssh-ed25519 BBBB", {})
    assert store.os_reported(report.id, mac, "10.0.0.5", {"kernel": "6.1"})
    node = store.node(mac)
    assert (node.state, node.ip, node.host_key) == ("booted", "10.0.0.5", None)
    assert store.job(mac).state == "queued"
    assert not store.os_reported(report.id, mac, "10.0.0.5", {})  # spent
    assert [e.kind for e in store.events(mac)] == ["script-served", "installed", "booted"]
    store.close()


def test_an_older_store_gets_its_metrics_totals_from_its_events(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    for step in MIGRATIONS[:6]:  # the schema before running totals
        db.executescript(step.format(float="REAL", id="INTEGER PRIMARY KEY", blob="BLOB"))
    db.execute("PRAGMA user_version=6")
    db.execute("INSERT INTO machines (mac, state, first_seen, last_seen) VALUES ('52:54:00:00:00:01', 's', 0, 0)")
    for kind, detail in (("file-served", '{"protocol": "http", "bytes": 100}'),
                         ("file-served", '{"protocol": "http", "bytes": 50}'),
                         ("file-served", '{"protocol": "tftp", "bytes": 7}'),
                         ("step-done", '{"step": "disk", "seconds": 1.5}'), ("dhcp", '{"bytes": 99}')):
        db.execute("INSERT INTO events (mac, time, kind, detail) VALUES ('52:54:00:00:00:01', 0, ?, ?)",
                   (kind, detail))
    db.commit()
    db.close()
    store = Store(path)
    assert store.bytes_served() == {"http": 150, "tftp": 7} and store.step_durations() == {"disk": (1, 1.5)}
    store.record("52:54:00:00:00:01", "file-served", {"protocol": "http", "bytes": 1})
    store.record("52:54:00:00:00:01", "step-done", {"step": "disk", "seconds": 0.5})
    assert store.bytes_served() == {"http": 151, "tftp": 7} and store.step_durations() == {"disk": (2, 2.0)}
    store.close()


def rows(path, sql: str) -> list[tuple]:
    """What another connection (another process, after a crash) reads from the file."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()



@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """The store's files made immutable while the block runs (root ignores file modes, not this): every write
    fails, SQLite sometimes only at COMMIT."""
    require_root("chattr +i")
    files = [str(path), f"{path}-wal"]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)

async def test_records_written_behind_are_in_the_file_within_the_interval_and_in_order(tmp_path):
    path, mac = tmp_path / "s.sqlite3", "52:54:00:00:00:01"
    store = Store(path)
    signer = Signer(b"k" * 32)
    _, first = signer.issue(mac, 5, "10.0.0.5")
    _, second = signer.issue(mac, 5, "10.0.0.5")
    store.record_behind(mac, "script-served", {"n": 1}, state="script-served", facts={"a": "1"}, token=first)
    store.record_behind(mac, "script-served", {"n": 2}, state="script-served", facts={"b": "2"}, token=second)
    assert rows(path, "SELECT COUNT(*) FROM events") == [(0,)]  # answered, not yet written
    assert store.written_node(mac) is None and store.queued_behind == 2
    # Readers of tokens see the queue: the newer boot's token is the live one, the older retired already.
    assert store.live_token(mac) == second and store.token(first.id).used == second.issued
    await asyncio.sleep(0.2)  # WRITE_BEHIND_SECONDS is 0.1
    assert rows(path, "SELECT kind, json_extract(detail, '$.n') FROM events ORDER BY id") == [
        ("script-served", 1), ("script-served", 2)]
    assert rows(path, "SELECT id, used IS NULL FROM tokens ORDER BY issued") == [(first.id, 0), (second.id, 1)]
    assert (store.node(mac).state, store.node(mac).facts) == ("script-served", {"a": "1", "b": "2"})
    # A write that commits at once first writes what waits: the log keeps the order things happened in.
    store.record_behind(mac, "script-served", {"n": 3})
    store.record(mac, "file-served", {"file": "vmlinuz"})
    assert rows(path, "SELECT kind FROM events ORDER BY id")[-2:] == [("script-served",), ("file-served",)]
    assert store.written_behind == 3 and store.behind_flushes == 2
    store.close()


async def test_a_machine_first_seen_behind_is_written_as_its_records_leave_it(tmp_path):
    """Its row in one statement (the path of a boot storm's new machines): first and last seen, the state its
    records allow in order, their facts merged; the same as a machine that existed gets."""
    store, new, old = Store(tmp_path / "s.sqlite3"), "52:54:00:00:00:01", "52:54:00:00:00:02"
    store.record(old, "seen")
    for mac in (new, old):
        store.record_behind(mac, "script-served", {"n": 1}, state="script-served", facts={"a": "1"})
        store.record_behind(mac, "x", {"n": 2}, state="booted", facts={"b": "2"}, only_from=["discovered"])
        store.record_behind(mac, "y", {"n": 3}, state="kernel-served", facts={"a": "3"}, only_from=["script-served"])
    store.flush_behind()
    for mac in (new, old):
        node = store.node(mac)
        assert (node.state, node.facts) == ("kernel-served", {"a": "3", "b": "2"}), mac
    node, events = store.node(new), store.events(new)
    assert [e.kind for e in events] == ["script-served", "x", "y"]
    assert (node.first_seen, node.last_seen) == (events[0].time, events[-1].time)
    store.close()


async def test_a_full_write_behind_queue_is_waited_out_with_the_event_loop_free(tmp_path, monkeypatch):
    """room_behind waits for the writer thread instead of writing the queue on the event loop: while it waits,
    the loop runs everything else (a synchronous write would have finished before anything else ran)."""
    monkeypatch.setattr("bootserver.store.WRITE_BEHIND_LIMIT", 3)
    store, mac = Store(tmp_path / "s.sqlite3"), "52:54:00:00:00:01"
    await store.room_behind()  # room: no wait, not counted
    for n in range(3):
        store.record_behind(mac, "script-served", {"n": n})
    waiter = asyncio.create_task(store.room_behind())
    await asyncio.sleep(0)
    assert not waiter.done() and store.queued_behind == 3  # waiting, and the loop is ours meanwhile
    await asyncio.wait_for(waiter, 5)
    assert store.queued_behind == 0 and store.behind_waits == 1
    assert [e.detail["n"] for e in store.events(mac)] == [0, 1, 2]
    store.close()


async def test_a_full_queue_on_a_failing_disk_is_not_waited_on_forever(tmp_path, monkeypatch):
    """The write room_behind waits for fails: it returns (the records stay queued, the store says why), and the
    script is then refused by record_behind; no retry loop of its own."""
    monkeypatch.setattr("bootserver.store.WRITE_BEHIND_LIMIT", 2)
    path, mac = tmp_path / "s.sqlite3", "52:54:00:00:00:01"
    store = Store(path)
    store.record(mac, "first")
    with immutable(path):
        store.record_behind(mac, "script-served", {"n": 1})
        store.record_behind(mac, "script-served", {"n": 2})
        await asyncio.wait_for(store.room_behind(), 5)
        assert store.problem and store.queued_behind == 2 and store.behind_flushes == 0
        with pytest.raises(StoreUnavailable):
            store.record_behind(mac, "script-served", {"n": 3})
    store.record(mac, "again")
    assert [e.kind for e in store.events(mac)] == ["first", "script-served", "script-served", "again"]
    store.close()


async def test_a_job_poll_that_finds_none_writes_nothing_queued_behind(tmp_path):
    """The provisioner polls for jobs every second. A poll that finds none only reads: as a transaction it would
    first write what waits behind the boot scripts and wait for the write lock, on the event loop (with worker
    processes that made stalls of up to 225 ms, the p99 of their scripts)."""
    store, mac = Store(tmp_path / "s.sqlite3"), "52:54:00:00:00:01"
    _, token = Signer(b"k" * 32).issue(mac, 5, "10.0.0.5")
    store.record_behind(mac, "script-served", {"n": 1})
    assert store.claim_job("a", 30) is None
    assert store.queued_behind == 1 and store.behind_flushes == 0
    assert store.phoned_home(token, "10.0.0.5", "ssh-ed25519 AAAA", {})  # a write: what waits is written first
    assert store.queued_behind == 0 and store.claim_job("a", 30).mac == mac
    store.close()


async def test_a_record_written_behind_never_moves_a_machine_back(tmp_path):
    """A script's record written after the machine phoned home (another replica's, late): an event, no state."""
    store, mac = Store(tmp_path / "s.sqlite3"), "52:54:00:00:00:01"
    signer = Signer(b"k" * 32)
    _, token = signer.issue(mac, 5, "10.0.0.5")
    assert store.phoned_home(token, "10.0.0.5", "ssh-ed25519 AAAA", {})  # no row of the token, nor of the machine
    assert store.node(mac).state == "phoned-home" and store.token(token.id).used is not None
    store.record_behind(mac, "script-served", {}, state="script-served", token=token, only_from=["discovered"])
    store.flush_behind()
    assert store.node(mac).state == "phoned-home" and store.token(token.id).used is not None  # spent stays spent
    assert [e.kind for e in store.events(mac)] == ["phoned-home", "script-served"]
    store.close()


async def test_records_written_behind_outlive_a_failed_write_and_a_failed_group_commit(tmp_path):
    """The disk refuses every write (the files made immutable; SQLite may find out only at COMMIT): what waits
    stays queued, in order, also when a group commit's request made the write; written once the disk is back."""
    path, mac = tmp_path / "s.sqlite3", "52:54:00:00:00:01"
    store = Store(path)
    store.record(mac, "first")
    with immutable(path):
        store.record_behind(mac, "script-served", {"n": 1})
        await asyncio.sleep(0.2)
        assert store.problem and store.queued_behind == 1
        with pytest.raises(StoreUnavailable):  # a failing store refuses the request instead of promising a write
            with store.group_commit() as committed:
                store.record_behind(mac, "script-served", {"n": 2})
            await committed
        assert store.queued_behind == 1
    store.record(mac, "again")
    assert [e.kind for e in store.events(mac)] == ["first", "script-served", "again"]
    store.close()
