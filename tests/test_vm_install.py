"""Power-on to running, no hands, on real firmware: a QEMU VM with an empty disk netboots the agent, which
partitions the disk, installs the Debian image (`bootserver image os debian`) and its boot loader, and reboots;
the VM's firmware then boots that disk, the installed OS reports its first boot with its own token, and the
profile's health checks pass over SSH against the host key the server made for it (no trust on first use).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.qemu import DEFAULT_MAC, Vm
from support.site import ROOTFS_PROFILE, empty_disk, vm_site
from support.vm import events, wait_for_state

from bootserver.app import STORE
from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm

@pytest.fixture
async def site(agent_image: AgentImage, os_image, tmp_path: Path):
    async with vm_site(tmp_path, agent_image, ROOTFS_PROFILE, {"debian": os_image.tarball}) as site:
        yield site


async def test_power_on_to_running_from_its_own_disk(site, tmp_path: Path, timing):
    """SeaBIOS here; OVMF to running: test_vm_image (an image) and test_vm_vde (the lab, from this rootfs)."""
    firmware = "bios"
    app = site.app
    disk = empty_disk(tmp_path / "disk.img", 3 << 30)
    async with Vm(workdir=tmp_path, firmware=firmware, bootfile=site.bootfile, memory=1024, disk=disk,
                  hostfwd={site.ssh_port: 22}, reboot=True) as vm:
        timing(f"{firmware}: power-on to rebooting", await wait_for_state(app, vm, "rebooting", timeout=600))
        timing(f"{firmware}: power-on to booted", await wait_for_state(app, vm, "booted", timeout=600))
        timing(f"{firmware}: power-on to running", await wait_for_state(app, vm, "running", timeout=300))
        # Its console: getty's login prompt, waited for (it may follow the health checks). Not multi-user.target:
        # under TCG with two VMs at once it was still waiting for e2scrub_reap.service minutes after `running`.
        await vm.wait_for_serial(r"node1 login:", timeout=120)
        serial = vm.serial_log
    kinds = [e.kind for e in app[STORE].events(DEFAULT_MAC)]
    assert "refused" not in kinds and "failed" not in kinds, events(app)
    installed = next(e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "installed")
    booted = next(e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "booted")
    assert installed["kernel"] == booted["kernel"], events(app)  # the installed kernel is the one running
    assert installed["boot_loaders"] == ["pcbios", "efi"] and installed["platform"] == "pcbios"
    assert booted["failed_units"] == [], events(app)
    passed = next(e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "health-passed")
    assert sorted(passed["checks"]) == sorted(['systemctl is-active ssh', 'test "$(hostname)" = node1'])
    assert "Reached target" in serial and "Login Prompts" in serial, serial[-3000:]  # getty.target
    # The machine keeps booting its disk: its next script says so.
    assert app[STORE].node(DEFAULT_MAC).state == "running"
