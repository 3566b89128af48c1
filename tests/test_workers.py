"""[server] workers: a real `bootserver serve` whose worker processes share its HTTP port (SO_REUSEPORT).

Which processes listen is read from /proc (the kernel's table of listening sockets and each process's open
files), not from the server's own word; requests go over fresh connections, so the kernel spreads them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
import asyncssh
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.config import hostname_site, server_section
from support.net import listeners
from support.serve import serving
from support.wait import until, until_async

from bootserver import config as configuration
from bootserver.errors import ConfigError
from bootserver.power import PowerControl, PowerState
from bootserver.siblings import Siblings
from bootserver.store import Store
from bootserver.tokens import Signer
from bootserver.workers import RESTART_MAX_SECONDS, RESTART_SECONDS, YOUNG_SECONDS, restart_delay

MACS = [f"52:54:00:00:01:{n:02x}" for n in range(40)]


def site(data: Path, hostname: str = "before", workers: int = 3) -> str:
    return hostname_site(data, MACS[0], hostname, workers=workers)


@pytest.fixture
def served(tmp_path: Path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(b"K" * 1000)
    config = tmp_path / "site.toml"
    config.write_text(site(data))
    log = tmp_path / "server.log"
    with serving(config, log) as process:
        yield process, config, data, log




def http_port(log: Path) -> int:
    line = next(line for line in log.read_text().splitlines() if "serving HTTP on" in line)
    return int(line.split("serving HTTP on ('127.0.0.1', ", 1)[1].split(")", 1)[0])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def scripts(port: int, macs: list[str]) -> list[str]:
    """One script per MAC, each on a connection of its own (so the kernel picks a process for each)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        texts = []
        for mac in macs:
            async with http.get(f"http://127.0.0.1:{port}/boot/{mac.replace(':', '-')}.ipxe") as response:
                assert response.status == 200, await response.text()
                texts.append(await response.text())
        return texts


async def metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_workers_default_to_the_cores_this_process_may_use():
    assert configuration.parse({}).server.workers == len(os.sched_getaffinity(0))
    assert configuration.parse({"server": {"workers": 1}}).server.workers == 1
    with pytest.raises(ConfigError, match="workers"):
        configuration.parse({"server": {"workers": 0}})


async def test_every_process_listens_answers_and_is_counted_in_metrics(served):
    process, _, data, log = served
    port = http_port(log)
    pids = listeners(port)
    assert process.pid in pids and len(pids) == 3, f"listening on {port}: {pids}"
    await scripts(port, MACS)

    # Every process served some of them (40 connections over 3 sockets), and wrote each one's records.
    def figures() -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted((data / "run").glob("process-*.json"))]

    def all_written() -> bool:
        found = figures()
        return len(found) == 3 and sum(f["store"]["written_behind"] for f in found) >= len(MACS)
    await until_async(all_written, timeout=10, what=lambda: f"every process's figures: {figures()}")
    assert {f["pid"] for f in figures()} == pids
    assert all(f["store"]["written_behind"] > 0 for f in figures()), figures()
    with sqlite3.connect(data / "bootserver.sqlite3") as db:
        served_events = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'script-served'").fetchone()[0]
    assert served_events == len(MACS)

    # Whichever process answers /metrics counts what all of them wrote.
    total = sum(f["store"]["written_behind"] for f in figures())
    for _ in range(6):
        assert (await metrics(port))["bootserver_store_written_behind_total"] == total


async def test_sighup_reaches_every_worker(served):
    process, config, data, log = served
    port = http_port(log)
    assert all("hostname=before" in text for text in await scripts(port, MACS[:1] * 12))
    config.write_text(site(data, hostname="after"))
    process.send_signal(signal.SIGHUP)
    until(lambda: log.read_text().count(f"reloaded {config}") == 3, timeout=10,
          what=lambda: f"three processes to reload:\n{log.read_text()[-3000:]}")
    texts = await scripts(port, MACS[:1] * 30)
    assert all("hostname=after" in text for text in texts), [t for t in texts if "after" not in t][:1]


async def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(served):
    process, _, _, log = served
    port = http_port(log)
    workers = listeners(port) - {process.pid}
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    until(lambda: len(listeners(port) - {process.pid} - {victim}) == 2, timeout=15,
          what=lambda: f"a new worker:\n{log.read_text()[-3000:]}")
    assert "exited (killed by SIGKILL): starting it again" in log.read_text()
    await scripts(port, MACS[:20])

    everyone = listeners(port)
    process.terminate()
    assert process.wait(15) == 0
    until(lambda: not any(alive(pid) for pid in everyone), timeout=5, what="every worker to exit")
    assert "exited" not in log.read_text().split("exited (killed by SIGKILL)", 1)[1]  # stopped, not restarted


