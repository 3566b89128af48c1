"""Crash trials: `kill -9` the real server at random points while machines boot and get provisioned.

After every kill: the SQLite file passes `PRAGMA integrity_check`, every request the server answered
with success has its own event in the store (it commits before it answers; see Acked), and on restart the
server serves again within 5 s with every machine the kill caught mid-provisioning marked interrupted. Before
every kill the server's /metrics must show its live connection in WAL mode with synchronous=FULL (which no
kill -9 can check), and over the trials some group commit must have held several requests.

CI runs BOOTSERVER_CRASH_TRIALS (default 10) trials; `BOOTSERVER_CRASH_TRIALS=100 pytest tests/test_crash.py`
is the full suite (see README, Hardening).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from support.config import server_section
from support.net import free_port
from support.serve import answers_async, serve_command
from support.sshd import ssh_server
from support.wait import NotInTime, until_async

from bootserver.provision.pki import ServerKeys

TRIALS = int(os.environ.get("BOOTSERVER_CRASH_TRIALS", "10"))
MACS = [f"52:54:00:00:20:{i:02x}" for i in range(1, 7)]
IN_PROGRESS = ("phoned-home", "disk", "deploy", "finishing")


def write_site(tmp_path: Path, ssh_port: int) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(os.urandom(256 * 1024))
    (data / "images" / "initrd.img").write_bytes(os.urandom(64 * 1024))
    machines = "".join(f'[machines."{mac}"]\nssh = "127.0.0.1:{ssh_port}"\n' for mac in MACS)
    config = tmp_path / "site.toml"
    config.write_text(
        server_section(data, http=f"127.0.0.1:{free_port()}") +
        '[assets]\nkernel = "images/vmlinuz"\ninitrd = "images/initrd.img"\n'
        # A deploy step that takes a while, so that kills land in the middle of provisioning too.
        '[profiles.p]\nkernel = "kernel"\ninitrd = ["initrd"]\n[profiles.p.deploy]\ncheck = "sleep 0.3"\n'
        f'[groups.all]\nprofile = "p"\n{machines}')
    return config, data


class Server:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.url = "http://" + re.search(r'http = "([^"]+)"', config.read_text())[1]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> float:
        """Start `bootserver serve`; seconds until /healthz answers."""
        started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            *serve_command(self.config, "--log-level", "warning"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        async with aiohttp.ClientSession() as session:
            try:
                await until_async(lambda: answers_async(session, f"{self.url}/healthz"), 5, interval=0.05)
            except NotInTime:
                raise AssertionError(f"bootserver did not serve within 5 s of starting:\n{await self._stderr()}") \
                    from None
        return time.monotonic() - started

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def reap(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.kill()
        if self.process is not None:
            await self.process.wait()

    async def _stderr(self) -> str:
        if self.process is None or self.process.stderr is None:
            return ""
        if self.process.returncode is None:
            self.kill()
        return (await self.process.stderr.read()).decode(errors="replace")


@dataclass
class Acked:
    """What the server acknowledged, each request by what proves it was kept: each script's token id, each spent
    token's id, and for every other request (a script without a token, a reprovision) its machine, the event kind
    it records and the window of wall-clock time from sending it to having its answer. The server stamps an event
    with time.time() between reading the request and answering it, and one machine's driver sends one request
    at a time, so each acknowledged request is matched by its own event: a lost acknowledged event cannot hide
    behind an unacknowledged one that happened to commit, as it could when events were only counted."""

    scripts: set[str] = field(default_factory=set)  # token ids of scripts answered 200
    phone_homes: set[str] = field(default_factory=set)  # token ids of phone-homes answered 202
    others: list[tuple[str, str, float, float]] = field(default_factory=list)  # (mac, kind, sent, answered)

    def __len__(self) -> int:
        return len(self.scripts) + len(self.phone_homes) + len(self.others)


async def drive(url: str, host_key: str, mac: str, acked: Acked, api_token: Path) -> None:
    """Boot one machine over and over as its firmware and agent would; note what the server acknowledged.
    One driver per machine, all at once: a group-commit batch then holds several requests when the kill lands."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            path = mac.replace(":", "-")
            try:
                sent = time.time()
                async with session.get(f"{url}/boot/{path}.ipxe") as response:
                    script = await response.text()
                    if response.status != 200:
                        continue
                answered = time.time()
                if "bootserver.token=" not in script:  # being provisioned (or deployed): no token for a new boot
                    acked.others.append((mac, "no-boot" if "falling through" in script else "script-served",
                                         sent, answered))
                    if "falling through" not in script:  # deployed: the operator asks for it again
                        headers = {"Authorization": f"Bearer {api_token.read_text().strip()}"}
                        sent = time.time()
                        async with session.post(f"{url}/api/v1/machines/{path}/reprovision", headers=headers) as r:
                            if r.status == 200:
                                acked.others.append((mac, "reprovision-requested", sent, time.time()))
                    await asyncio.sleep(0.05)
                    continue
                token = re.search(r"bootserver\.token=(\S+)", script)[1]
                acked.scripts.add(token.split(".")[0])
                async with session.get(f"{url}/boot/{path}/kernel") as response:
                    await response.read()
                body = {"token": token, "ip": "127.0.0.1", "host_key": host_key, "disks": []}
                async with session.post(f"{url}/boot/{path}/phone-home", json=body) as response:
                    if response.status == 202:
                        acked.phone_homes.add(token.split(".")[0])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the server is dead or dying: keep trying until the test stops us


