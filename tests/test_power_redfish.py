"""The Redfish driver (sushy) against sushy-tools' emulator with its fake driver (tests/support/redfish.py):
power, the one-time network boot read back, the inventory into the machine's facts. The lab's Redfish BMCs
(`lab up --bmc redfish`: the emulator's libvirt driver) are powered for real in tests/test_vm_power_redfish.py;
here only the config and domains the lab writes for them are read back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.net import free_port
from support.redfish import Emulator, redfish_emulator
from support.require import require
from support.wait import until

from bootserver import config as configuration
from bootserver.booter import Booter
from bootserver.opening import open_core
from bootserver.store import Store
from bootserver.tools import labredfish
from bootserver.tools.lab import OVMF_CODE, OVMF_VARS, VM_MAC, Lab

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


def test_the_redfish_lab_config_gives_each_vm_the_emulator_and_its_domain(tmp_path: Path):
    """`lab up --bmc redfish` writes [machines."MAC".bmc] that the config takes (the one emulator, the domain's UUID
    as the system, the firmware's mode) and a domain whose UUID, MAC and UDP ports are the ones it names."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (images / name).write_bytes(b"x")
    lab = Lab(tmp_path / "lab", bmc_driver="redfish")
    config = configuration.load(lab.write_config(images, machines=2, provision=False, firmware="uefi"))
    bmcs = [config.machines[VM_MAC.format(index)].bmc for index in (1, 2)]
    assert [(b.driver, b.address, b.firmware) for b in bmcs] == [("redfish", "http://10.100.0.200:8000", "uefi")] * 2
    assert bmcs[0].system != bmcs[1].system and bmcs[0].system == lab.bmcs["1"]["system"]
    assert set(lab.bmcs["1"]) == {"driver", "address", "port", "username", "password", "system"}

    domain = ET.fromstring(labredfish.domain_xml(
        name="lab-vm1", uuid=str(bmcs[0].system), memory=1024, disk=tmp_path / "vm1.img", serial=tmp_path / "s.log",
        mac=VM_MAC.format(1), firmware="uefi", vars_file=tmp_path / "vars.fd", ovmf_code=OVMF_CODE,
        ovmf_vars=OVMF_VARS, plug_port=9201, vm_port=9301, qemu="qemu-system-x86_64"))
    assert domain.get("type") == "qemu" and domain.findtext("uuid") == bmcs[0].system
    nic = domain.find("devices/interface")
    assert (nic.get("type"), nic.find("mac").get("address")) == ("udp", VM_MAC.format(1))
    assert (nic.find("source").get("port"), nic.find("source/local").get("port")) == ("9201", "9301")
    assert "udp://127.0.0.1:9201->127.0.0.1:9301" in " ".join(labredfish.plug_command(tmp_path / "switch", 9201, 9301))
    assert domain.find("os/loader").get("type") == "pflash"
    assert domain.find("os/nvram").text == str(tmp_path / "vars.fd")


def test_a_domains_plug_is_started_again_when_it_exits(tmp_path: Path):
    """A lab domain's vde_plug was seen to have exited after its domain was reset, leaving the domain off the
    switch: it runs under a loop that starts it again. A real switch and real vde_plugs; vde_plug is killed; the
    NIC is a UDP socket of the test's, where QEMU's would be, and frames from the switch reach it again."""
    require("vde_switch", "vde_plug", "pgrep")
    switch = tmp_path / "switch"
    frame = bytes.fromhex("ffffffffffff" "525400000099" "0800") + bytes(46)  # a broadcast: flooded to every port
    with contextlib.ExitStack() as stack:
        stack.enter_context(spawned(["vde_switch", "--sock", str(switch)], stdin=subprocess.PIPE))
        until(lambda: (switch / "ctl").exists(), 5, "the switch's control socket")
        sender = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.bind(("127.0.0.1", 0))
        inject = free_port(socket.SOCK_DGRAM)
        stack.enter_context(spawned(["vde_plug", f"vde://{switch}",
                                     f"udp://127.0.0.1:{inject}->127.0.0.1:{sender.getsockname()[1]}"]))
        nic = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        nic.bind(("127.0.0.1", 0))
        nic.settimeout(0.2)
        plug = stack.enter_context(spawned(labredfish.plug_command(switch, free_port(socket.SOCK_DGRAM),
                                                                   nic.getsockname()[1])))

        def relayed() -> bool:
            sender.sendto(frame, ("127.0.0.1", inject))
            with contextlib.suppress(TimeoutError):
                return nic.recv(2048) == frame
            return False

        until(relayed, 10, "a frame from the switch to reach the NIC")
        child = int(until(lambda: subprocess.run(["pgrep", "-P", str(plug.pid), "vde_plug"], capture_output=True,
                                                 text=True).stdout.strip(), 5, "the plug's vde_plug"))
        os.kill(child, signal.SIGKILL)
        until(relayed, 10, "a frame to reach the NIC after vde_plug was killed")
        assert plug.poll() is None


@contextlib.contextmanager
def spawned(command: list[str], **popen) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(5)
