"""Store: schema version, events survive reopening, WAL mode."""

import sqlite3

import pytest

from bootserver.store import MIGRATIONS, Store
from bootserver.tokens import new_token


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
    _, boot = new_token(mac, 5)
    store.add_token(boot)
    _, report = new_token(mac, 5, purpose="report")
    store.installed(mac, "ssh-ed25519 AAAA", report, {"kernel": "6.1"})
    assert store.node(mac).os_host_key == "ssh-ed25519 AAAA"
    assert store.token(boot.id).used is not None  # the report token replaced every older one
    assert store.live_token(mac) is None  # a report token is no claim on a boot
    assert not store.phoned_home(report.id, mac, "10.0.0.5", "ssh-ed25519 BBBB", {})
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
