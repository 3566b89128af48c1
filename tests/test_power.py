"""Power control through a real BMC: OpenIPMI's ipmi_sim on loopback (tests/support/bmc.py), driven by our IPMI
driver (pyghmi) from the core, the API and the CLI. No VM: ipmi_sim's chassis is a small program of the test's
(power and boot device in files); tests/test_vm_power.py powers a real VM.

    status / on / soft-off / off / cycle   each a call and an event; the chassis really changes
    wrong credentials                  a power-failed event saying so, and nothing else changes
    a BMC that never answers           an error within the call timeout, the server serving meanwhile
    an override the BMC does not keep  ipmi_sim never marks it valid: the read-back catches it
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from support.bmc import RunningBmc, simulated_bmc
from support.http import bearer
from support.net import free_port
from support.serve import serving

from bootserver import cli
from bootserver import config as configuration
from bootserver.app import http_address, init_app, running
from bootserver.errors import ConfigError
from bootserver.opening import open_core
from bootserver.power import BmcError
from bootserver.provision.pki import encrypt_secret
from bootserver.store import Store

MAC = "52:54:00:00:00:01"
OTHER = "52:54:00:00:00:02"  # in the example config, without a BMC
THIRD = "52:54:00:00:00:03"


@pytest.fixture
async def bmc(tmp_path: Path):
    async with simulated_bmc(tmp_path / "bmc") as running_bmc:
        yield running_bmc


def with_bmcs(config_file: Path, bmcs: dict[str, tuple[str, int, str]], server: str = "") -> configuration.Config:
    """The example config with [machines."MAC".bmc] for each MAC: (address, port, password in clear), the
    password encrypted with the server's secret key as `bootserver bmc encrypt-password` does."""
    config = configuration.load(config_file)
    text = config_file.read_text().replace("[server]\n", f"[server]\n{server}", 1)
    for mac, (address, port, password) in bmcs.items():
        encrypted = encrypt_secret(config.server.secret_key_path, password)
        text += (f'\n[machines."{mac}".bmc]\ndriver = "ipmi"\naddress = "{address}"\nport = {port}\n'
                 f'username = "admin"\npassword = "{encrypted}"\n')
    config_file.write_text(text)
    return configuration.load(config_file)


def sim(bmc: RunningBmc, password: str | None = None) -> tuple[str, int, str]:
    return bmc.sim.address, bmc.sim.port, password or bmc.sim.password


def base_url(app) -> str:
    host, port = http_address(app)
    return f"http://{host}:{port}"


def events(config: configuration.Config, mac: str) -> list:
    store = Store(config.server.database)
    try:
        return store.events(mac)
    finally:
        store.close()


# -- the config ------------------------------------------------------------------------------------------------

def test_config_takes_a_bmc_and_refuses_a_password_in_clear():
    machine = {"bmc": {"driver": "redfish", "address": "https://10.0.10.22:8443", "username": "u",
                       "password_file": "/etc/bootserver/bmc/pw", "verify": False, "system": "System.Embedded.1"}}
    bmc = configuration.parse({"machines": {MAC: machine}}).machines[MAC].bmc
    assert (bmc.driver, bmc.verify, bmc.system, bmc.password) == ("redfish", False, "System.Embedded.1", None)
    assert "pw" not in repr(bmc)
    refusals = {
        "password": ({"driver": "ipmi", "address": "a", "username": "u", "password": "secret"}, "encrypt"),
        "neither": ({"driver": "ipmi", "address": "a", "username": "u"}, "password_file, one of them"),
        "driver": ({"driver": "ssh", "address": "a", "username": "u", "password_file": "p"}, "ipmi, redfish"),
        "verify": ({"driver": "ipmi", "address": "a", "username": "u", "password_file": "p", "verify": False},
                   "Redfish settings"),
    }
    for raw, message in refusals.values():
        with pytest.raises(ConfigError, match=message):
            configuration.parse({"machines": {MAC: {"bmc": raw}}})


# -- the core, through our IPMI driver -----------------------------------------------------------------------

async def test_status_on_off_cycle_through_ipmi(config_file: Path, bmc: RunningBmc):
    config = with_bmcs(config_file, {MAC: sim(bmc)})
    booter = open_core(config)
    try:
        assert await booter.power(MAC, "status") == "off"
        await booter.power(MAC, "on")
        assert bmc.power == "on" and await booter.power(MAC, "status") == "on"
        await booter.power(MAC, "cycle")  # on: a hard reset
        assert bmc.log[-1] == "reset 1"
        await booter.power(MAC, "soft-off")  # an ACPI shutdown: passed to the chassis, which would tell the OS
        assert bmc.log[-1] == "shutdown 1"
        await booter.power(MAC, "off")
        assert bmc.power == "off" and booter.power_state(MAC).state == "off"
        with pytest.raises(BmcError, match="no BMC"):
            await booter.power(OTHER, "on")
    finally:
        booter.close()
    recorded = [(e.kind, e.detail.get("action"), e.detail.get("result")) for e in events(config, MAC)]
    assert recorded == [("power-status", "status", "off"), ("power-on", "on", "done"),
                        ("power-status", "status", "on"), ("power-cycle", "cycle", "done"),
                        ("power-soft-off", "soft-off", "done"), ("power-off", "off", "done")]
    detail = events(config, MAC)[1].detail
    assert detail["bmc"] == f"ipmi 127.0.0.1:{bmc.sim.port}" and 0 <= detail["seconds"] < 5


