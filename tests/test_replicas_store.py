"""What replicas share through PostgreSQL, without running servers: keys, and moving from SQLite."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bootserver.errors import BootserverError
from bootserver.provision.pki import ServerKeys
from bootserver.store import MIGRATIONS, Store, Token


def test_replicas_starting_together_share_one_set_of_keys(postgres, tmp_path: Path):
    url = postgres.new_database()
    key_file = tmp_path / "secret.key"
    ServerKeys.load_or_create_shared(Store(url), key_file, tmp_path / "a" / "keys")  # makes the key file

    def start(name: str) -> ServerKeys:
        return ServerKeys.load_or_create_shared(Store(url, replica=name), key_file, tmp_path / name / "keys")

    with ThreadPoolExecutor(3) as pool:
        keys = list(pool.map(start, ["b", "c", "d"]))
    first = ServerKeys.load_or_create_shared(Store(url), key_file, tmp_path / "e" / "keys")
    assert {k.ssh_public for k in keys} == {first.ssh_public} and {k.ca_pem for k in keys} == {first.ca_pem}
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "b" / "keys").exists()  # nothing private on the replicas' disks but the key file
    stored = Store(url).secret("server-keys")
    assert b"PRIVATE" not in stored and first.ssh_public.split()[1].encode() not in stored  # encrypted


def test_a_wrong_secret_key_is_refused_with_the_file_named(postgres, tmp_path: Path):
    url = postgres.new_database()
    ServerKeys.load_or_create_shared(Store(url), tmp_path / "one.key", tmp_path / "keys")
    with pytest.raises(BootserverError, match=r"another key than .*two\.key: copy secret_key_file"):
        ServerKeys.load_or_create_shared(Store(url), tmp_path / "two.key", tmp_path / "keys")


def test_a_server_moving_from_sqlite_keeps_its_keys(postgres, tmp_path: Path):
    old = ServerKeys.load_or_create(tmp_path / "keys")
    store = Store(postgres.new_database())
    shared = ServerKeys.load_or_create_shared(store, tmp_path / "secret.key", tmp_path / "keys")
    assert shared.ssh_public == old.ssh_public and shared.ca_pem == old.ca_pem


def bootserver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootserver", *args], capture_output=True, text=True, timeout=60)


def test_db_copy_moves_an_sqlite_store_into_postgresql(postgres, tmp_path: Path):
    sqlite = tmp_path / "bootserver.sqlite3"
    old = Store(sqlite, replica="old")
    old.record("52:54:00:00:00:01", "script-served", {"profile": "p"}, state="script-served", facts={"a": "1"})
    now = time.time()
    old.add_token(Token("t1", "hash", "52:54:00:00:00:01", now, now + 600, ip="10.0.0.5"))
    assert old.phoned_home(old.token("t1"), "10.0.0.5", "ssh-ed25519 AAAA", {"ip": "10.0.0.5"})
    old.bind_lease("52:54:00:00:00:01", "10.0.0.5", now + 600)
    events = old.events("52:54:00:00:00:01")
    old.close()
    url = postgres.new_database()
    result = bootserver("db", "copy", "--from", str(sqlite), "--to", url)
    assert result.returncode == 0, result.stderr
    assert "copied 1 machines, 2 events, 1 tokens, 1 leases, 1 jobs, 0 secrets" in result.stdout
    new = Store(url, replica="new")
    assert new.events("52:54:00:00:00:01") == events
    assert new.node("52:54:00:00:00:01").host_key == "ssh-ed25519 AAAA" and new.token("t1").used
    assert new.record("52:54:00:00:00:01", "next").id > events[-1].id  # ids continue after the copied ones
    again = bootserver("db", "copy", "--from", str(sqlite), "--to", url)
    assert again.returncode == 2 and "copy only into an empty database" in again.stderr


def test_db_migrate_reports_the_schema_version(postgres, tmp_path: Path):
    url = postgres.new_database()
    result = bootserver("db", "migrate", "--database", url)
    assert result.returncode == 0 and f"schema version 0 -> {len(MIGRATIONS)}" in result.stdout, result.stderr
    assert f"schema version {len(MIGRATIONS)}, current" in bootserver("db", "migrate", "--database", url).stdout
