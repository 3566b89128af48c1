"""Power-on to running, no hands, on real firmware: a QEMU VM with an empty disk netboots the agent, which
partitions the disk, installs the Debian image (`bootserver image os debian`) and its boot loader, and reboots;
the VM's firmware then boots that disk, the installed OS reports its first boot with its own token, and the
profile's health checks pass over SSH against the host key the server made for it (no trust on first use).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from support.net import free_port
from support.qemu import DEFAULT_MAC, Vm
from support.vm import events, wait_for_state

from bootserver import config as configuration
from bootserver.app import STORE, http_address, init_app, running
from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm

PROFILE = """
[profiles.cluster]
kernel = "agent-kernel"
initrd = ["agent-initrd"]
cmdline = "console=ttyS0"

[profiles.cluster.disk]
device = "/dev/vda"
[[profiles.cluster.disk.partitions]]
label = "bios"
size = "1MiB"
type = "bios"
[[profiles.cluster.disk.partitions]]
label = "esp"
size = "64MiB"
type = "esp"
mount = "/boot/efi"
[[profiles.cluster.disk.partitions]]
label = "root"
size = "rest"
mount = "/"

[profiles.cluster.os]
rootfs = "debian"

[profiles.cluster.health]
commands = ["systemctl is-active ssh", "test \\"$(hostname)\\" = node1"]
"""


@pytest.fixture
async def site(agent_image: AgentImage, os_image, tmp_path: Path):
    data = tmp_path / "data"
    (data / "images/agent").mkdir(parents=True)
    shutil.copy(agent_image.kernel, data / "images/agent/vmlinuz")
    shutil.copy(agent_image.initrd, data / "images/agent/initrd.img")
    ssh_port = free_port()
    toml = (f'[server]\nhttp = "127.0.0.1:0"\ntftp = "127.0.0.1:0"\ndata_dir = "{data}"\nboot_minutes = 8\n'
            '[assets]\nagent-kernel = "images/agent/vmlinuz"\nagent-initrd = "images/agent/initrd.img"\n'
            f'debian = "{os_image.tarball}"\n'
            f'{PROFILE}\n'
            '[groups.all]\nprofile = "cluster"\n'
            f'[machines."{DEFAULT_MAC}"]\nhostname = "node1"\n'
            f'ssh = "127.0.0.1:{ssh_port}"\n')  # user-mode networking: the guest's port 22 is forwarded here
    (tmp_path / "site.toml").write_text(toml)
    config = configuration.load(tmp_path / "site.toml")
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, public_address="10.0.2.2"))
    app = init_app(config)
    async with running(app):
        yield app, ssh_port


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
async def test_power_on_to_running_from_its_own_disk(site, tmp_path: Path, timing, firmware: str):
    app, ssh_port = site
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(3 << 30)  # an empty 3 GiB disk
    bootfile = f"http://10.0.2.2:{http_address(app)[1]}/boot.ipxe"
    async with Vm(workdir=tmp_path, firmware=firmware, bootfile=bootfile, memory=1024, disk=disk,
                  hostfwd={ssh_port: 22}, reboot=True) as vm:
        timing(f"{firmware}: power-on to rebooting", await wait_for_state(app, vm, "rebooting", timeout=600))
        timing(f"{firmware}: power-on to booted", await wait_for_state(app, vm, "booted", timeout=600))
        timing(f"{firmware}: power-on to running", await wait_for_state(app, vm, "running", timeout=300))
        serial = vm.serial_log
    kinds = [e.kind for e in app[STORE].events(DEFAULT_MAC)]
    assert "refused" not in kinds and "failed" not in kinds, events(app)
    installed = next(e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "installed")
    booted = next(e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "booted")
    assert installed["kernel"] == booted["kernel"], events(app)  # the installed kernel is the one running
    assert installed["boot_loaders"] == ["pcbios", "efi"] and installed["platform"] == (
        "efi" if firmware == "uefi" else "pcbios")
    assert booted["failed_units"] == [], events(app)
    passed = next(e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "health-passed")
    assert sorted(passed["checks"]) == sorted(['systemctl is-active ssh', 'test "$(hostname)" = node1'])
    # The serial console of the installed system: its systemd reached multi-user, its login prompt is up.
    assert "Reached target" in serial and "Multi-User System" in serial, serial[-3000:]
    assert "node1 login:" in serial, serial[-3000:]
    # The machine keeps booting its disk: its next script says so.
    assert app[STORE].node(DEFAULT_MAC).state == "running"
