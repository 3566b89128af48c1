"""Provisioning jobs: states across failures and restarts, the phone-home deadline, group context."""

import asyncio
import dataclasses
import inspect
import logging
import re
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from support.disk import loop_device
from support.machines import admit
from support.sshd import ssh_server
from support.wait import until_async

from bootserver.app import PROVISIONER, STORE, http_address, init_app, running
from bootserver.config import Config, DiskLayout, Listen, Partition
from bootserver.provision.jobs import TOKEN_KEEP_SECONDS
from bootserver.provision.steps import provision
from bootserver.store import Member, Token

MAC = "52:54:00:00:00:01"


def test_restart_marks_in_progress_nodes_interrupted(booter, store):
    store.record("52:54:00:00:00:01", "step-started", {"step": "disk"}, state="disk")
    store.record("52:54:00:00:00:02", "deployed", {}, state="deployed")
    booter.provisioner().recover()
    node = store.node("52:54:00:00:00:01")
    assert node.state == "interrupted" and node.reprovision  # its half-made disk may be wiped next time
    assert store.events(node.mac)[-1].detail == {"reason": "the server stopped during disk"}
    assert store.node("52:54:00:00:00:02").state == "deployed"


def queue_job(store, mac: str, owner: str | None = None, state: str | None = None, lease: float = 30) -> None:
    """`mac` phoned home (its job queued); claimed by `owner` for `lease` s and moved to `state`, if given."""
    now = time.time()
    store.record(mac, "script-served", {}, state="script-served", token=Token(f"t-{mac}", "hash", mac, now, now + 600))
    assert store.phoned_home(store.token(f"t-{mac}"), "10.0.0.9", "ssh-ed25519 AAAA", {})
    if owner is not None:
        assert store.claim_job(owner, lease).mac == mac
    if state is not None:
        store.record(mac, "step-started", {"step": state}, state=state)


def test_restart_settles_this_replicas_jobs_and_leaves_the_others(booter, store):
    me = store.replica
    queue_job(store, "52:54:00:00:00:01", owner=me, state="deploy")
    queue_job(store, "52:54:00:00:00:02", owner="other", state="deploy")
    queue_job(store, "52:54:00:00:00:03")  # accepted by this replica, not claimed yet
    booter.provisioner().recover()
    for mac in ("52:54:00:00:00:01", "52:54:00:00:00:03"):
        assert store.node(mac).state == "interrupted" and store.job(mac).state == "done"
    # Another replica's job is its own business: it renews the lease, or its lapse hands the job over.
    assert store.node("52:54:00:00:00:02").state == "deploy"
    assert (store.job("52:54:00:00:00:02").state, store.job("52:54:00:00:00:02").owner) == ("running", "other")


async def test_jobs_of_a_replica_whose_lease_lapsed_are_resumed_unless_they_were_over(booter, store):
    # Node 1 was mid-deploy; node 2 was deployed, but its replica died before closing the job.
    queue_job(store, MAC, owner="dead", state="deploy", lease=-1)
    queue_job(store, "52:54:00:00:00:02", owner="dead", lease=-1)
    store.record("52:54:00:00:00:02", "deployed", {}, state="deployed")
    before = len(store.events("52:54:00:00:00:02"))
    provisioner = booter.provisioner()
    provisioner.start()
    try:
        await until_async(lambda: all(store.job(m).state == "done" for m in (MAC, "52:54:00:00:00:02")))
    finally:
        await provisioner.stop()
    resumed = next(e for e in store.events(MAC) if e.kind == "resumed")
    assert resumed.detail == {"from": "dead", "state": "deploy", "attempt": 2}
    assert store.node(MAC).reprovision  # its disk may be half made, by us: the run may wipe it
    assert store.events(MAC)[-1].kind == "nothing-to-provision"  # run again (the example profile has no steps)
    assert store.node("52:54:00:00:00:02").state == "deployed"
    assert len(store.events("52:54:00:00:00:02")) == before  # closed, not provisioned again


def test_node_that_never_phones_home_fails_with_a_reason(booter, store, config):
    store.record("52:54:00:00:00:01", "file-served", {"file": "vmlinuz"}, state="kernel-served")
    provisioner = booter.provisioner()
    provisioner.sweep()
    assert store.node("52:54:00:00:00:01").state == "kernel-served"  # not yet due
    provisioner.sweep(now=time.time() + config.server.phone_home_minutes * 60 + 1)
    node = store.node("52:54:00:00:00:01")
    assert node.state == "failed"
    assert "did not phone home within 20 minutes" in store.events(node.mac)[-1].detail["reason"]


