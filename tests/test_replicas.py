"""Two real `bootserver serve` replicas on loopback sharing one PostgreSQL database.

Each replica (tests/support/replicas.py) is its own process (so `kill -9` is real) with its own data_dir, HTTP
port and name, the same `database` and `secret_key_file`. Nodes are real SSH servers (tests/support/sshd.py) in
this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psycopg
from support.http import read_event
from support.replicas import Replica
from support.sshd import ssh_server
from support.wait import until_async

from bootserver.provision.pki import ServerKeys
from bootserver.store import Store


def mac(i: int) -> str:
    return f"52:54:00:cc:{i >> 8:02x}:{i & 0xFF:02x}"


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, database: str, count: int, check: str, urls: tuple[str, str] | None = None):
    """`count` nodes (SSH servers) and two replicas, a and b; `urls`: each replica's own URL of `database`."""
    keys = ServerKeys.load_or_create(tmp_path / "a" / "keys")  # replica a moves them into the database
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(ssh_server(keys.ssh_public)) for _ in range(count)]
        machines = "".join(f'[machines."{mac(i)}"]\nssh = "127.0.0.1:{node.port}"\n' for i, node in enumerate(nodes))
        site = ('[assets]\nkernel = "images/vmlinuz"\ninitrd = "images/initrd.img"\n'
                f'[profiles.p]\nkernel = "kernel"\ninitrd = ["initrd"]\n[profiles.p.deploy]\ncheck = "{check}"\n'
                f'[groups.all]\nprofile = "p"\n{machines}')
        url_a, url_b = urls or (database, database)
        a, b = Replica("a", tmp_path, url_a, site), Replica("b", tmp_path, url_b, site)
        for replica in (a, b):
            (replica.data / "images" / "vmlinuz").write_bytes(b"k" * 4096)
            (replica.data / "images" / "initrd.img").write_bytes(b"i" * 4096)
        try:
            await a.start()  # first: it stores the keys the nodes trust
            await b.start()
            yield a, b, nodes
        finally:
            await a.kill()
            await b.kill()


async def token_for(http: aiohttp.ClientSession, replica: Replica, i: int) -> str:
    async with http.get(f"{replica.url}/boot/{mac(i).replace(':', '-')}.ipxe") as response:
        assert response.status == 200
        return re.search(r"bootserver\.token=(\S+)", await response.text())[1]


async def phone_home(http: aiohttp.ClientSession, replica: Replica, i: int, token: str, host_key: str) -> int:
    body = {"token": token, "ip": "127.0.0.1", "host_key": host_key, "disks": []}
    async with http.post(f"{replica.url}/boot/{mac(i).replace(':', '-')}/phone-home", json=body) as response:
        return response.status


async def until_all(store: Store, macs: list[str], states: set[str], timeout: float) -> None:
    def states_now() -> Counter:
        return Counter(store.node(m).state for m in macs)

    await until_async(lambda: set(states_now()) <= states, timeout, interval=0.2,
                      what=lambda: f"all of {sorted(states)}; now {dict(states_now())}")


def provisioning_on_a(store: Store, count: int) -> list[str]:
    """The machines replica a is deploying right now."""
    return [m for m in map(mac, range(count)) if store.job(m).owner == "a" and store.node(m).state == "deploy"]


async def test_two_hundred_phone_homes_over_two_replicas_make_two_hundred_jobs(postgres, tmp_path: Path):
    database = postgres.new_database()
    count = 200
    async with cluster(tmp_path, database, count, check="true provisioned-once") as (a, b, nodes), \
            aiohttp.ClientSession() as http:
        replicas = [a, b]
        tokens = await asyncio.gather(*(token_for(http, replicas[i % 2], i) for i in range(count)))
        # Each phones home to the replica that did NOT serve its script: the token is good on both.
        statuses = await asyncio.gather(*(phone_home(http, replicas[(i + 1) % 2], i, tokens[i],
                                                     nodes[i].host_key_line) for i in range(count)))
        assert Counter(statuses) == {202: count}
        store = Store(database, replica="observer")
        macs = [mac(i) for i in range(count)]
        await until_all(store, macs, {"deployed", "failed"}, timeout=120)
        failed = [m for m in macs if store.node(m).state != "deployed"]
        assert not failed, [store.events(m)[-3:] for m in failed[:3]]
        provisioned_by = Counter()
        for i, m in enumerate(macs):
            kinds = [e.kind for e in store.events(m)]
            assert kinds.count("phoned-home") == 1 and kinds.count("deployed") == 1, kinds
            assert store.job(m).state == "done" and store.job(m).attempt == 1  # claimed once
            assert sum("provisioned-once" in c for c in nodes[i].commands) == 1  # its deploy ran exactly once
            provisioned_by[next(e.replica for e in store.events(m) if e.kind == "step-started")] += 1
        assert set(provisioned_by) == {"a", "b"}, provisioned_by  # both replicas did work
        store.close()


