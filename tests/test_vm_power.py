"""A lab VM powered by bootserver through its real BMC: QEMU's ipmi-bmc-extern device connected to OpenIPMI's
ipmi_sim, which answers IPMI over LAN inside the lab's namespace (bootserver/tools/lab.py, labbmc.py).

    the VM is off (its BMC up, QEMU not started); `bootserver deploy MAC --now` asks the BMC for its power state,
    for a one-time network boot (which this ipmi_sim refuses: recorded) and a power cycle, which starts QEMU;
    the VM netboots over the lab's switch and phones home. Then `bootserver reprovision MAC --now` resets it
    through the BMC, and it goes through the flow again (a second phone-home) without anyone touching QEMU;
    `bootserver power MAC off` ends QEMU.

    The same from power-off to `running` Debian (the lab's demo profile), then reprovision --now of the running
    machine: reset through its BMC (not rebooted over SSH), it netboots into the flow again.

Needs root, vde2, qemu-system-x86, openipmi, ipxe and curl; a missing one fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bootserver
from bootserver.store import Store
from bootserver.tools.image import AgentImage
from bootserver.tools.lab import VM_MAC, Lab, namespaces

pytestmark = pytest.mark.vm

TOOLS = {"ip": "iproute2", "vde_switch": "vde2", "qemu-system-x86_64": "qemu-system-x86", "ipmi_sim": "openipmi",
         "curl": "curl"}
MAC = VM_MAC.format(1)


@pytest.fixture
def lab(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.fail("the lab needs root (network namespaces, taps)")
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: apt-get install them (./setup test does)")
    lab = Lab(tmp_path / "lab", namespace=f"bsp-{os.getpid()}-{tmp_path.name[-12:]}")
    try:
        lab.start_network()
        yield lab
    finally:
        lab.down()
        assert lab.namespace not in namespaces()


def bootserver_cli(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """`bootserver --config LAB ...` inside the lab's namespace, where the BMCs are, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(Path(bootserver.__file__).resolve().parents[1])}
    return subprocess.run(["ip", "netns", "exec", lab.namespace, sys.executable, "-m", "bootserver", "--config",
                           str(lab.config_path), *args], capture_output=True, text=True, env=env, timeout=120)


def machine(lab: Lab) -> dict:
    result = subprocess.run(["ip", "netns", "exec", lab.namespace, "curl", "-s", "--max-time", "5",
                             f"http://{lab.address.ip}/api/v1/machines/{MAC}"], capture_output=True, text=True)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}


def timeline(lab: Lab) -> list:
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        return store.events(MAC)
    finally:
        store.close()


def qemu_running(lab: Lab) -> bool:
    return any(entry["running"] for name, entry in lab.status_json()["processes"].items() if name == "vm1")


async def until_phoned_home(lab: Lab, count: int, started: float, timeout: float = 150) -> float:
    """Seconds from `started` until the VM has phoned home `count` times."""
    deadline = time.monotonic() + timeout
    while sum(e.kind == "phoned-home" for e in timeline(lab)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{MAC} is {machine(lab).get('state')!r}: not phoned home {count} times after "
                                 f"{time.monotonic() - started:.0f} s{report(lab)}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def report(lab: Lab) -> str:
    parts = []
    for name in ("server.log", "bmc1.log", "vm1.qemu.log", "vm1.serial.log"):
        path = lab.dir / name
        if path.exists():
            parts.append(f"\n--- {name}:\n{path.read_text(errors='replace')[-3000:]}")
    return "".join(parts)


async def test_deploy_now_powers_a_vm_on_through_ipmi_and_reprovision_now_resets_it(lab: Lab,
                                                                                    agent_image: AgentImage, timing):
    lab.write_config(agent_image.kernel.parent, machines=1, provision=False)
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
    took = await until_phoned_home(lab, 1, started)
    timing("lab VM powered off: deploy --now over IPMI to phone-home (BIOS, VDE)", took)

    # Never seen before: its BMC asked first, then its window opened (no mark: nothing to reprovision).
    kinds = [(e.kind, e.detail.get("action")) for e in timeline(lab)]
    assert kinds[:4] == [("power-status", "status"), ("approved", None),
                         ("power-failed", "boot-override"),  # ipmi_sim refuses it while it runs the VM itself
                         ("power-cycle", "cycle")], kinds
    status = next(m for m in lab.status_json()["machines"] if m["mac"] == MAC)
    assert set(status["bmc"]) == {"driver", "address", "port", "username", "password"}

    started = time.monotonic()
    again = bootserver_cli(lab, "reprovision", MAC, "--now")
    assert again.returncode == 0, f"{again.stdout}{again.stderr}{report(lab)}"
    took = await until_phoned_home(lab, 2, started)
    timing("lab VM: reprovision --now (IPMI reset) to phone-home again", took)
    assert [e.kind for e in timeline(lab)].count("power-cycle") == 2

    off = bootserver_cli(lab, "power", MAC, "off")
    assert off.returncode == 0, off.stderr
    deadline = time.monotonic() + 10
    while qemu_running(lab):
        assert time.monotonic() < deadline, f"QEMU still runs 10 s after power off{report(lab)}"
        await asyncio.sleep(0.2)
    assert bootserver_cli(lab, "power", MAC, "status").stdout.strip() == f"{MAC}: power is off"


async def test_reprovision_now_sends_a_vm_running_debian_through_the_flow_again(lab: Lab, agent_image: AgentImage,
                                                                                 os_image, timing):
    """Powered off; deploy --now installs Debian and the lab's demo service to `running`; reprovision --now resets
    the running machine through its BMC, and it netboots into the flow again: nobody touches QEMU."""
    lab.write_config(agent_image.kernel.parent, machines=1, os_image=os_image.tarball)
    lab.start_server()
    lab.start_vm(1, powered=False)
    started = time.monotonic()
    deployed = bootserver_cli(lab, "deploy", MAC, "--now")
    assert deployed.returncode == 0, f"{deployed.stdout}{deployed.stderr}{report(lab)}"
    deadline = time.monotonic() + 300
    while (state := machine(lab).get("state")) != "running":
        assert state not in ("failed", "interrupted") and time.monotonic() < deadline, f"{state}{report(lab)}"
        await asyncio.sleep(1)
    timing("lab VM powered off: deploy --now over IPMI to running Debian (BIOS, VDE)", time.monotonic() - started)

    started = time.monotonic()
    again = bootserver_cli(lab, "reprovision", MAC, "--now")
    assert again.returncode == 0, f"{again.stdout}{again.stderr}{report(lab)}"
    took = await until_phoned_home(lab, 2, started)
    timing("lab VM running Debian: reprovision --now (IPMI reset) to phone-home again", took)
    kinds = [e.kind for e in timeline(lab)]
    assert kinds.count("power-cycle") == 2 and "reboot-sent" not in kinds, "reset by its BMC, not over SSH"