def test_the_sweep_prunes_tokens_a_week_after_they_expire(booter, store, caplog):
    caplog.set_level(logging.INFO, logger="bootserver.provision.jobs")
    store.record("52:54:00:00:00:01", "script-served", state="script-served")
    expired = time.time() - 60
    store.add_token(Token("spent", "hash", "52:54:00:00:00:01", expired - 1800, expired))
    provisioner = booter.provisioner()
    provisioner.sweep()
    assert store.token("spent") is not None, "kept a week: a replay is told it was used, not that it is unknown"
    provisioner.sweep(now=expired + TOKEN_KEEP_SECONDS + 1)
    assert store.token("spent") is None
    assert "pruned 1 phone-home tokens that expired over 7 days ago" in caplog.text


def test_the_sweep_prunes_events_older_than_event_days_when_set(booter, store, config, caplog):
    caplog.set_level(logging.INFO, logger="bootserver.provision.jobs")
    store.record("52:54:00:00:00:01", "dhcp", {"message": "DISCOVER"})
    later = time.time() + 2 * 86400
    booter.provisioner().sweep(now=later)
    assert len(store.events("52:54:00:00:00:01")) == 1, "kept: event_days is not set"
    booter.reload(dataclasses.replace(config, server=dataclasses.replace(config.server, event_days=1)))
    booter.provisioner().sweep(now=later)
    assert store.events("52:54:00:00:00:01") == [] and store.node("52:54:00:00:00:01") is not None
    assert "pruned 1 events older than 1 days" in caplog.text


def test_job_context_lists_the_whole_group(booter, store):
    store.record("52:54:00:00:00:01", "x", {})
    store._db.execute("UPDATE machines SET ip = '10.0.0.1', host_key = 'ssh-ed25519 AAAA' WHERE mac = ?",
                      ("52:54:00:00:00:01",))
    node = store.node("52:54:00:00:00:01")
    context = booter.job_context(node.mac, "raft", "raft", "node1")
    assert [(m["hostname"], m["ip"]) for m in context["group"]] == [("node1", "10.0.0.1"), ("node2", None)]
    assert context["node"]["hostname"] == "node1"


def test_job_context_groups_by_reported_facts_and_follows_a_config_change(booter, store, config):
    admit(store, "52:54:00:00:00:01")
    admit(store, "52:54:00:00:00:02", facts={"platform": "efi", "arch": "x86_64"})
    node = store.node("52:54:00:00:00:01")
    # node2 booted on EFI: it belongs to the more specific raft-efi group, not to node1's.
    assert [m["hostname"] for m in booter.job_context(node.mac, "raft", "raft", "node1")["group"]] == ["node1"]
    booter.reload(dataclasses.replace(config, groups=tuple(
        g for g in config.groups if g.name != "raft-efi")))  # as a reload would
    assert [m["hostname"] for m in booter.job_context(node.mac, "raft", "raft", "node1")["group"]] == ["node1", "node2"]


def test_members_are_every_admitted_machine_with_its_address_and_group_facts(store):
    admit(store, "52:54:00:00:00:01", "10.0.0.1", facts={"platform": "efi", "arch": "x86_64", "serial": "S1"})
    admit(store, "52:54:00:00:00:02", "10.0.0.2")
    store.record("52:54:00:00:00:03", "x", {}, facts={"arch": "x86_64"})  # asked for files only: no member (finding 10)
    assert sorted(store.members(), key=lambda m: m.mac) == [Member("52:54:00:00:00:01", "10.0.0.1", "x86_64", "efi"),
                                                            Member("52:54:00:00:00:02", "10.0.0.2", None, None)]


def test_profile_without_disk_or_deploy_needs_no_job(booter, store):
    store.record("52:54:00:00:00:01", "x", {})
    assert booter.provision_job(store.node("52:54:00:00:00:01"), 22) is None
    assert store.events("52:54:00:00:00:01")[-1].kind == "nothing-to-provision"


def test_deployed_machine_boots_its_disk_until_reprovisioned(booter, store):
    from bootserver.booter import Urls

    urls = Urls("http://h", "http://h")
    store.record("52:54:00:00:00:01", "deployed", {}, state="deployed")
    assert "sanboot" in booter.machine_script("52:54:00:00:00:01", {}, urls, "http").data.decode()
    booter.reprovision("52-54-00-00-00-01")
    node = store.node("52:54:00:00:00:01")
    assert node.reprovision and node.state == "reprovision"
    assert "kernel http://h/boot/" in booter.machine_script("52:54:00:00:00:01", {}, urls, "http").data.decode()


def test_default_keepalive_notices_a_dead_node_within_45_seconds():
    # asyncssh gives up after keepalive_count_max unanswered keep-alives, one per interval of silence.
    params = inspect.signature(provision).parameters
    interval, count = params["keepalive_interval"].default, params["keepalive_count_max"].default
    assert interval * (count + 1) <= 45