async def test_a_replica_killed_mid_provisioning_leaves_its_jobs_to_the_other(postgres, tmp_path: Path):
    database = postgres.new_database()
    count = 6
    async with cluster(tmp_path, database, count, check="sleep 3") as (a, b, nodes), aiohttp.ClientSession() as http:
        store = Store(database, replica="observer")
        for i in range(count):
            assert await phone_home(http, a, i, await token_for(http, a, i), nodes[i].host_key_line) == 202
        # a claims at once (b only polls): wait until a is in the middle of some deploys, then kill it
        await until_async(lambda: provisioning_on_a(store, count), 20, what="replica a to start provisioning")
        held_by_a = {m for m in map(mac, range(count)) if store.job(m).owner == "a" and store.job(m).state == "running"}
        assert held_by_a, "replica a held no running job when it was stopped: the takeover below would prove nothing"
        await a.kill()
        killed = time.monotonic()
        await until_all(store, [mac(i) for i in range(count)], {"deployed", "failed", "interrupted"}, timeout=60)
        for m in map(mac, range(count)):
            events = store.events(m)
            assert store.node(m).state == "deployed", [(e.kind, e.detail, e.replica) for e in events[-4:]]
            assert events[-1].replica == "b"
        for m in held_by_a:
            resumed = [e for e in store.events(m) if e.kind == "resumed"]
            assert len(resumed) == 1 and resumed[0].detail["from"] == "a" and resumed[0].replica == "b"
            assert store.job(m).attempt == 2
        print(f"{len(held_by_a)} jobs of the killed replica finished on the other within "
              f"{time.monotonic() - killed:.1f} s of the kill")
        store.close()


async def test_one_token_presented_to_both_replicas_at_once_is_accepted_once(postgres, tmp_path: Path):
    database = postgres.new_database()
    async with cluster(tmp_path, database, 1, check="true") as (a, b, nodes), aiohttp.ClientSession() as http:
        store = Store(database, replica="observer")
        for _ in range(5):
            token = await token_for(http, a, 0)
            before = len(store.events(mac(0)))
            statuses = await asyncio.gather(phone_home(http, a, 0, token, nodes[0].host_key_line),
                                            phone_home(http, b, 0, token, nodes[0].host_key_line))
            assert sorted(statuses) == [202, 403], statuses
            await until_all(store, [mac(0)], {"deployed"}, timeout=30)
            events = store.events(mac(0))[before:]
            assert [e.kind for e in events].count("phoned-home") == 1
            assert [e.kind for e in events].count("deployed") == 1
            store.set_reprovision(mac(0), True)  # the whole flow again, for the next round
        store.close()


async def test_a_replica_cut_off_from_the_database_stops_its_jobs_before_the_other_takes_them(postgres, tmp_path: Path):
    """A replica that can no longer renew its leases (here: its database role may not log in any more; on a site,
    a network partition) must stop its jobs before the leases lapse: the other takes them over then, and a
    node must never have two replicas provisioning it at once."""
    database = postgres.new_database()
    count = 4
    roles = {name: f"replica_{name}_{tmp_path.name[-12:].lower()}_{id(tmp_path):x}" for name in "ab"}
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as admin:
        for role in roles.values():
            admin.execute(f"CREATE ROLE {role} SUPERUSER LOGIN")
    urls = tuple(database.replace("//postgres@", f"//{roles[name]}@", 1) for name in "ab")
    async with cluster(tmp_path, database, count, check="sleep 5", urls=urls) as (a, b, nodes), \
            aiohttp.ClientSession() as http:
        store = Store(database, replica="observer")
        for i in range(count):
            assert await phone_home(http, a, i, await token_for(http, a, i), nodes[i].host_key_line) == 202
        await until_async(lambda: provisioning_on_a(store, count), 20, what="replica a to start provisioning")
        held_by_a = {m for m in map(mac, range(count)) if store.job(m).owner == "a" and store.job(m).state == "running"}
        assert held_by_a, "replica a held no running job when it was stopped: the takeover below would prove nothing"
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as admin:
            admin.execute(f"ALTER ROLE {roles['a']} NOLOGIN")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (roles["a"],))
        await until_all(store, [mac(i) for i in range(count)], {"deployed", "failed", "interrupted"}, timeout=60)
        assert a.process.returncode is None  # cut off, not dead
        for i, m in enumerate(map(mac, range(count))):
            assert store.node(m).state == "deployed", [(e.kind, e.detail, e.replica) for e in store.events(m)[-4:]]
            spans = sorted(nodes[i].connections)
            assert all(closed is not None for _, closed in spans), spans
            for (_, closed), (opened, _) in itertools.pairwise(spans):
                assert closed <= opened, f"{m}: two replicas connected at once: {spans}"
        for m in held_by_a:
            resumed = [e for e in store.events(m) if e.kind == "resumed"]
            assert len(resumed) == 1 and resumed[0].detail["from"] == "a" and resumed[0].replica == "b"
        assert "its lease cannot be renewed" in a.log.read_text()
        store.close()


async def test_a_page_on_one_replica_follows_what_the_other_records(postgres, tmp_path: Path):
    database = postgres.new_database()
    async with cluster(tmp_path, database, 1, check="true") as (a, b, nodes), aiohttp.ClientSession() as http:
        token = await token_for(http, a, 0)

        async def page_shows_a() -> bool:  # a writes a script's record behind: within 100 ms
            page = await (await http.get(f"{b.url}/machines/{mac(0)}")).text()
            return '<span class="replica muted" title="the bootserver that recorded it">a</span>' in page

        await until_async(page_shows_a, 5, what="b's page to show the script a served")
        async with http.get(f"{b.url}/machines/{mac(0)}/stream") as stream:
            assert await phone_home(http, a, 0, token, nodes[0].host_key_line) == 202
            seen = []
            while not seen or seen[-1][0] != "deployed":
                data = (await read_event(stream, timeout=15))["data"]
                seen.append((data["kind"], data["replica"]))
                assert json.dumps(data["html"])  # rendered by b, for b's page
        assert seen[0] == ("phoned-home", "a") and seen[-1][0] == "deployed", seen
