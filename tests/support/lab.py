"""A lab of the test's own (bootserver/tools/lab.py: its network namespace, VDE switch, server and BMCs) for the
power tests, and looking at its VM 1 as an operator does: `bootserver` commands inside the namespace (where the
BMCs are), the server's API, its store.

    with lab_for_test(tmp_path, bmc_driver="redfish") as lab:   # the namespace and switch; down() at the end
        lab.write_config(...); lab.start_server(); lab.start_vm(1, powered=False)
        bootserver_cli(lab, "deploy", MAC, "--now")
        await until_phoned_home(lab, 1, started)
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
from pathlib import Path

import pytest

import bootserver
from bootserver.store import Store
from bootserver.tools import labredfish
from bootserver.tools.lab import VM_MAC, Lab, namespaces
from support.require import require, require_root

MAC = VM_MAC.format(1)
TOOLS = {"ipmi": ("ip", "vde_switch", "qemu-system-x86_64", "ipmi_sim", "curl"),
         "redfish": ("ip", "vde_switch", "qemu-system-x86_64", "curl", "libvirtd", "virsh", "vde_plug", "unshare")}


@contextlib.contextmanager
def lab_for_test(tmp_path: Path, bmc_driver: str = "ipmi") -> Iterator[Lab]:
    """A lab in a namespace named for this test, its network up; everything it started stopped at the end."""
    require_root("the lab needs network namespaces and taps")
    require(*TOOLS[bmc_driver])
    if bmc_driver == "redfish" and (missing := labredfish.missing_tools()):
        pytest.fail(f"missing: {', '.join(missing)}")
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


async def until_state(lab: Lab, wanted: str, started: float, timeout: float = 300) -> float:
    """Seconds from `started` until the VM is `wanted`; fails at once if it failed."""
    deadline = time.monotonic() + timeout
    while (state := machine(lab).get("state")) != wanted:
        assert state not in ("failed", "interrupted") and time.monotonic() < deadline, f"{state}{report(lab)}"
        await asyncio.sleep(1)
    return time.monotonic() - started


def report(lab: Lab) -> str:
    """The logs of the lab's server, VM 1's BMC (ipmi_sim, or libvirtd, the emulator and the vde_plug), QEMU's
    own output and VM 1's serial console: what to attach to a failed assertion."""
    parts = []
    for name in ("server.log", "bmc1.log", "vm1.qemu.log", "libvirtd.log", "redfish.log", "plug1.log",
                 f"libvirt/log/qemu/{lab.domain_name(1)}.log", "vm1.serial.log"):
        path = lab.dir / name
        if path.exists():
            parts.append(f"\n--- {name}:\n{path.read_text(errors='replace')[-3000:]}")
    return "".join(parts)