def with_disk(config: Config, device: Path, ssh_port: int) -> Config:
    """The example site, with node1's profile partitioning `device` and node1's SSH on the test server."""
    layout = DiskLayout(str(device), (Partition("root", "rest", mount="/"),))
    profiles = {**config.profiles, "raft": dataclasses.replace(config.profiles["raft"], disk=layout)}
    node1 = dataclasses.replace(config.machines[MAC], ssh=Listen("127.0.0.1", ssh_port))
    server = dataclasses.replace(config.server, public_address="127.0.0.1")
    return dataclasses.replace(config, server=server, profiles=profiles, machines={**config.machines, MAC: node1})


async def boot_and_phone_home(http: aiohttp.ClientSession, base: str, host_key: str) -> None:
    async with http.get(f"{base}/boot/52-54-00-00-00-01.ipxe") as response:
        token = re.search(r"bootserver\.token=(\S+)", await response.text())[1]
    body = {"token": token, "ip": "127.0.0.1", "host_key": host_key, "disks": []}
    async with http.post(f"{base}/boot/52-54-00-00-00-01/phone-home", json=body) as response:
        assert response.status == 202, await response.text()


async def test_node_that_dies_mid_disk_setup_is_interrupted_and_not_rerun_blindly(config, keys, tmp_path):
    # A read-only loop device over a sparse file: a real disk of 64 MiB that nothing can write to. The test
    # sshd freezes (keep-alives unanswered, like a dead machine) at the first command naming sfdisk, before
    # running it.
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    with loop_device(image, 0, 64 << 20) as device:
        async with ssh_server(keys.ssh_public, hang_on="sfdisk") as node:
            app = init_app(with_disk(config, Path(device), node.port),
                           ssh_options={"keepalive_interval": 0.5, "keepalive_count_max": 2})
            async with running(app):
                base = f"http://127.0.0.1:{http_address(app)[1]}"
                async with aiohttp.ClientSession() as http:
                    await _dies_then_waits_for_its_phone_home(app, http, base, node)


async def _dies_then_waits_for_its_phone_home(app: web.Application, http: aiohttp.ClientSession, base: str,
                                              node) -> None:
    store = app[STORE]
    await boot_and_phone_home(http, base, node.host_key_line)
    # Detected by keep-alive (~1.5 s here; the 600 s command timeout would be far later).
    await until_async(lambda: store.node(MAC).state == "interrupted", timeout=15)
    events = store.events(MAC)
    failed = next(e for e in events if e.kind == "step-failed")
    assert failed.detail["step"] == "disk" and "keepalive" in failed.detail["error"]
    assert events[-1].kind == "interrupted"
    assert events[-1].detail["reason"] == ("the node stopped answering during disk: connection lost: "
                                           "Server not responding to keepalive")
    assert store.node(MAC).reprovision  # its half-made disk may be wiped: next time, with wipe
    assert len(node.commands) == 1 and "sfdisk -d" in node.commands[0]  # the guard, the first disk command

    # No blind rerun: not by the sweep, not after a while, not when the machine merely fetches its script.
    app[PROVISIONER].sweep()
    await asyncio.sleep(3)  # six keep-alive intervals: room for a retry that must not come
    async with http.get(f"{base}/boot/52-54-00-00-00-01.ipxe") as response:
        assert response.status == 200
    await asyncio.sleep(1)
    assert len(node.commands) == 1
    assert store.node(MAC).state == "script-served"

    # It phones home again: provisioned again, now allowed to wipe (the guard no longer asks sfdisk).
    await boot_and_phone_home(http, base, node.host_key_line)
    await until_async(lambda: len(node.commands) >= 2, timeout=10)
    assert "sfdisk -d" not in node.commands[1]
    await until_async(lambda: store.node(MAC).state == "interrupted", timeout=15)


def test_a_reserved_address_on_our_full_dhcp_subnet_becomes_the_installed_static_address(booter, store, config):
    from ipaddress import IPv4Address as Ip

    from bootserver.config import Deployment, DhcpConfig
    from bootserver.provision.install import StaticAddress

    admit(store, MAC, "10.100.0.11")
    raft = dataclasses.replace(config.profiles["raft"], deploy=Deployment(check="true"))
    machines = {**config.machines, MAC: dataclasses.replace(config.machines[MAC], ip=Ip("10.100.0.11"))}
    full = DhcpConfig(mode="full", server_address=Ip("10.100.0.1"), pool=(Ip("10.100.0.100"), Ip("10.100.0.199")),
                      netmask=Ip("255.255.255.0"), router=Ip("10.100.0.1"), dns=(Ip("10.100.0.1"), Ip("192.0.2.53")))
    booter.reload(dataclasses.replace(config, profiles={**config.profiles, "raft": raft}, machines=machines, dhcp=full))
    assert booter.provision_job(store.node(MAC), 22).address == StaticAddress(
        "10.100.0.11/24", "10.100.0.1", ("10.100.0.1", "192.0.2.53"))
    # Without our full DHCP we know no subnet for it: DHCP it is.
    booter.reload(dataclasses.replace(config, profiles={**config.profiles, "raft": raft}, machines=machines))
    assert booter.provision_job(store.node(MAC), 22).address is None