async def test_wrong_credentials_are_an_error_event_and_nothing_else_changes(config_file: Path, bmc: RunningBmc):
    config = with_bmcs(config_file, {MAC: sim(bmc, password="not-the-password")})
    booter = open_core(config)
    try:
        store = Store(config.server.database)
        store.record(MAC, "booted", {}, state="running")
        before = store.node(MAC)
        with pytest.raises(BmcError, match="Incorrect password.*check username and password"):
            await booter.reprovision_now(MAC)
        with pytest.raises(BmcError, match="Incorrect password"):
            await booter.power(MAC, "on")
        after = store.node(MAC)
        assert (after.state, after.reprovision, after.window_until) == (before.state, False, before.window_until)
        store.close()
    finally:
        booter.close()
    assert bmc.log == [] and bmc.power == "off", "the chassis was never touched"
    failed = [e for e in events(config, MAC) if e.kind != "booted"]
    assert [(e.kind, e.detail["action"]) for e in failed] == [("power-failed", "status"), ("power-failed", "on")]
    assert "Incorrect password" in failed[0].detail["error"]


async def test_a_boot_override_the_bmc_does_not_keep_is_caught_by_reading_it_back(config_file: Path,
                                                                                   bmc: RunningBmc):
    """ipmi_sim passes the override to its chassis (`boot pxe`) but never marks it valid: it reads back as none."""
    config = with_bmcs(config_file, {MAC: sim(bmc)})
    booter = open_core(config)
    try:
        Store(config.server.database).record(MAC, "booted", {}, state="running", facts={"platform": "pcbios"})
        result = await booter.reprovision_now(MAC)
    finally:
        booter.close()
    assert result.boot_override.startswith("lost: ") and "'default', not the network" in result.boot_override
    assert result.error is None and bmc.power == "on", "the power cycle went out all the same"
    assert bmc.log == ["boot pxe", "power 1"], "asked of the chassis: the network boot, then power on (it was off)"
    timeline = events(config, MAC)
    lost = next(e for e in timeline if e.kind == "boot-override-lost")
    assert lost.detail["asked"] == {"device": "network", "mode": "legacy", "once": True}
    assert lost.detail["read_back"]["device"] == "default"
    kinds = [e.kind for e in timeline]
    assert kinds.index("reprovision-requested") < kinds.index("boot-override-lost") < kinds.index("power-cycle")
    store = Store(config.server.database)
    assert store.node(MAC).reprovision and store.node(MAC).state == "reprovision"
    store.close()


# -- the server: a dead BMC, the API, the page, /metrics, the CLI ----------------------------------------------

