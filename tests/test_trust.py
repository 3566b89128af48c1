"""Trust on the boot network, tried as an attacker on it would: a served bootserver on loopback, clients
that speak from other loopback addresses (127.0.0.2 is the real machine, 127.0.0.3 the forger), and real
SSH servers standing in for their agents. Each test names the finding of the security review it holds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from pathlib import Path

import aiohttp
import asyncssh
import pytest
from aiohttp import web
from support.config import server_section
from support.net import free_port
from support.sshd import ssh_server
from support.wait import until_async

from bootserver import config as configuration
from bootserver.admission import RateLimit, canonical_uuid, same_uuid, strict_ip
from bootserver.app import CORE, PROVISIONER, STORE, http_address, init_app, running
from bootserver.booter import Urls
from bootserver.errors import BadRequest, Forbidden

REAL, FORGER = "127.0.0.2", "127.0.0.3"
MAC = "52:54:00:00:40:01"
PATH = MAC.replace(":", "-")
SECRET = "DATABASE_PASSWORD=hunter2-of-the-real-machine\n"


def site(tmp_path: Path, server: str = "", machines: str = "", deploy: str | None = None) -> configuration.Config:
    """A site whose profile deploys a secret file: what a forger would be after (or `deploy`, the section's body)."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(b"k" * 4096)
    (data / "images" / "initrd.img").write_bytes(b"i" * 1024)
    (data / "files").mkdir()
    (data / "files" / "app.env").write_text(SECRET)
    node_root = tmp_path / "node"  # where the fake nodes' files land (they run on this host)
    text = (server_section(data) + f'{server}\n'
            '[assets]\nkernel = "images/vmlinuz"\ninitrd = "images/initrd.img"\n'
            '[profiles.app]\nkernel = "kernel"\ninitrd = ["initrd"]\n'
            '[profiles.app.deploy]\n'
            + (deploy if deploy is not None else '[[profiles.app.deploy.files]]\nsource = "files/app.env"\n'
               f'dest = "{node_root}/app.env"\nmode = "0600"\n') +
            '[groups.all]\nprofile = "app"\n'
            f'[machines."{MAC}"]\nhostname = "real"\n{machines}')
    path = tmp_path / "site.toml"
    path.write_text(text)
    return configuration.load(path)


@contextlib.asynccontextmanager
async def served(config: configuration.Config, ssh_port: int = 22, **ssh_options: float):
    app = init_app(config, ssh_options={"ssh_port": ssh_port, "connect_timeout": 5, **ssh_options})
    async with running(app):
        yield app, f"http://127.0.0.1:{http_address(app)[1]}"


def session_from(source: str) -> aiohttp.ClientSession:
    """An HTTP client whose connections come from `source`, as a machine at that address would."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=30))  # a hang fails, saying where


async def script(base: str, source: str, path: str = PATH, **query: str) -> tuple[int, str]:
    async with session_from(source) as s, s.get(f"{base}/boot/{path}.ipxe", params=query) as r:
        return r.status, await r.text()


def token_in(text: str) -> str | None:
    found = re.search(r"bootserver\.token=(\S+)", text)
    return found[1] if found else None


async def phone_home(base: str, source: str, token: str | None, host_key: str, path: str = PATH,
                     **extra: object) -> tuple[int, str]:
    body = {"token": token, "ip": source, "host_key": host_key, "kernel": "6.1", "disks": [], **extra}
    async with session_from(source) as s, s.post(f"{base}/boot/{path}/phone-home", json=body) as r:
        return r.status, await r.text()


def kinds(app: web.Application, mac: str = MAC) -> list[str]:
    return [e.kind for e in app[STORE].events(mac)]


def a_host_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


# -- finding 1: a forged phone-home gets a machine's secrets ------------------------------------------------


async def test_approve_mode_forger_outside_the_window_gets_no_token_and_no_secret(tmp_path):
    """Finding 1, approve mode: before an operator opens the window, nobody gets a token (so no overlay, no
    phone-home, no secret); the real MAC is recorded as `new` and told to wait."""
    config = site(tmp_path, 'enroll = "approve"')
    async with served(config) as (app, base):
        status, text = await script(base, FORGER)
        assert status == 200 and token_in(text) is None and "waiting for approval" in text
        assert "sleep 60" in text and "/boot.ipxe" in text  # it asks again later
        assert app[STORE].node(MAC).state == "new"
        # Polling again records no new event (a waiting machine asks every minute).
        before = len(kinds(app))
        await script(base, FORGER)
        assert len(kinds(app)) == before
        # Nothing that needs a token can be had: no overlay, no node config, no phone-home.
        async with session_from(FORGER) as s, s.get(f"{base}/boot/{PATH}/x.y/bootserver.cpio") as r:
            assert r.status == 403
        status, _ = await phone_home(base, FORGER, "x.y", a_host_key())
        assert status == 403
        assert app[STORE].node(MAC).host_key is None and app[STORE].job(MAC) is None


async def test_approve_mode_two_claims_in_the_window_are_a_visible_conflict_and_neither_is_provisioned(tmp_path):
    """Finding 1, inside the window: the real machine's and the forger's claims make a conflict that is held
    (no token for the second, the first's phone-home refused), shown on the page and in /metrics."""
    config = site(tmp_path, 'enroll = "approve"')
    async with served(config) as (app, base):
        app[CORE].approve(MAC)
        status, text = await script(base, REAL)
        real_token = token_in(text)
        assert status == 200 and real_token
        status, text = await script(base, FORGER)
        assert status == 200 and token_in(text) is None and "both claimed" in text
        node = app[STORE].node(MAC)
        assert node.held and REAL in node.held and FORGER in node.held
        status, text = await phone_home(base, REAL, real_token, a_host_key())
        assert status == 403 and "held" in text
        assert app[STORE].job(MAC) is None and app[STORE].node(MAC).host_key is None
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/machines/{MAC}") as r:
                page = await r.text()
            async with s.get(f"{base}/metrics") as r:
                metrics = await r.text()
        assert "both claimed" in page and "approve it once you know which is the real machine" in page
        assert "bootserver_claim_conflicts_total 1.0" in metrics and "bootserver_machines_held 1.0" in metrics
        # The operator decides: approving lets the held claims go, and the next boot starts clean.
        app[CORE].approve(MAC)
        assert app[STORE].node(MAC).held is None
        status, text = await script(base, REAL)
        assert token_in(text)


async def test_open_mode_the_first_claimant_wins_and_the_second_is_refused_and_seen(tmp_path):
    """Finding 1 and 5, open mode: the first claimant keeps its token (the README says so); a second address
    asking for the same MAC's script gets none and does not revoke the first (finding 5: polling a booting
    machine's script used to stop it from phoning home); the conflict is an event and a metric."""
    config = site(tmp_path)
    async with served(config) as (app, base):
        _, text = await script(base, REAL)
        real_token = token_in(text)
        for _ in range(3):  # polling from another address
            _, text = await script(base, FORGER)
            assert token_in(text) is None and "first claimant keeps it" in text
        assert app[STORE].node(MAC).held is None
        assert kinds(app).count("claim-conflict") == 3
        async with session_from(REAL) as s, s.get(f"{base}/boot/{PATH}/{real_token}/config.json") as r:
            assert r.status == 200  # the real machine's overlay still works
        status, _ = await phone_home(base, REAL, real_token, a_host_key())
        assert status == 202
        # The same address booting again gets a new token: one live token per machine per boot.
        app[STORE].record(MAC, "failed", {}, state="failed")
        _, first = await script(base, REAL)
        _, second = await script(base, REAL)
        assert token_in(first) and token_in(second) and token_in(first) != token_in(second)
        assert app[STORE].live_token(MAC).id == token_in(second).split(".")[0]


async def test_known_mode_provisions_only_configured_machines(tmp_path):
    """Finding 1, known mode: an unlisted MAC gets no token, a listed one does."""
    config = site(tmp_path, 'enroll = "known"')
    async with served(config) as (app, base):
        _, text = await script(base, FORGER, "52-54-00-00-40-99")
        assert token_in(text) is None and "enroll is \"known\"" in text
        _, text = await script(base, REAL)
        assert token_in(text)


async def test_the_window_closes_at_the_first_accepted_phone_home_and_when_it_lapses(tmp_path):
    config = site(tmp_path, 'enroll = "approve"')
    async with served(config) as (app, base):
        app[CORE].approve(MAC)
        _, text = await script(base, REAL)
        status, _ = await phone_home(base, REAL, token_in(text), a_host_key())
        assert status == 202 and app[STORE].node(MAC).window_until is None
        app[STORE].record(MAC, "failed", {}, state="failed")  # e.g. provisioning failed: the machine reboots
        _, text = await script(base, REAL)
        assert token_in(text) is None and "waiting for approval" in text
        app[STORE].open_window(MAC, time.time() - 1, "approved", {})  # an approval that has lapsed
        _, text = await script(base, REAL)
        assert token_in(text) is None


# -- finding 2: file requests move states ---------------------------------------------------------------------


async def test_a_kernel_request_never_moves_a_deployed_machine(tmp_path):
    """Finding 2: an unauthenticated GET of a deployed machine's kernel is an event only; its script still
    boots the local disk and issues no token."""
    config = site(tmp_path)
    async with served(config) as (app, base):
        app[STORE].record(MAC, "deployed", {}, state="deployed")
        async with session_from(FORGER) as s, s.get(f"{base}/boot/{PATH}/kernel") as r:
            assert r.status == 200
            await r.read()
        await until_async(lambda: "file-served" in kinds(app))
        assert app[STORE].node(MAC).state == "deployed"
        _, text = await script(base, FORGER)
        assert token_in(text) is None and "sanboot" in text or "exit" in text
        assert app[STORE].node(MAC).state == "deployed"


async def test_a_script_asked_for_while_a_machine_is_provisioned_is_not_a_new_boot(tmp_path):
    config = site(tmp_path)
    async with served(config) as (app, base):
        app[STORE].record(MAC, "step-started", {"step": "deploy"}, state="deploy")
        _, text = await script(base, FORGER)
        assert token_in(text) is None and "being provisioned" in text
        assert app[STORE].node(MAC).state == "deploy"


# -- finding 3: SSH steering ----------------------------------------------------------------------------------


async def test_provisioning_connects_to_the_caller_not_to_the_address_it_reports(tmp_path):
    """Finding 3: a phone-home naming another node's address (`ip`) still makes the server SSH to the address
    the call came from; the other node's sshd is never contacted."""
    config = site(tmp_path)
    port = free_port(host=REAL)
    async with served(config, ssh_port=port) as (app, base), \
            ssh_server(app[PROVISIONER].keys.ssh_public, host=REAL, port=port) as caller, \
            ssh_server(app[PROVISIONER].keys.ssh_public, host="127.0.0.9", port=port) as victim:
        _, text = await script(base, REAL)
        status, _ = await phone_home(base, REAL, token_in(text), caller.host_key_line, ip="127.0.0.9")
        assert status == 202
        await until_async(lambda: app[STORE].node(MAC).state in ("deployed", "failed"), timeout=20)
        assert app[STORE].node(MAC).state == "deployed", kinds(app)
        assert caller.connections and not victim.connections
        node = app[STORE].node(MAC)
        assert node.ip == REAL
        detail = next(e.detail for e in app[STORE].events(MAC) if e.kind == "phoned-home")
        assert (detail["ip"], detail["reported_ip"]) == (REAL, "127.0.0.9")
        assert (tmp_path / "node" / "app.env").read_text() == SECRET


async def test_pinned_host_keys_are_not_shown_on_pages_streams_or_the_api(tmp_path):
    """Finding 3: the public pages showed every pinned host key; only its fingerprint is shown now."""
    config = site(tmp_path)
    async with served(config) as (app, base):
        _, text = await script(base, REAL)
        key = a_host_key()
        assert (await phone_home(base, REAL, token_in(text), key))[0] == 202
        body = key.split()[1]
        async with aiohttp.ClientSession() as s:
            for path in (f"/machines/{MAC}", f"/api/v1/machines/{MAC}", f"/api/v1/machines/{MAC}/events",
                         "/api/v1/machines", "/"):
                async with s.get(base + path) as r:
                    assert r.status == 200 and body not in await r.text(), path
            async with s.get(f"{base}/machines/{MAC}/stream?after=0") as r:
                chunk = await asyncio.wait_for(r.content.read(65536), 5)
                assert b"phoned-home" in chunk or b"data:" in chunk
                assert body.encode() not in chunk


async def test_a_phone_home_from_another_address_than_the_script_is_refused(tmp_path):
    config = site(tmp_path)
    async with served(config) as (app, base):
        _, text = await script(base, REAL)
        status, text = await phone_home(base, FORGER, token_in(text), a_host_key())
        assert status == 403 and "issued to 127.0.0.2" in text
        assert app[STORE].job(MAC) is None


# -- finding 4: config injection through the reported address ----------------------------------------------


@pytest.mark.parametrize("bad", ["fe80::1%eth0\nmalicious = true", "fe80::1%\"", "10.0.0.1 ", "010.000.000.001",
                                 "::ffff:10.0.0.1%x", "", 5])
def test_addresses_from_outside_are_parsed_strictly(bad):
    """Finding 4: scope ids (any characters) and other spellings are refused, not stored."""
    with pytest.raises(BadRequest):
        strict_ip(bad)


def test_addresses_get_one_canonical_spelling():
    assert strict_ip("::ffff:10.0.0.1") == "10.0.0.1"
    assert strict_ip("2001:DB8::0:1") == "2001:db8::1"


async def test_a_phone_home_reporting_a_scoped_address_is_refused_and_nothing_is_stored(tmp_path):
    """Finding 4: the injected line never reaches the store (or another node's templates)."""
    config = site(tmp_path)
    async with served(config) as (app, base):
        _, text = await script(base, REAL)
        status, text = await phone_home(base, REAL, token_in(text), a_host_key(), ip="fe80::1%eth0\nx = 1")
        assert status == 400 and "scope" in text
        node = app[STORE].node(MAC)
        assert node.ip is None and node.host_key is None and app[STORE].job(MAC) is None


# -- finding 6: provisioning slots ---------------------------------------------------------------------------


async def test_forgeries_with_a_silent_sshd_hold_at_most_their_sources_slots(tmp_path):
    """Finding 6: eight forged phone-homes from one address, to an sshd that accepts the login and then never
    answers, used to hold every provisioning slot for the command timeout; now they hold the slots of one source
    ([server] provision_per_source = 2), a real node elsewhere is provisioned at once, and the forgeries fail at
    the job deadline."""
    # The fake nodes share this host's files: a check command, not files, is the deploy each runs.
    config = site(tmp_path, "provision_per_source = 2\nprovision_concurrency = 8", deploy='check = "sync"\n')
    port = free_port(host=REAL)
    slow = {"job_seconds": 6, "command_timeout": 600, "keepalive_interval": 600}
    async with served(config, ssh_port=port, **slow) as (app, base), \
            ssh_server(app[PROVISIONER].keys.ssh_public, host=FORGER, port=port, hang_on="sync") as silent, \
            ssh_server(app[PROVISIONER].keys.ssh_public, host=REAL, port=port) as real:
        forged = [f"52:54:00:00:41:{i:02x}" for i in range(8)]
        for mac in forged:
            path = mac.replace(":", "-")
            _, text = await script(base, FORGER, path)
            assert (await phone_home(base, FORGER, token_in(text), silent.host_key_line, path))[0] == 202
        await until_async(lambda: len(silent.connections) >= 2, timeout=10)
        _, text = await script(base, REAL)
        assert (await phone_home(base, REAL, token_in(text), real.host_key_line))[0] == 202
        await until_async(lambda: app[STORE].node(MAC).state == "deployed", timeout=10)
        assert len(silent.connections) == 2  # the other six wait their turn behind their own source
        states = {m: app[STORE].node(m).state for m in forged}
        assert sum(s == "deploy" for s in states.values()) == 2, states
        await until_async(lambda: sum(app[STORE].node(m).state == "failed" for m in forged) >= 2, timeout=15)
        failed = next(e for m in forged for e in app[STORE].events(m) if e.kind == "failed")
        assert "did not finish within 0.1 minutes ([server] job_minutes)" in failed.detail["reason"]


# -- finding 10: store pollution -----------------------------------------------------------------------------


async def test_new_machines_per_source_are_limited_and_others_still_boot(tmp_path):
    """Finding 10: one source address may introduce only new_machines_per_minute machines; another source and
    known machines are not affected."""
    config = site(tmp_path, "new_machines_per_minute = 5")
    async with served(config) as (app, base):
        statuses = [(await script(base, FORGER, f"52-54-00-00-42-{i:02x}"))[0] for i in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        assert app[STORE].node_count() == 5
        assert (await script(base, REAL))[0] == 200
        assert (await script(base, FORGER, "52-54-00-00-42-00"))[0] == 200  # seen before: not new


async def test_one_new_machine_asking_at_once_many_times_is_one_new_machine(tmp_path):
    """A new machine's first script is recorded behind (within 100 ms): a burst of its requests before that write
    lands (a firmware retrying, iPXE and a chainload) introduces one machine, not one per request. It used to
    answer 429 once the burst passed new_machines_per_minute."""
    config = site(tmp_path, "new_machines_per_minute = 5")
    async with served(config) as (app, base):
        answers = await asyncio.gather(*(script(base, FORGER, "52-54-00-00-45-00") for _ in range(20)))
        assert [status for status, _ in answers] == [200] * 20
        statuses = [(await script(base, FORGER, f"52-54-00-00-45-{i:02x}"))[0] for i in range(1, 6)]
        assert statuses == [200] * 4 + [429]  # the burst's machine was one of the five


async def test_files_and_refusals_for_unseen_macs_make_no_machine_rows(tmp_path):
    """Finding 10: a kernel fetched, or a phone-home refused, for a MAC that never asked for its script used to
    create a machine row each."""
    config = site(tmp_path)
    async with served(config) as (app, base):
        async with session_from(FORGER) as s:
            for i in range(20):
                async with s.get(f"{base}/boot/52-54-00-00-43-{i:02x}/kernel") as r:
                    await r.read()
        for i in range(20):
            await phone_home(base, FORGER, "a.b", a_host_key(), f"52-54-00-00-44-{i:02x}")
        await asyncio.sleep(0.2)
        assert app[STORE].node_count() == 0


def test_rate_limit_forgets_idle_sources():
    limit = RateLimit(2, seconds=10, max_keys=3)
    assert limit.allow("a", now=1) and limit.allow("a", now=2) and not limit.allow("a", now=3)
    assert limit.allow("a", now=12)  # the window slid
    for key in "bcd":
        assert limit.allow(key, now=30)
    assert len(limit._seen) <= 3


def test_rate_limit_counts_an_item_once_in_its_window():
    limit = RateLimit(2, seconds=10)
    assert all(limit.allow("a", now=1, item="m1") for _ in range(5))  # one item, counted once
    assert limit.allow("a", now=2, item="m2") and not limit.allow("a", now=3, item="m3")
    assert limit.allow("a", now=4, item="m1")  # still in the window: not new
    assert limit.allow("a", now=11.5, item="m3")  # m1 left the window, and its place with it
    assert not limit.allow("a", now=11.6, item="m1")  # m1 is new again, and m2 and m3 fill the window


# -- the firmware's word against the agent's: SMBIOS UUID -----------------------------------------------------


UUID = "4c4c4544-0042-3510-8056-b4c04f4e3132"


async def test_the_agent_must_report_the_uuid_the_firmware_reported(tmp_path):
    config = site(tmp_path)
    async with served(config) as (app, base):
        _, text = await script(base, REAL, uuid=UUID)
        token = token_in(text)
        status, text = await phone_home(base, REAL, token, a_host_key(), uuid=str(uuid.uuid4()))
        assert status == 403 and "SMBIOS UUID" in text and "reported by the firmware" in text
        assert kinds(app)[-1] == "refused"
        status, text = await phone_home(base, REAL, token, a_host_key())  # none at all
        assert status == 403
        status, _ = await phone_home(base, REAL, token, a_host_key(), uuid=UUID.upper())
        assert status == 202
        detail = next(e.detail for e in app[STORE].events(MAC) if e.kind == "phoned-home")
        assert detail["uuid"] == UUID


async def test_a_uuid_pinned_in_the_config_must_match(tmp_path):
    config = site(tmp_path, machines=f'uuid = "{UUID}"\n')
    async with served(config) as (app, base):
        other = str(uuid.uuid4())
        _, text = await script(base, FORGER, uuid=other)
        status, text = await phone_home(base, FORGER, token_in(text), a_host_key(), uuid=other)
        assert status == 403 and "pinned in [machines]" in text


def test_uuids_compare_in_either_smbios_byte_order():
    swapped = str(uuid.UUID(bytes=uuid.UUID(UUID).bytes_le))
    assert same_uuid(UUID, swapped) and same_uuid(UUID, UUID)
    assert not same_uuid(UUID, str(uuid.uuid4()))
    assert canonical_uuid("00000000-0000-0000-0000-000000000000") is None  # "no UUID" identifies nobody
    with pytest.raises(BadRequest):
        canonical_uuid("not-a-uuid")


# -- where the call really came from --------------------------------------------------------------------------


def test_full_dhcp_mode_binds_the_phone_home_to_the_leased_address(booter, store, config):
    """In full DHCP mode we leased the MAC its address: a phone-home from any other is not that machine."""
    dhcp = configuration.DhcpConfig(mode="full")
    booter.reload(dataclasses.replace(config, dhcp=dhcp))
    mac = "52:54:00:00:00:05"
    urls = Urls("http://h", "http://h")
    text = booter.machine_script(mac, {}, urls, "http", "10.0.0.7").data.decode()
    token = token_in(text)
    report = {"token": token, "host_key": a_host_key()}
    with pytest.raises(Forbidden, match="holds no lease"):
        booter.phone_home(mac, report, "10.0.0.7")
    store.bind_lease(mac, "10.0.0.8", time.time() + 60)
    with pytest.raises(Forbidden, match="holds 10.0.0.8"):
        booter.phone_home(mac, report, "10.0.0.7")
    store.bind_lease(mac, "10.0.0.7", time.time() + 60)
    assert booter.phone_home(mac, report, "10.0.0.7").ip == "10.0.0.7"


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path):
    config = site(tmp_path, 'trusted_proxies = ["127.0.0.5"]')
    async with served(config) as (app, base):
        for source, expected in (("127.0.0.5", "10.9.9.9"), ("127.0.0.6", "127.0.0.6")):
            async with session_from(source) as s, s.get(f"{base}/boot/{PATH}.ipxe",
                                                        headers={"X-Forwarded-For": "10.9.9.9"}) as r:
                token = token_in(await r.text())
            assert app[STORE].token(token.split(".")[0]).ip == expected
            app[STORE].record(MAC, "failed", {}, state="failed")
            with app[STORE]._transaction() as db:  # let the next claim start clean
                db.execute("UPDATE tokens SET used = 1")


async def test_a_uuid_the_firmware_garbled_counts_as_none(tmp_path):
    """iPXE 1.0 (2019)'s ${uuid:uristring} escapes the UUID's raw bytes: such a report is no UUID, not a 400 that
    stops the boot (found with QEMU's -uuid); only a pinned one is then checked."""
    config = site(tmp_path)
    async with served(config) as (app, base):
        status, text = await script(base, REAL, uuid="=,Z_NkJ&FF}*;L]")
        assert status == 200 and token_in(text)
        assert app[STORE].token(token_in(text).split(".")[0]).uuid is None
