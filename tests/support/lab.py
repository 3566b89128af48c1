"""A boot lab of a test's own (bootserver/tools/lab.py) and reading it as an operator would: the server's API over
HTTP from inside the lab's namespace (curl), and its store file. For the VM tests on a VDE switch.

    with lab_network(tmp_path) as lab:
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
import shutil
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bootserver.store import Store
from bootserver.tools.lab import OVMF_CODE, OVMF_VARS, VM_MAC, Lab, namespaces

TOOLS = {"ip": "iproute2", "vde_switch": "vde2", "vde_plug2tap": "vde2", "qemu-system-x86_64": "qemu-system-x86",
         "dnsmasq": "dnsmasq-base", "curl": "curl"}
FILES = {OVMF_CODE: "ovmf", OVMF_VARS: "ovmf", Path("/usr/lib/ipxe/ipxe.efi"): "ipxe",
         Path("/usr/lib/ipxe/undionly.kpxe"): "ipxe"}


@contextlib.contextmanager
def lab_network(tmp_path: Path) -> Iterator[Lab]:
    """A lab of the test's own (tmp_path/lab, a namespace named for the test) with its network up; torn down after,
    its namespace shown gone."""
    if os.geteuid() != 0:
        pytest.fail("the VDE lab tests need root (network namespaces, taps)")
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    missing += [f"{path} ({package})" for path, package in FILES.items() if not path.is_file()]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: apt-get install them (./setup test does)")
    lab = Lab(tmp_path / "lab", namespace=f"bst-{os.getpid()}-{tmp_path.name[-12:]}")
    try:
        lab.start_network()
        yield lab
    finally:
        lab.down()
        assert lab.namespace not in namespaces()


def api(lab: Lab, mac: str) -> dict:
    """GET /api/v1/machines/{mac} from inside the lab's namespace; {} while the machine is unknown."""
    result = subprocess.run(["ip", "netns", "exec", lab.namespace, "curl", "-s", "--max-time", "5",
                             f"http://{lab.address.ip}/api/v1/machines/{mac}"], capture_output=True, text=True)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}


async def wait_phoned_home(lab: Lab, index: int, started: float, timeout: float = 150,
                           state: str = "phoned-home") -> float:
    """Seconds from `started` until VM `index` is in `state`, read from the server's own API."""
    mac = VM_MAC.format(index)
    deadline = time.monotonic() + timeout
    while (now := api(lab, mac).get("state")) != state:
        if now in ("failed", "interrupted") or time.monotonic() > deadline:
            raise AssertionError(f"{mac} is {now!r}, not {state}, after {time.monotonic() - started:.0f} s"
                                 f"{report(lab, index)}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def report(lab: Lab, index: int) -> str:
    parts = []
    for name in ("server.log", f"vm{index}.qemu.log", f"vm{index}.serial.log", "dnsmasq.log"):
        path = lab.dir / name
        if path.exists():
            parts.append(f"\n--- {name}:\n{path.read_text(errors='replace')[-4000:]}")
    return "".join(parts)


def dhcp_events(lab: Lab, mac: str) -> list[dict]:
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        return [e.detail for e in store.events(mac) if e.kind == "dhcp"]
    finally:
        store.close()


def phone_home_ip(lab: Lab, mac: str) -> IPv4Address:
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        return IPv4Address(store.node(mac).ip)
    finally:
        store.close()
