"""A boot lab of a test's own (bootserver/tools/lab.py: its network namespace, VDE switch, server and BMCs), and
looking at it as an operator does: `bootserver` commands inside the namespace (where the BMCs are), the server's
API over HTTP from inside the namespace (curl), its store file.

    with lab_for_test(tmp_path, bmc_driver="redfish") as lab:   # the namespace and switch; down() at the end
        lab.write_config(...); lab.start_server(); lab.start_vm(1, powered=False)
        bootserver_cli(lab, "deploy", MAC, "--now")
        await until_phoned_home(lab, 1, started)

    with lab_for_test(tmp_path) as lab:
        lab.write_config(agent_image.kernel.parent, provision=False)
        lab.start_server()
        lab.start_vm(1, firmware="uefi", native_pxe=True)
        await wait_phoned_home(lab, 1, started)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

import bootserver
from bootserver.store import Store
from bootserver.tools import labredfish
from bootserver.tools.lab import OVMF_CODE, OVMF_MS_VARS, OVMF_SECBOOT_CODE, OVMF_VARS, VM_MAC, Lab, namespaces
from support.require import require, require_root

MAC = VM_MAC.format(1)
TOOLS = {"ipmi": ("ip", "vde_switch", "vde_plug2tap", "qemu-system-x86_64", "ipmi_sim", "curl", "dnsmasq"),
         "redfish": ("ip", "vde_switch", "qemu-system-x86_64", "curl", "libvirtd", "virsh", "vde_plug", "unshare")}
FILES = {OVMF_CODE: "ovmf", OVMF_VARS: "ovmf", OVMF_SECBOOT_CODE: "ovmf", OVMF_MS_VARS: "ovmf",
         Path("/usr/lib/ipxe/ipxe.efi"): "ipxe", Path("/usr/lib/ipxe/undionly.kpxe"): "ipxe"}


@contextlib.contextmanager
def lab_for_test(tmp_path: Path, bmc_driver: str = "ipmi") -> Iterator[Lab]:
    """A lab in a namespace named for this test, its network up; everything it started stopped at the end."""
    require_root("the lab needs network namespaces and taps")
    require(*TOOLS[bmc_driver])
    missing = labredfish.missing_tools() if bmc_driver == "redfish" else []
    missing += [f"{path} ({package})" for path, package in FILES.items() if not path.is_file()]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: apt-get install them (./setup test does)")
    lab = Lab(tmp_path / "lab", namespace=f"bsp-{os.getpid()}-{tmp_path.name[-12:]}", bmc_driver=bmc_driver)
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
    return api(lab, MAC)


def timeline(lab: Lab, mac: str = MAC) -> list:
    """The machine's events, read from the lab server's store file."""
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        return store.events(mac)
    finally:
        store.close()


def served(events: list) -> list[tuple[str, str, bool]]:
    """(file, protocol, whole) of each file served, from a machine's events (its timeline)."""
    return [(e.detail["file"], e.detail["protocol"], e.detail["bytes"] == e.detail["size"]) for e in events
            if e.kind == "file-served"]


def after_last_reboot(events: list) -> list:
    """A machine's events after its last `rebooting`: how it came back from its own disk."""
    last = max(i for i, e in enumerate(events) if e.kind == "rebooting")
    return events[last + 1:]


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


async def reprovision_now_then_power_off(lab: Lab, timing, bmc: str) -> None:  # noqa: ANN001
    """`reprovision --now` of VM 1 through its BMC (`bmc`: how it resets, for the timing) back to phone-home, then
    `power off` ends its QEMU and the BMC reports it off."""
    started = time.monotonic()
    again = bootserver_cli(lab, "reprovision", MAC, "--now")
    assert again.returncode == 0, f"{again.stdout}{again.stderr}{report(lab)}"
    took = await until_phoned_home(lab, 2, started)
    timing(f"lab VM: reprovision --now ({bmc}) to phone-home again", took)
    assert [e.kind for e in timeline(lab)].count("power-cycle") == 2

    off = bootserver_cli(lab, "power", MAC, "off")
    assert off.returncode == 0, off.stderr
    deadline = time.monotonic() + 10
    while qemu_running(lab):
        assert time.monotonic() < deadline, f"QEMU still runs 10 s after power off{report(lab)}"
        await asyncio.sleep(0.2)
    assert bootserver_cli(lab, "power", MAC, "status").stdout.strip() == f"{MAC}: power is off"


async def until_state(lab: Lab, wanted: str, started: float, timeout: float = 300) -> float:
    """Seconds from `started` until the VM is `wanted`; fails at once if it failed."""
    deadline = time.monotonic() + timeout
    while (state := machine(lab).get("state")) != wanted:
        assert state not in ("failed", "interrupted") and time.monotonic() < deadline, f"{state}{report(lab)}"
        await asyncio.sleep(1)
    return time.monotonic() - started


def report(lab: Lab, index: int = 1) -> str:
    """The logs of the lab's server, VM `index`'s BMC (ipmi_sim, or libvirtd, the emulator and the vde_plug), QEMU's
    own output, VM `index`'s serial console and dnsmasq's (the proxy test's): what to attach to a failed assertion."""
    parts = []
    for name in ("server.log", f"bmc{index}.log", f"vm{index}.qemu.log", "libvirtd.log", "redfish.log",
                 f"plug{index}.log", f"libvirt/log/qemu/{lab.domain_name(index)}.log", f"vm{index}.serial.log",
                 "dnsmasq.log"):
        path = lab.dir / name
        if path.exists():
            parts.append(f"\n--- {name}:\n{path.read_text(errors='replace')[-3000:]}")
    return "".join(parts)


def api(lab: Lab, mac: str) -> dict:
    """GET /api/v1/machines/{mac} from inside the lab's namespace; {} while the machine is unknown."""
    return api_get(lab, f"/api/v1/machines/{mac}")


def api_get(lab: Lab, path: str) -> dict:
    """GET `path` of the lab server's API from inside the lab's namespace; {} when nothing usable answered."""
    result = subprocess.run(["ip", "netns", "exec", lab.namespace, "curl", "-s", "--max-time", "5",
                             f"http://{lab.address.ip}{path}"], capture_output=True, text=True)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}


async def wait_phoned_home(lab: Lab, index: int, started: float, timeout: float = 150,
                           state: str = "phoned-home") -> float:
    """Seconds from `started` until VM `index` is in `state`, read from the server's own API."""
    mac = VM_MAC.format(index)
    deadline = time.monotonic() + timeout
    # A machine passes through phoned-home in a moment on its way to provisioning: a poll can miss the state, its
    # event stays.
    while (now := api(lab, mac).get("state")) != state and not (
            state == "phoned-home" and any(e.kind == "phoned-home" for e in timeline(lab, mac))):
        if now in ("failed", "interrupted") or time.monotonic() > deadline:
            raise AssertionError(f"{mac} is {now!r}, not {state}, after {time.monotonic() - started:.0f} s"
                                 f"{report(lab, index)}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def dhcp_events(lab: Lab, mac: str) -> list[dict]:
    return [e.detail for e in timeline(lab, mac) if e.kind == "dhcp"]


def phone_home_ip(lab: Lab, mac: str) -> IPv4Address:
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        return IPv4Address(store.node(mac).ip)
    finally:
        store.close()