def check_database(data: Path, acked: Acked) -> None:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        issued = {row[0] for row in db.execute("SELECT json_extract(detail, '$.token_issued') FROM events "
                                               "WHERE kind = 'script-served'")}
        lost = acked.scripts - issued
        assert not lost, f"scripts acknowledged with tokens {sorted(lost)} have no script-served event"
        assert not acked.scripts - {row[0] for row in db.execute("SELECT id FROM tokens")}, "an acked token is gone"
        spent = {row[0] for row in db.execute("SELECT id FROM tokens WHERE used IS NOT NULL")}
        lost = acked.phone_homes - spent
        assert not lost, f"phone-homes acknowledged with tokens {sorted(lost)} were not kept"
        phoned = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'phoned-home'").fetchone()[0]
        assert phoned >= len(acked.phone_homes)
        for mac, kind, sent, answered in acked.others:
            matches = db.execute("SELECT COUNT(*) FROM events WHERE mac = ? AND kind = ? AND time BETWEEN ? AND ?",
                                 (mac, kind, sent, answered)).fetchone()[0]
            assert matches == 1, f"{mac} {kind} acknowledged (sent {sent:.6f}, answered {answered:.6f}): " \
                                 f"{matches} events of it stored"
    finally:
        db.close()


async def store_figures(url: str) -> tuple[int, int, int]:
    """The running server's /metrics about its store: asserts that its live connection commits with
    synchronous=FULL in WAL mode, and returns (group commits, requests they held, the most one held) so far.

    The kill -9 trials cannot tell FULL from OFF: after a process crash the operating system still writes out what
    SQLite handed it, so both keep every acknowledged event; only a power cut (not simulated here) would lose them
    under OFF. So the setting is read off the server's own connection instead of being trusted."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(await response.text()) for s in family.samples}
    assert samples[("bootserver_store_info", (("backend", "sqlite"), ("journal_mode", "wal"),
                                              ("synchronous", "full")))] == 1, samples
    return (int(samples[("bootserver_store_group_commits_total", ())]),
            int(samples[("bootserver_store_group_committed_requests_total", ())]),
            int(samples[("bootserver_store_largest_group_commit", ())]))


def states(data: Path, macs: list[str]) -> dict[str, str]:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        marks = ",".join("?" * len(macs))
        return dict(db.execute(f"SELECT mac, state FROM machines WHERE mac IN ({marks})", macs).fetchall())
    finally:
        db.close()


def in_progress(data: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        marks = ",".join("?" * len(IN_PROGRESS))
        return db.execute(f"SELECT mac, state FROM machines WHERE state IN ({marks})", IN_PROGRESS).fetchall()
    finally:
        db.close()


async def test_kill_9_loses_nothing(tmp_path: Path):
    rng = random.Random(os.environ.get("BOOTSERVER_CRASH_SEED", "7"))
    keys = ServerKeys.load_or_create(tmp_path / "data" / "keys")  # the server will find and use these
    async with ssh_server(keys.ssh_public) as node:
        config, data = write_site(tmp_path, node.port)
        server = Server(config)
        acked = Acked()
        startups: list[float] = []
        interrupted_seen = 0
        caught: list[tuple[str, str]] = []
        batches: list[tuple[int, int, int]] = []
        try:
            for _ in range(TRIALS):
                startups.append(await server.start())
                # Recovery ran before the server answered: what a kill caught mid-provisioning is interrupted.
                assert in_progress(data) == [], "a machine left mid-provisioning after restart"
                after = states(data, [mac for mac, _ in caught])
                assert all(after[mac] == "interrupted" for mac, _ in caught), (caught, after)
                drivers = [asyncio.create_task(drive(server.url, node.host_key_line, mac, acked, data / "api_token"))
                           for mac in MACS]
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                batches.append(await store_figures(server.url))
                server.kill()
                await server.reap()
                for driver in drivers:
                    driver.cancel()
                await asyncio.gather(*drivers, return_exceptions=True)
                check_database(data, acked)
                caught = in_progress(data)
                interrupted_seen = max(interrupted_seen, len(caught))
            startups.append(await server.start())
            assert in_progress(data) == []
            after = states(data, [mac for mac, _ in caught])
            assert all(after[mac] == "interrupted" for mac, _ in caught), (caught, after)
        finally:
            await server.reap()
    print(f"{TRIALS} kill -9 trials: {len(acked)} acknowledged requests ({len(acked.scripts)} scripts and "
          f"{len(acked.phone_homes)} phone-homes checked by token), all stored; "
          f"restart to serving {min(startups):.2f}-{max(startups):.2f} s; "
          f"up to {interrupted_seen} machines caught mid-provisioning by a kill; group commits just before the "
          f"kills: {sum(b for b, _, _ in batches)} holding {sum(r for _, r, _ in batches)} requests, "
          f"up to {max(n for _, _, n in batches)} in one")
    assert len(acked.scripts) > TRIALS and acked.phone_homes  # the trials really did work between the kills
    assert interrupted_seen, "no kill caught a machine mid-provisioning: the interrupted check proved nothing"
    # The concurrent drivers did what they are for: batches of several requests, so kills met multi-request COMMITs.
    assert sum(r for _, r, _ in batches) > sum(b for b, _, _ in batches) and max(n for _, _, n in batches) > 1, batches
