"""The Redfish driver (sushy) against sushy-tools' emulator with its fake driver (tests/support/redfish.py):
power, the one-time network boot read back, the inventory into the machine's facts. The lab's VMs have no
Redfish BMC: the emulator's libvirt driver needs a libvirtd, which these machines do not run (README, "Power
control")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.redfish import Emulator, redfish_emulator

from bootserver import config as configuration
from bootserver.booter import Booter
from bootserver.opening import open_core
from bootserver.store import Store

MAC = "52:54:00:00:00:01"


@pytest.fixture
async def emulator(tmp_path: Path):
    async with redfish_emulator(tmp_path / "redfish") as running:
        yield running


def with_redfish(config_file: Path, emulator: Emulator, firmware: str) -> configuration.Config:
    password = config_file.parent / "bmc.password"
    password.write_text("anything\n")  # the fake driver asks for none; the file is read all the same
    password.chmod(0o600)
    with config_file.open("a") as f:
        f.write(f'\n[machines."{MAC}".bmc]\ndriver = "redfish"\naddress = "{emulator.url}"\nusername = "admin"\n'
                f'password_file = "{password}"\nsystem = "{emulator.system}"\nfirmware = "{firmware}"\n')
    return configuration.load(config_file)


async def until_power(booter: Booter, state: str, timeout: float = 20.0) -> None:
    """The fake driver applies a power change 1 to 11 s after it is asked."""
    deadline = time.monotonic() + timeout
    while (now := await booter.power(MAC, "status")) != state:
        assert time.monotonic() < deadline, f"power still {now}, not {state}, after {timeout} s"
        await asyncio.sleep(0.5)


async def test_power_and_one_time_network_boot_through_redfish(config_file: Path, emulator: Emulator):
    config = with_redfish(config_file, emulator, firmware="uefi")
    booter = open_core(config)
    try:
        assert await booter.power(MAC, "status") == "off"
        await booter.power(MAC, "on")
        await until_power(booter, "on")
        Store(config.server.database).record(MAC, "booted", {}, state="running")
        result = await booter.reprovision_now(MAC)  # on: next boot from the network, then a forced restart
        assert (result.boot_override, result.error) == ("kept", None)
        await until_power(booter, "on")
        await booter.power(MAC, "off")
        await until_power(booter, "off")
    finally:
        booter.close()
    store = Store(config.server.database)
    try:
        timeline = store.events(MAC)
        node = store.node(MAC)
    finally:
        store.close()
    kept = next(e for e in timeline if e.kind == "boot-override-set")
    assert kept.detail["asked"]["mode"] == "uefi"
    assert kept.detail["read_back"] == {"device": "network", "uefi": True, "persistent": True}
    assert "persistent" in kept.detail["note"], "the fake driver keeps a one-time override as continuous"
    assert node.facts["bmc_manufacturer"] == "Sushy Emulator", "the inventory, into the facts"
    assert node.reprovision and node.state == "reprovision"
    kinds = [e.kind for e in timeline]
    assert {"power-on", "power-cycle", "power-off", "bmc-inventory"} <= set(kinds) and "power-failed" not in kinds


async def test_a_legacy_boot_reads_back_in_legacy_mode(config_file: Path, emulator: Emulator):
    booter = open_core(with_redfish(config_file, emulator, firmware="bios"))
    try:
        read = await booter.power_control().network_boot_once(MAC, uefi=False)
    finally:
        booter.close()
    assert (read.device, read.uefi) == ("network", False)
