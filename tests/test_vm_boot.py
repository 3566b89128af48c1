"""Real firmware, real kernel: QEMU VMs netboot the agent image from a bootserver this test starts.

SeaBIOS and OVMF each run their NIC's stock iPXE ROM (Debian's ipxe-qemu). QEMU's user-mode network
hands out the bootfile and maps the guest's 10.0.2.2:PORT to our 127.0.0.1:PORT. Over HTTP (SeaBIOS) the
whole boot is HTTP; over TFTP (iPXE's own tftp:// client, since user-mode networking keeps port 69
for itself) the scripts, kernel and initrd all come through our TFTP server. The test passes when
our own event log shows the script, kernel, initrd and overlay served and the booted agent phoning
home with this boot's token.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
from pathlib import Path

import pytest
from aiohttp import web
from support.qemu import DEFAULT_MAC, OVMF_CODE, Vm
from support.vm import events, wait_for_state

from bootserver import config as configuration
from bootserver.admission import same_uuid
from bootserver.app import CONFIG, STORE, http_address, init_app, running, tftp_address
from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm
VM_UUID = "5a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"


@pytest.fixture
async def app(agent_image: AgentImage, tmp_path: Path):
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install {package} (./setup test does)")
    if not OVMF_CODE.is_file():
        pytest.fail(f"{OVMF_CODE} is missing: install ovmf (./setup test does)")
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
    app = init_app(config)
    async with running(app):
        yield app


# OVMF with its ROM over HTTP boots to `running` in tests/test_vm_vde.py's mixed rack (on our DHCP): not again here.
@pytest.mark.parametrize(("firmware", "transport"), [("bios", "http"), ("bios", "tftp"), ("uefi", "tftp")])
async def test_netboot_to_init(app: web.Application, tmp_path: Path, firmware: str, transport: str, timing):
    port = http_address(app)[1] if transport == "http" else tftp_address(app)[1]
    bootfile = f"{transport}://10.0.2.2:{port}/boot.ipxe"
    async with Vm(workdir=tmp_path, firmware=firmware, bootfile=bootfile, memory=512, uuid=VM_UUID) as vm:
        took = await wait_for_state(app, vm, "phoned-home", timeout=240)
    timing(f"{firmware} over {transport}: QEMU start to phone-home", took)

    log = app[STORE].events(DEFAULT_MAC)
    kinds = [e.kind for e in log]
    assert kinds[0] == "script-served" and "phoned-home" in kinds, events(app)
    script = log[0].detail
    assert (script["transport"], script["profile"], script["group"]) == (transport, "agent", "default")
    platform = "efi" if firmware == "uefi" else "pcbios"
    assert app[STORE].node(DEFAULT_MAC).facts["platform"] == platform  # iPXE's own report
    served = {e.detail["file"]: e.detail for e in log if e.kind == "file-served"}
    for name, path in app[CONFIG].assets.items():
        assert served[name]["protocol"] == transport, events(app)
        assert served[name]["bytes"] == path.stat().st_size, events(app)
    assert served["bootserver.cpio"]["protocol"] == transport  # the per-boot overlay: keys and token
    report = next(e.detail for e in log if e.kind == "phoned-home")
    # SSH goes to where the call came from (slirp: the host's loopback); the guest's own address is only recorded.
    assert report["ip"] == "127.0.0.1"
    assert ipaddress.ip_address(report["reported_ip"]) in ipaddress.ip_network("10.0.2.0/24")
    assert app[STORE].node(DEFAULT_MAC).host_key.startswith("ssh-ed25519 ")
    # The firmware's SMBIOS UUID (iPXE, with the script over HTTP) and the agent's (sysfs) are one machine's.
    assert report["uuid"] == VM_UUID, events(app)
    if transport == "http":
        assert same_uuid(app[STORE].node(DEFAULT_MAC).facts["uuid"], VM_UUID), events(app)