async def test_a_bmc_that_never_answers_fails_within_the_timeout_while_the_server_serves(config_file: Path,
                                                                                          bmc: RunningBmc):
    """`bootserver serve` as a process of its own (pyghmi's sockets must be below file descriptor 1024, which a long
    test session in one process need not leave them: README, "Power control")."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:  # bound, never read: a BMC that is gone
        dead.bind(("127.0.0.1", 0))
        config_file.write_text(config_file.read_text().replace('http = "127.0.0.1:0"', f'http = "127.0.0.1:{port}"'))
        config = with_bmcs(config_file, {MAC: ("127.0.0.1", dead.getsockname()[1], "whatever"), THIRD: sim(bmc)},
                           server="bmc_timeout_seconds = 2\n")
        with serving(config_file, config_file.parent / "server.log"):
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
                started = time.monotonic()
                call = asyncio.create_task(http.post(f"/api/v1/machines/{MAC}/power", json={"action": "on"},
                                                     headers=bearer(config)))
                await asyncio.sleep(0.3)
                while not call.done():  # meanwhile the server answers, and the other BMC too
                    listed = time.monotonic()
                    assert (await http.get("/api/v1/machines")).status == 200
                    assert time.monotonic() - listed < 1.0
                    on = await http.post(f"/api/v1/machines/{THIRD}/power", json={"action": "on"},
                                         headers=bearer(config))
                    assert on.status == 200, await on.text()
                    await asyncio.sleep(0.2)
                response = await call
                took = time.monotonic() - started
                body = await response.json()
    assert response.status == 502 and "no answer within 2 s" in body["error"], body
    assert 2 <= took < 4, f"{took:.1f} s for a call whose timeout is 2 s"
    assert bmc.power == "on"
    failed = [e for e in events(config, MAC) if e.kind == "power-failed" and e.detail["action"] == "on"]
    assert len(failed) == 1 and "bmc_timeout_seconds" in failed[0].detail["error"]


async def test_api_page_and_metrics_drive_and_show_power(config_file: Path, bmc: RunningBmc):
    config = with_bmcs(config_file, {MAC: sim(bmc)})
    app = init_app(config)
    async with running(app), aiohttp.ClientSession(base_url(app)) as http:
        refused = await http.post(f"/api/v1/machines/{MAC}/power", json={"action": "on"})
        assert refused.status == 401 and bmc.power == "off"
        bad = await http.post(f"/api/v1/machines/{MAC}/power", json={"action": "explode"}, headers=bearer(config))
        assert bad.status == 400 and "soft-off" in (await bad.json())["error"]
        on = await http.post(f"/api/v1/machines/{MAC}/power", json={"action": "on"}, headers=bearer(config))
        assert on.status == 200 and (await on.json())["power"]["state"] == "on" and bmc.power == "on"
        assert (await (await http.get(f"/api/v1/machines/{MAC}/power")).json())["power"] == "on"
        machine = await (await http.get(f"/api/v1/machines/{MAC}")).json()
        assert machine["power"]["state"] == "on"
        page = await (await http.get(f"/machines/{MAC}")).text()
        assert 'action="/machines/52:54:00:00:00:01/power"' in page and "Re-provision now" in page
        assert 'id="power"' in page
        metrics = await (await http.get("/metrics")).text()
        assert 'bootserver_machines_power{state="on"} 1.0' in metrics
        # reprovision ?now=true through the API: marked, and netbooted through the BMC.
        response = await http.post(f"/api/v1/machines/{MAC}/reprovision?now=true", headers=bearer(config))
        body = await response.json()
        assert response.status == 200 and body["reprovision"] and body["netboot"]["error"] is None
        assert body["netboot"]["boot_override"].startswith("lost: ")
        assert bmc.log[-1] == "reset 1", "it was on: the cycle is a hard reset"
        # deploy: MACs or a group's configured members; with now, each through its BMC (raft's :02 has none).
        response = await http.post("/api/v1/deploy", json={"targets": [MAC], "now": True}, headers=bearer(config))
        body = await response.json()
        assert response.status == 200 and body["machines"] == [MAC] and body["netboot"][0]["error"] is None
        response = await http.post("/api/v1/deploy", json={"targets": ["raft"], "now": True}, headers=bearer(config))
        body = await response.json()
        assert body["machines"] == [MAC, OTHER] and "has no BMC" in body["netboot"][1]["error"]
        bad = await http.post("/api/v1/deploy", json={"targets": "raft"}, headers=bearer(config))
        assert bad.status == 400


async def test_cli_encrypts_a_password_then_powers_and_deploys(config_file: Path, bmc: RunningBmc, monkeypatch,
                                                               capsys):
    monkeypatch.setattr("sys.stdin", _Stdin(bmc.sim.password + "\n"))
    assert await run(["--config", str(config_file), "bmc", "encrypt-password"]) == 0
    encrypted = capsys.readouterr().out.strip()
    assert encrypted.startswith("encrypted:") and bmc.sim.password not in encrypted
    with config_file.open("a") as f:
        f.write(f'\n[machines."{MAC}".bmc]\ndriver = "ipmi"\naddress = "127.0.0.1"\nport = {bmc.sim.port}\n'
                f'username = "admin"\npassword = "{encrypted}"\n')
    assert await run(["--config", str(config_file), "power", MAC, "status"]) == 0
    assert capsys.readouterr().out.strip() == f"{MAC}: power is off"
    # The example config's group raft picks 52:54:00:00:00:01 and :02; :02 has no BMC: refused, not half done.
    assert await run(["--config", str(config_file), "deploy", MAC, "--now", "--parallel", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{MAC}: power cycled; WARNING: one-time network boot lost" in out, out
    assert bmc.power == "on"
    assert await run(["--config", str(config_file), "deploy", "raft", "--now"]) == 1
    out = capsys.readouterr().out
    assert f"{OTHER}: NOT booted: {OTHER} has no BMC" in out, out
    store = Store(dataclasses.replace(configuration.load(config_file)).server.database)
    try:
        assert store.node(OTHER) is None, "a machine without a BMC is not marked (nor recorded) by deploy --now"
    finally:
        store.close()


async def run(argv: list[str]) -> int:
    """The CLI, as from a shell: in a thread, since it runs an event loop of its own."""
    return await asyncio.to_thread(cli.main, argv)


class _Stdin:
    def __init__(self, text: str) -> None:
        self._text = text

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        return self._text
