"""A lab VM powered by bootserver through its real BMC: QEMU's ipmi-bmc-extern device connected to OpenIPMI's
ipmi_sim, which answers IPMI over LAN inside the lab's namespace (bootserver/tools/lab.py, labbmc.py).

    the VM is off (its BMC up, QEMU not started); `bootserver deploy MAC --now` asks the BMC for its power state,
    for a one-time network boot (which this ipmi_sim refuses: recorded) and a power cycle, which starts QEMU;
    the VM netboots over the lab's switch, installs Debian and the lab's demo service and is `running`. Then
    `bootserver reprovision MAC --now` resets the running machine through the BMC (not over SSH), and it goes
    through the flow again (a second phone-home) without anyone touching QEMU; `bootserver power MAC off` ends
    QEMU.

Needs root, vde2, qemu-system-x86, openipmi, ipxe and curl; a missing one fails the test.
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
    until_state,
)

from bootserver.tools.image import AgentImage
from bootserver.tools.lab import Lab

pytestmark = pytest.mark.vm


@pytest.fixture
def lab(tmp_path: Path):
    with lab_for_test(tmp_path) as running:
        yield running


async def test_deploy_now_powers_a_vm_on_through_ipmi_to_running_and_reprovision_now_resets_it(
        lab: Lab, agent_image: AgentImage, os_image, timing):
    lab.write_config(agent_image.kernel.parent, machines=1, os_image=os_image.tarball)
    lab.start_server()
    lab.start_vm(1, powered=False)
    await asyncio.sleep(1)
    assert not qemu_running(lab), "the VM is off until its BMC is told to power it on"
    assert lab.bmcs["1"]["address"] == "10.100.0.201" and lab.bmcs["1"]["driver"] == "ipmi"

    started = time.monotonic()
    deployed = bootserver_cli(lab, "deploy", MAC, "--now")
    assert deployed.returncode == 0, f"{deployed.stdout}{deployed.stderr}{report(lab)}"
    assert f"{MAC}: power cycled" in deployed.stdout
    assert qemu_running(lab), "ipmi_sim started QEMU on power-on"
    took = await until_state(lab, "running", started)
    timing("lab VM powered off: deploy --now over IPMI to running Debian (BIOS, VDE)", took)

    # Never seen before: its BMC asked first, then its window opened (no mark: nothing to reprovision).
    kinds = [(e.kind, e.detail.get("action")) for e in timeline(lab)]
    assert kinds[:4] == [("power-status", "status"), ("approved", None),
                         ("power-failed", "boot-override"),  # ipmi_sim refuses it while it runs the VM itself
                         ("power-cycle", "cycle")], kinds
    status = next(m for m in lab.status_json()["machines"] if m["mac"] == MAC)
    assert set(status["bmc"]) == {"driver", "address", "port", "username", "password"}

    # The running machine is reset by its BMC (not rebooted over SSH) and netboots into the flow again.
    await reprovision_now_then_power_off(lab, timing, "IPMI reset of the running machine")
    assert "reboot-sent" not in [e.kind for e in timeline(lab)]
