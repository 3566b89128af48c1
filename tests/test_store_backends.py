"""The store's contract on both backends (the `store` fixture runs each test on SQLite and on PostgreSQL),
then what only PostgreSQL replicas need: several servers racing on one database."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bootserver.errors import BootserverError, StoreUnavailable
from bootserver.store import MIGRATIONS, Store, Token

MAC = "52:54:00:00:00:01"


def phoned_home(store: Store, mac: str, token_id: str = "t") -> bool:
    store.record(mac, "script-served", state="script-served")
    now = time.time()
    store.add_token(Token(f"{token_id}-{mac}", "hash", mac, now, now + 60))
    return store.phoned_home(store.token(f"{token_id}-{mac}"), "10.0.0.5", "ssh-ed25519 AAAA", {"ip": "10.0.0.5"})


def test_events_keep_order_detail_and_replica(store):
    first = store.record(MAC, "script-served", {"profile": "p", "n": 1}, state="script-served", facts={"a": "1"})
    second = store.record(MAC, "file-served", {"protocol": "http", "bytes": 10}, facts={"b": "2"})
    assert second.id > first.id and first.replica == "test-replica"
    node = store.node(MAC)
    assert node.state == "script-served" and node.facts == {"a": "1", "b": "2"}
    assert [(e.kind, e.detail, e.replica) for e in store.events(MAC)] == [
        ("script-served", {"profile": "p", "n": 1}, "test-replica"),
        ("file-served", {"protocol": "http", "bytes": 10}, "test-replica")]
    assert [e.id for e in store.events_after(first.id)] == [second.id]
    assert store.last_event_id() == store.last_event_id(MAC) == second.id
    assert [e.id for e in store.recent_events(MAC, 1)] == [second.id]
    assert store.bytes_served() == {"http": 10}
    assert store.schema_version == len(MIGRATIONS)


def test_aggregates_over_json_details(store):
    store.record(MAC, "step-done", {"step": "disk", "seconds": 1.5})
    store.record(MAC, "step-done", {"step": "disk", "seconds": 2.0})
    store.record(MAC, "file-served", {"protocol": "tftp", "bytes": 3})
    assert store.step_durations() == {"disk": (2, 3.5)}
    assert store.bytes_served() == {"tftp": 3}


def test_machines_page_by_mac_and_state(store):
    for i in range(5):
        store.record(f"52:54:00:00:00:0{i}", "x", state="failed" if i % 2 else "deployed")
    assert [n.mac[-1] for n in store.nodes()] == list("01234")
    assert [n.mac[-1] for n in store.nodes(after="52:54:00:00:00:01", limit=2)] == ["2", "3"]
    assert [n.mac[-1] for n in store.nodes(states=["failed"])] == ["1", "3"]
    assert [n.mac[-1] for n in store.nodes_in_state("deployed", "failed")] == list("01234")
    assert store.node_count() == 5 and store.state_counts() == {"deployed": 3, "failed": 2}


def test_a_token_is_spent_once_and_queues_one_job(store):
    assert phoned_home(store, MAC)
    assert not store.phoned_home(store.token(f"t-{MAC}"), "10.0.0.5", "ssh-ed25519 AAAA", {})  # replayed
    node = store.node(MAC)
    assert (node.state, node.ip, node.host_key) == ("phoned-home", "10.0.0.5", "ssh-ed25519 AAAA")
    job = store.job(MAC)
    assert (job.state, job.owner, job.attempt) == ("queued", "test-replica", 0)  # the replica that accepted it


def test_expired_tokens_are_pruned_in_bounded_batches(store):
    store.record(MAC, "script-served", state="script-served")
    for i in range(5):  # expired 50, 40, 30, 20 and 10 s ago
        store.add_token(Token(f"old{i}", "hash", MAC, 0, time.time() - 50 + 10 * i))
    store.add_token(Token("live", "hash", MAC, 0, time.time() + 60))
    assert store.prune_tokens(time.time() - 25, limit=2) == 2, "the two oldest first"
    assert [store.token(f"old{i}") is None for i in range(5)] == [True, True, False, False, False]
    assert store.prune_tokens(time.time() - 25) == 1 and store.prune_tokens(time.time() - 25) == 0
    assert store.prune_tokens(time.time()) == 2
    assert store.token("live") is not None and store.token("old4") is None


def test_old_events_are_pruned_oldest_first_and_metrics_keep_their_totals(store):
    events = [store.record(MAC, "file-served", {"protocol": "http", "bytes": 10}) for _ in range(5)]
    assert store.prune_events(events[3].time, limit=2) == 2, "two at most, the oldest"
    assert store.prune_events(events[3].time) == 1 and store.prune_events(events[3].time) == 0
    assert [e.id for e in store.events(MAC)] == [events[3].id, events[4].id]
    assert store.bytes_served() == {"http": 50}, "a scrape still counts every byte ever served"
    assert store.node(MAC) is not None


def test_jobs_are_claimed_renewed_finished_and_taken_over_when_a_lease_lapses(store):
    assert phoned_home(store, MAC)
    claim = store.claim_job("a", lease_seconds=30)
    assert (claim.mac, claim.owner, claim.attempt, claim.taken_over_from) == (MAC, "a", 1, None)
    assert store.claim_job("b", lease_seconds=30) is None  # held, and its lease is live
    assert store.renew_jobs("a", [MAC], 0.05) == {MAC}
    assert store.unfinished_jobs("a")[0].mac == MAC
    time.sleep(0.1)  # a's lease lapses: as if a died
    assert store.claim_job("a", lease_seconds=30) is None  # a restarted replica settles its own jobs instead
    taken = store.claim_job("b", lease_seconds=30)
    assert (taken.owner, taken.attempt, taken.taken_over_from) == ("b", 2, "a")
    assert store.renew_jobs("a", [MAC], 30) == set()  # a learns it lost the job
    assert not store.finish_job(MAC, "a")
    assert store.finish_job(MAC, "b")
    assert store.job(MAC).state == "done" and store.claim_job("b", 30) is None
    assert phoned_home(store, MAC, token_id="again")  # the next boot queues the same machine's job again
    assert store.claim_job("b", 30).attempt == 3


def test_the_first_secret_stored_wins(store):
    assert store.secret("ca") is None
    assert store.put_secret_once("ca", b"\x00first") == b"\x00first"
    assert store.put_secret_once("ca", b"second") == b"\x00first"
    assert store.secret("ca") == b"\x00first"


def test_leases_are_offered_bound_released_and_declined(store):
    pool = ["10.0.0.10", "10.0.0.11"]
    assert store.offer_lease("52:54:00:00:00:0a", pool, time.time() + 60).ip == "10.0.0.10"
    assert store.offer_lease("52:54:00:00:00:0b", pool, time.time() + 60).ip == "10.0.0.11"
    assert store.offer_lease("52:54:00:00:00:0c", pool, time.time() + 60) is None
    long = time.time() + 3600
    assert store.bind_lease("52:54:00:00:00:0a", "10.0.0.10", long)
    assert store.offer_lease("52:54:00:00:00:0a", pool, time.time() + 5).expires == long  # never shortened
    assert not store.bind_lease("52:54:00:00:00:0c", "10.0.0.10", long)
    assert store.decline_lease("52:54:00:00:00:0b", "10.0.0.11", time.time() + 60)
    assert store.release_lease("52:54:00:00:00:0a")
    assert [(lease.ip, lease.mac, lease.state) for lease in store.leases()] == [("10.0.0.11", None, "declined")]


# -- PostgreSQL replicas: several servers on one database ---------------------------------------------


@pytest.fixture
def database(postgres) -> str:
    return postgres.new_database()


def test_replicas_migrating_at_once_migrate_once(database):
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda i: Store(database, replica=f"r{i}"), range(4)))
    assert {s.schema_version for s in stores} == {len(MIGRATIONS)}
    assert stores[0].migrate() == (len(MIGRATIONS), len(MIGRATIONS))
    for s in stores:
        s.close()


def test_two_hundred_jobs_claimed_by_four_replicas_none_twice(database):
    setup = Store(database, replica="setup")
    macs = [f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(200)]
    for mac in macs:
        assert phoned_home(setup, mac)
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def replica(name: str) -> None:
        store = Store(database, replica=name)
        while (claim := store.claim_job(name, 60)) is not None:
            with lock:
                claimed.append((claim.mac, name))
        store.close()

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(mac for mac, _ in claimed) == sorted(macs)  # every job once, none twice
    assert len({name for _, name in claimed}) > 1  # and the work was really shared
    setup.close()


def test_one_token_presented_to_two_replicas_at_once_wins_once(database):
    a, b = Store(database, replica="a"), Store(database, replica="b")
    wins = 0
    for i in range(50):
        mac = f"52:54:00:00:01:{i:02x}"
        a.record(mac, "script-served")
        now = time.time()
        a.add_token(Token(f"tok{i}", "hash", mac, now, now + 60))
        barrier = threading.Barrier(2)

        def spend(store: Store, mac: str = mac, i: int = i, barrier: threading.Barrier = barrier) -> bool:
            token = store.token(f"tok{i}")
            barrier.wait()
            return store.phoned_home(token, "10.0.0.5", "ssh-ed25519 AAAA", {})

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(spend, [a, b]))
        assert sorted(results) == [False, True]
        wins += sum(results)
        assert [e.kind for e in a.events(mac)].count("phoned-home") == 1
    assert wins == 50
    a.close()
    b.close()


def test_two_replicas_never_lease_one_address_twice(database):
    stores = [Store(database, replica=f"r{i}") for i in range(8)]  # one Store per thread, as one per server
    pool = [f"10.0.0.{i}" for i in range(10, 30)]

    def take(i: int) -> list[str]:
        leases = [stores[i].offer_lease(f"52:54:00:00:02:{i * 5 + n:02x}", pool, time.time() + 60) for n in range(5)]
        return [lease.ip for lease in leases if lease]

    with ThreadPoolExecutor(8) as executor:
        got = [ip for ips in executor.map(take, range(8)) for ip in ips]
    assert len(got) == len(set(got)) == 20  # the pool, each address once; the other 20 were refused
    for s in stores:
        s.close()


def test_event_ids_become_visible_in_order(database):
    """A reader polling `id > last seen` (the live pages) must never skip an event another replica
    commits late: ids are taken in commit order."""
    writers = [Store(database, replica=f"w{i}") for i in range(4)]
    reader = Store(database, replica="reader")
    stop = threading.Event()
    seen: list[int] = []
    failures: list[Exception] = []

    def write(store: Store) -> None:
        try:
            while not stop.is_set():
                store.record("52:54:00:00:03:01", "tick")  # the first ones create the machine, at once
                store.record(f"52:54:00:00:04:{store.replica[1:]:0>2}", "tock")  # a machine of its own
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        seen += [e.id for e in reader.events_after(seen[-1] if seen else 0)]
    stop.set()
    for t in threads:
        t.join()
    seen += [e.id for e in reader.events_after(seen[-1] if seen else 0)]
    assert not failures
    assert seen == [e.id for e in reader.events_after(0, limit=10**6)]  # nothing skipped, nothing twice
    assert len(seen) > 100
    for s in [*writers, reader]:
        s.close()


def test_a_script_served_while_its_machine_phones_home_is_no_deadlock(database):
    """Both lock the machine first (then its tokens, then the event order): one waits for the other."""
    a, b = Store(database, replica="a"), Store(database, replica="b")
    for i in range(50):
        mac, now = f"52:54:00:00:05:{i:02x}", time.time()
        a.record(mac, "script-served", token=Token(f"t{i}", "hash", mac, now, now + 60))
        barrier = threading.Barrier(2)

        def home(i: int = i, barrier: threading.Barrier = barrier) -> bool:
            token = a.token(f"t{i}")
            barrier.wait()
            return a.phoned_home(token, "10.0.0.5", "ssh-ed25519 AAAA", {})

        def script(mac: str = mac, i: int = i, now: float = now, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            b.record(mac, "script-served", token=Token(f"u{i}", "hash", mac, now, now + 60))

        with ThreadPoolExecutor(2) as pool:
            spent, _ = (future.result() for future in [pool.submit(home), pool.submit(script)])
        # No deadlock (StoreUnavailable "deadlock detected" before both took the machine first), and one outcome
        # in either order: the phone-home spent its token, then the script's new token revoked nothing spent; or
        # the new script's token came first and the phone-home, on a revoked token, lost.
        assert a.token(f"t{i}").used is not None  # spent by the phone-home, or revoked by the newer token
        assert a.token(f"u{i}").used is None  # the newer boot's token is live either way
        assert ("phoned-home" in [e.kind for e in a.events(mac)]) == spent
    a.close()
    b.close()


def test_a_sqlite_store_is_copied_whole_with_its_event_ids(tmp_path, database):
    old = Store(tmp_path / "old.sqlite3", replica="old")
    for i in range(2500):  # more than one batch
        old.record(f"52:54:00:00:06:{i % 7:02x}", "file-served", {"bytes": i})
    old.put_secret_once("server-keys", b"\x00sealed")
    new = Store(database, replica="new")
    assert old.copy_into(new) == {"machines": 7, "events": 2500, "tokens": 0, "leases": 0, "jobs": 0, "secrets": 1,
                                  "totals": 1}
    assert new.bytes_served() == old.bytes_served() == {"None": sum(range(2500))}
    assert new.events_after(0, limit=10**6) == old.events_after(0, limit=10**6)
    assert new.secret("server-keys") == b"\x00sealed" and new.path is None
    with pytest.raises(BootserverError, match="copy only into an empty database"):
        old.copy_into(new)
    old.close()
    new.close()


def test_a_database_restarted_between_requests_costs_no_request(postgres, database):
    store = Store(database, replica="r")
    store.record(MAC, "before")
    postgres.stop()
    postgres.start()
    assert [e.kind for e in store.events(MAC)] == ["before"]  # a read on a dead connection: run on a new one
    postgres.stop()
    postgres.start()
    store.record(MAC, "after")  # and BEGIN, before anything of the write was sent
    assert [e.kind for e in store.events(MAC)] == ["before", "after"] and store.problem is None
    store.close()


def test_sessions_get_a_lock_timeout_and_an_idle_in_transaction_timeout(database):
    store = Store(database, replica="r")
    settings = [store._db.execute(f"SHOW {name}").fetchone()
                for name in ("lock_timeout", "idle_in_transaction_session_timeout")]
    assert [next(iter(row.values())) for row in settings] == ["10s", "30s"]
    # What /metrics reports, read off the connection: the tests' private server runs with fsync off, and says so.
    assert store.durability() == {"fsync": "off", "synchronous_commit": "on"}
    store.close()


def test_a_lock_held_by_a_stalled_replica_fails_a_request_in_time_and_keeps_nothing(database):
    stalled = Store(database, replica="stalled")
    waiting = Store(database + "?options=-c%20lock_timeout%3D300", replica="waiting")  # 10 s by default
    stalled._db.begin()
    stalled._db.lock_for_event()  # as mid-record(): then the process stops (SIGSTOP, a frozen VM)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"held a lock it needs.*nothing of this request was recorded"):
        waiting.record(MAC, "during")
    assert time.monotonic() - started < 5, "failed at the lock timeout, not after a TCP timeout"
    stalled._db.rollback()
    waiting.record(MAC, "after")
    assert [e.kind for e in waiting.events(MAC)] == ["after"] and waiting.problem is None
    stalled.close()
    waiting.close()


def test_the_database_ends_a_stalled_replicas_transaction_and_frees_its_locks(database):
    stalled = Store(database + "?options=-c%20idle_in_transaction_session_timeout%3D300", replica="stalled")
    other = Store(database, replica="other")
    stalled._db.begin()
    stalled._db.lock_for_event()
    started = time.monotonic()
    other.record(MAC, "meanwhile")  # waits until the database ends the stalled session, well inside lock_timeout
    assert time.monotonic() - started < 5
    with pytest.raises(StoreUnavailable, match="the database ended its session"):  # it wakes up: told why
        stalled.record(MAC, "late")
    stalled.record(MAC, "again")  # and the next request connects again
    assert [e.kind for e in other.events(MAC)] == ["meanwhile", "again"]
    stalled.close()
    other.close()


def test_a_lost_database_is_a_clear_error_and_comes_back(postgres, database):
    store = Store(database, replica="r")
    store.record(MAC, "before")
    postgres.stop()
    try:
        with pytest.raises(StoreUnavailable, match=r"check that PostgreSQL is running.*nothing of this request"):
            store.record(MAC, "during")
        assert "cannot be used" in store.problem
    finally:
        postgres.start()
    store.record(MAC, "after")
    assert [e.kind for e in store.events(MAC)] == ["before", "after"] and store.problem is None
    store.close()


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://bootserver:hunter2@127.0.0.1:1/db", "bootserver:***@127.0.0.1:1/db"),
    ("postgresql://bootserver@127.0.0.1:1/db?password=hunter2", "/db?password=***"),
    ("postgresql://bootserver:hunter2@[::1/db", "not a URL libpq understands"),  # libpq quotes what it can't parse
])
def test_the_password_never_shows_in_errors(url: str, shown: str):
    with pytest.raises(StoreUnavailable) as raised:
        Store(url)
    assert "hunter2" not in str(raised.value) and shown in str(raised.value)


def test_a_user_that_may_not_make_tables_is_told_how_to_fix_it(postgres, database):
    """PostgreSQL 15 and later let only the database's owner create tables in its public schema."""
    import psycopg

    name = database.rsplit("/", 1)[1]
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f"CREATE ROLE {name}_user LOGIN")
    with pytest.raises(StoreUnavailable, match=rf"ALTER DATABASE {name} OWNER TO {name}_user"):
        Store(database.replace("postgres@", f"{name}_user@"))
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f"ALTER DATABASE {name} OWNER TO {name}_user")
    Store(database.replace("postgres@", f"{name}_user@")).close()  # as the message said
