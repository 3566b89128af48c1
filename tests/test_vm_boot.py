"""Real firmware, real kernel: QEMU VMs netboot the agent image from a bootserver this test starts.

SeaBIOS and OVMF each run their NIC's stock iPXE ROM (Debian's ipxe-qemu). QEMU's user-mode network
hands out the bootfile and maps the guest's 10.0.2.2:PORT to our 127.0.0.1:PORT. Over HTTP the
whole boot is HTTP; over TFTP (iPXE's own tftp:// client, since user-mode networking keeps port 69
for itself) the scripts, kernel and initrd all come through our TFTP server. The test passes when
our own event log shows the script, kernel and initrd served and the booted kernel's init reporting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import time
from pathlib import Path

import pytest
from qemu import DEFAULT_MAC, OVMF, Vm

from bootserver import config as configuration
from bootserver.app import App
from bootserver.image import AgentImage

pytestmark = pytest.mark.vm


@pytest.fixture
async def app(agent_image: AgentImage, tmp_path: Path):
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install {package} (./setup test does)")
    if not OVMF.is_file():
        pytest.fail(f"{OVMF} is missing: install ovmf (./setup test does)")
    data_dir = tmp_path / "data"
    images = data_dir / "images" / "agent"
    images.mkdir(parents=True)
    shutil.copy(agent_image.kernel, images / "vmlinuz")
    shutil.copy(agent_image.initrd, images / "initrd.img")
    # Embedded defaults (every machine boots the agent), on loopback ports of our own; the guest
    # reaches us as 10.0.2.2, which TFTP needs to be told (HTTP takes it from the Host header).
    config = configuration.parse({"server": {"http": "127.0.0.1:0", "tftp": "127.0.0.1:0",
                                             "data_dir": str(data_dir)}})
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, public_address="10.0.2.2"))
    app = App.open(config)
    await app.start()
    yield app
    await app.stop()


async def wait_for_booted(app: App, vm: Vm, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (node := app.store.node(DEFAULT_MAC)) is None or node.state != "booted":
        if not vm.running:
            raise AssertionError(f"QEMU exited before the agent reported{vm.report()}{events(app)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no 'booted' within {timeout} s{vm.report()}{events(app)}")
        await __import__("asyncio").sleep(0.2)
    return vm.elapsed


def events(app: App) -> str:
    return "\n--- events:\n" + "\n".join(f"{e.kind} {e.detail}" for e in app.store.events(DEFAULT_MAC))


@pytest.mark.parametrize(("firmware", "transport"), [("bios", "http"), ("uefi", "http"),
                                                      ("bios", "tftp"), ("uefi", "tftp")])
async def test_netboot_to_init(app: App, tmp_path: Path, firmware: str, transport: str):
    port = app.http_address[1] if transport == "http" else app.tftp_address[1]
    bootfile = f"{transport}://10.0.2.2:{port}/boot.ipxe"
    async with Vm(workdir=tmp_path, firmware=firmware, bootfile=bootfile, memory=512) as vm:
        took = await wait_for_booted(app, vm, timeout=240)
    print(f"{firmware} over {transport}: QEMU start to init reporting {took:.1f} s")

    log = app.store.events(DEFAULT_MAC)
    kinds = [e.kind for e in log]
    assert kinds[0] == "script-served" and kinds[-1] == "booted", events(app)
    script = log[0].detail
    assert (script["transport"], script["profile"], script["group"]) == (transport, "agent", "default")
    platform = "efi" if firmware == "uefi" else "pcbios"
    assert app.store.node(DEFAULT_MAC).facts["platform"] == platform  # iPXE's own report
    served = {e.detail["file"]: e.detail for e in log if e.kind == "file-served"}
    for name, path in app.config.assets.items():
        assert served[name]["protocol"] == transport, events(app)
        assert served[name]["bytes"] == path.stat().st_size, events(app)
    report = log[-1].detail
    assert ipaddress.ip_address(report["ip"]) in ipaddress.ip_network("10.0.2.0/24")
    assert report["mac"] == DEFAULT_MAC
