"""Crash trials: `kill -9` the real server at random points while machines boot and get provisioned.

After every kill: the SQLite file passes `PRAGMA integrity_check`, every request the server answered
with success has its event in the store (it commits before it answers), and on restart the server
serves again within 5 s with every half-provisioned machine marked interrupted, never left running.

CI runs BOOTSERVER_CRASH_TRIALS (default 10) trials; `BOOTSERVER_CRASH_TRIALS=100 pytest tests/test_crash.py`
is the full suite (see README, Hardening).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
from sshd import ssh_server

from bootserver.provision.pki import ServerKeys

TRIALS = int(os.environ.get("BOOTSERVER_CRASH_TRIALS", "10"))
MACS = [f"52:54:00:00:20:{i:02x}" for i in range(1, 7)]
IN_PROGRESS = ("phoned-home", "disk", "deploy", "finishing")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_site(tmp_path: Path, ssh_port: int) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(os.urandom(256 * 1024))
    (data / "images" / "initrd.img").write_bytes(os.urandom(64 * 1024))
    machines = "".join(f'[machines."{mac}"]\nssh = "127.0.0.1:{ssh_port}"\n' for mac in MACS)
    config = tmp_path / "site.toml"
    config.write_text(
        f'[server]\nhttp = "127.0.0.1:{free_port()}"\ntftp = "off"\ndata_dir = "{data}"\n'
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
            sys.executable, "-m", "bootserver", "--config", str(self.config), "--log-level", "warning", "serve",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < 5:
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return time.monotonic() - started
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        stderr = await self._stderr()
        raise AssertionError(f"bootserver did not serve within 5 s of starting:\n{stderr}")

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


async def drive(url: str, host_key: str, acked: Counter) -> None:
    """Boot machines over and over as firmware and agents would; count what the server acknowledged."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            mac = random.choice(MACS)
            path = mac.replace(":", "-")
            try:
                async with session.get(f"{url}/boot/{path}.ipxe") as response:
                    script = await response.text()
                    if response.status != 200:
                        continue
                if "bootserver.token=" not in script:  # being provisioned (or deployed): no token for a new boot
                    acked[(mac, "no-boot" if "falling through" in script else "script-served")] += 1
                    continue
                acked[(mac, "script-served")] += 1
                async with session.get(f"{url}/boot/{path}/kernel") as response:
                    await response.read()
                token = re.search(r"bootserver\.token=(\S+)", script)[1]
                body = {"token": token, "ip": "127.0.0.1", "host_key": host_key, "disks": []}
                async with session.post(f"{url}/boot/{path}/phone-home", json=body) as response:
                    if response.status == 202:
                        acked[(mac, "phoned-home")] += 1
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the server is dead or dying: keep trying until the test stops us


def check_database(data: Path, acked: Counter) -> None:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = Counter({(mac, kind): n for mac, kind, n in db.execute(
            "SELECT mac, kind, COUNT(*) FROM events GROUP BY mac, kind")})
        for key, count in acked.items():
            assert stored[key] >= count, f"{key}: {count} acknowledged but {stored[key]} stored"
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
        acked: Counter = Counter()
        startups: list[float] = []
        interrupted_seen = 0
        try:
            for _ in range(TRIALS):
                startups.append(await server.start())
                # Recovery ran before the server answered: nothing may still claim to be mid-provisioning.
                assert in_progress(data) == [], "a machine left mid-provisioning after restart"
                driver = asyncio.create_task(drive(server.url, node.host_key_line, acked))
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                server.kill()
                await server.reap()
                driver.cancel()
                await asyncio.gather(driver, return_exceptions=True)
                check_database(data, acked)
                interrupted_seen = max(interrupted_seen, len(in_progress(data)))
            startups.append(await server.start())
            assert in_progress(data) == []
        finally:
            await server.reap()
    print(f"{TRIALS} kill -9 trials: {sum(acked.values())} acknowledged requests, all stored; "
          f"restart to serving {min(startups):.2f}-{max(startups):.2f} s; "
          f"up to {interrupted_seen} machines caught mid-provisioning by a kill")
    assert sum(acked.values()) > TRIALS  # the trials really did work between the kills
