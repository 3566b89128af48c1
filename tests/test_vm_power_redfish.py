"""A lab VM powered by bootserver through a Redfish BMC: a libvirt domain (TCG) of the lab's own libvirtd, driven
by sushy-tools' emulator with its libvirt driver, both inside the lab's namespace (bootserver/tools/labredfish.py);
the domain's NIC is a UDP socket on the namespace's loopback, joined to the lab's VDE switch by a vde_plug.

    the domain is defined and off; `bootserver deploy MAC --now` asks the emulator for the power state, sets a
    one-time network boot (legacy: the machine was never seen) and reads it back, and powers the domain on; it
    netboots over the lab's switch and phones home. Then `bootserver reprovision MAC --now` resets it through
    the emulator (libvirt: destroy and start) and it goes through the flow again; `bootserver power MAC off`
    ends QEMU.

    (Power-off to `running` Debian over Redfish, then reprovision --now of the running machine, is the IPMI
    test's flow, kept out of CI for time: in the CI run of 432c42a its domain never reached our DHCP, as a domain
    whose vde_plug had exited; the plug now runs under a loop that starts it again, test_power_redfish.py.)

Needs root, vde2, qemu-system-x86, libvirt-daemon with its QEMU driver, libvirt-clients, ipxe, curl, sushy-tools
and libvirt-python (the test extra) and the libvirt-qemu user (./setup test adds it); a missing one fails the test.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.lab import (
    MAC,
    bootserver_cli,
    lab_for_test,
    qemu_running,
    report,
    reprovision_now_then_power_off,
    timeline,
    until_phoned_home,
)

from bootserver.tools.image import AgentImage
from bootserver.tools.lab import Lab

pytestmark = pytest.mark.vm


@pytest.fixture
def lab(tmp_path: Path):
    with lab_for_test(tmp_path, bmc_driver="redfish") as running:
        yield running


async def test_deploy_now_powers_a_libvirt_vm_on_through_redfish_and_reprovision_now_resets_it(
        lab: Lab, agent_image: AgentImage, timing):
    lab.write_config(agent_image.kernel.parent, machines=1, provision=False)
    lab.start_server()
    lab.start_vm(1, powered=False)
    await asyncio.sleep(1)
    assert not qemu_running(lab), "the domain is off until its BMC is told to power it on"
    bmc = lab.bmcs["1"]
    assert (bmc["driver"], bmc["address"]) == ("redfish", "http://10.100.0.200:8000")

    started = time.monotonic()
    deployed = bootserver_cli(lab, "deploy", MAC, "--now")
    assert deployed.returncode == 0, f"{deployed.stdout}{deployed.stderr}{report(lab)}"
    assert f"{MAC}: power cycled" in deployed.stdout, deployed.stdout
    assert qemu_running(lab), "libvirt started QEMU on the Redfish power-on"
    took = await until_phoned_home(lab, 1, started)
    timing("lab VM powered off: deploy --now over Redfish (sushy-tools, libvirt) to phone-home (BIOS, VDE)", took)

    events = timeline(lab)
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["power-status", "approved"] and "power-failed" not in kinds, kinds
    kept = next(e for e in events if e.kind == "boot-override-set")
    assert kept.detail["read_back"]["device"] == "network" and kept.detail["read_back"]["uefi"] is False, kept.detail
    assert kinds.index("boot-override-set") < kinds.index("power-cycle")
    status = next(m for m in lab.status_json()["machines"] if m["mac"] == MAC)
    assert set(status["bmc"]) == {"driver", "address", "port", "username", "password", "system"}

    await reprovision_now_then_power_off(lab, timing, "Redfish ForceRestart: libvirt destroy, start")