async def test_workers_exit_with_their_owner(served):
    process, _, _, log = served
    workers = listeners(http_port(log)) - {process.pid}
    assert len(workers) == 2
    process.kill()
    process.wait(5)
    until(lambda: not any(alive(pid) for pid in workers), timeout=10, what="the workers to follow their owner")


def test_a_worker_dying_young_again_and_again_waits_longer_each_time():
    assert restart_delay(None, 0.5) == RESTART_SECONDS
    assert [restart_delay(d, 0.5) for d in (1, 2, 32, 60)] == [2, 4, RESTART_MAX_SECONDS, RESTART_MAX_SECONDS]
    assert restart_delay(RESTART_MAX_SECONDS, YOUNG_SECONDS) == RESTART_SECONDS  # it had lived: back to the start


def test_one_worker_is_one_process(tmp_path: Path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(b"K")
    config = tmp_path / "site.toml"
    config.write_text(site(data, workers=1))
    log = tmp_path / "server.log"
    with serving(config, log) as process:
        assert listeners(http_port(log)) == {process.pid}
        assert not (data / "run").exists() or not list((data / "run").glob("process-*.json"))



async def test_a_reprovision_a_worker_takes_reaches_the_owners_provisioner(tmp_path: Path):
    """Operators' reprovisions of running machines, each over a fresh connection (most land on a worker, which has
    no provisioner): every one is tried over SSH by the owner's, which records the outcome. Nothing answers SSH as
    the machine here (127.0.0.1 with a host key of nobody's), so each ends in reboot-failed, or reboot-sent if some
    sshd on port 22 took the command: either way, only the owner could have recorded it."""
    data = tmp_path / "data"
    macs = MACS[:12]
    store = Store(data / "bootserver.sqlite3")
    host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    for mac in macs:
        store.record(mac, "script-served", {}, state="finishing")
        _, token = Signer(b"not the server's key: the token is only stored").issue(mac, 5, purpose="report")
        store.installed(mac, host_key, token, {})
        assert store.os_reported(token.id, mac, "127.0.0.1", {})
        store.record(mac, "running", {}, state="running")
    store.close()
    config = tmp_path / "site.toml"
    config.write_text(server_section(data, workers=3))
    log = tmp_path / "server.log"
    with serving(config, log):
        port = http_port(log)
        headers = {"Authorization": f"Bearer {(data / 'api_token').read_text().strip()}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for mac in macs:
                async with http.post(f"http://127.0.0.1:{port}/api/v1/machines/{mac}/reprovision",
                                     headers=headers) as response:
                    assert response.status == 200, await response.text()

        def tried() -> set[str]:
            with sqlite3.connect(data / "bootserver.sqlite3") as db:
                return {mac for (mac,) in db.execute(
                    "SELECT mac FROM events WHERE kind IN ('reboot-failed', 'reboot-sent')")}
        until(lambda: tried() == set(macs), timeout=60, what=lambda: f"a reboot tried for each: {sorted(tried())}")


def test_power_states_another_process_published_count_where_newer(tmp_path: Path):
    """The owner's poll sees power states; a worker's page and /metrics read them from the file it publishes."""
    run = tmp_path / "run"
    owner = Siblings.owner(run)
    owner.publish({"power": {"52:54:00:00:01:01": {"state": "on", "checked": 200.0, "error": None},
                             "52:54:00:00:01:02": {"state": "off", "checked": 50.0, "error": None},
                             "52:54:00:00:01:03": {"state": "no such shape"}}})
    worker = PowerControl(Store(tmp_path / "s.sqlite3"), lambda mac: None, tmp_path / "key", timeout=1,
                          concurrency=1, siblings=Siblings(run, 1))
    worker._states["52:54:00:00:01:02"] = PowerState("on", 100.0)  # this worker's own call, newer than the poll's
    assert worker.known_state("52:54:00:00:01:01") == PowerState("on", 200.0)
    assert worker.known_state("52:54:00:00:01:02") == PowerState("on", 100.0)
    assert worker.known_state("52:54:00:00:01:03") is None and worker.known_state("52:54:00:00:01:04") is None
    assert worker.state_counts() == {"on": 2}
