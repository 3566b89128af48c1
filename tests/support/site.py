"""A bootserver for one netbooting VM on user-mode networking: the agent image as its profile's kernel and
initrd, the guest's SSH port forwarded to the host, and the server's address as the guest sees it (10.0.2.2)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from bootserver import config as configuration
from bootserver.app import http_address, init_app, running
from bootserver.tools.image import AgentImage
from support.net import free_port
from support.qemu import DEFAULT_MAC, Vm
from support.vm import wait_for_state

# Debian (`bootserver image os debian`, the asset "debian") onto a disk that boots on BIOS and UEFI.
ROOTFS_PROFILE = """
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

# A whole-disk image (the asset "golden") onto /dev/vda, made the machine node2 (vm_site(hostname="node2")):
# `digest` is a `sha256 = "..."` line, or "" for the image's .sha256 file.
IMAGE_PROFILE = """
[profiles.golden]
kernel = "agent-kernel"
initrd = ["agent-initrd"]
cmdline = "console=ttyS0"

[profiles.golden.os]
image = "golden"
device = "/dev/vda"
{digest}
[profiles.golden.health]
commands = ["systemctl is-active ssh", "test \\"$(hostname)\\" = node2",
            "test $(df -B1 --output=size / | tail -1) -gt 2500000000"]
"""


@dataclasses.dataclass
class Site:
    app: web.Application
    ssh_port: int  # the host port forwarded to the guest's port 22

    @property
    def bootfile(self) -> str:
        """The URL the VM's DHCP (slirp's) hands its iPXE ROM."""
        return f"http://10.0.2.2:{http_address(self.app)[1]}/boot.ipxe"


@contextlib.asynccontextmanager
async def vm_site(tmp_path: Path, agent_image: AgentImage, profiles: str, assets: dict[str, Path],
                  hostname: str = "node1", server: str = "boot_minutes = 8\n") -> AsyncIterator[Site]:
    """Serve `profiles` (TOML naming the assets agent-kernel, agent-initrd and those of `assets`) to every
    machine, the VM's MAC configured with `hostname` and its forwarded SSH port."""
    data = tmp_path / "data"
    (data / "images/agent").mkdir(parents=True)
    shutil.copy(agent_image.kernel, data / "images/agent/vmlinuz")
    shutil.copy(agent_image.initrd, data / "images/agent/initrd.img")
    ssh_port = free_port()
    toml = (f'[server]\nhttp = "127.0.0.1:0"\ntftp = "127.0.0.1:0"\ndata_dir = "{data}"\nworkers = 1\n{server}'
            '[assets]\nagent-kernel = "images/agent/vmlinuz"\nagent-initrd = "images/agent/initrd.img"\n'
            + "".join(f'{name} = "{path}"\n' for name, path in assets.items())
            + f'{profiles}\n'
            + f'[groups.all]\nprofile = "{_first_profile(profiles)}"\n'
            + f'[machines."{DEFAULT_MAC}"]\nhostname = "{hostname}"\n'
            + f'ssh = "127.0.0.1:{ssh_port}"\n')  # user-mode networking: the guest's port 22 is forwarded here
    (tmp_path / "site.toml").write_text(toml)
    config = configuration.load(tmp_path / "site.toml")
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, public_address="10.0.2.2"))
    app = init_app(config)
    async with running(app):
        yield Site(app, ssh_port)


def _first_profile(profiles: str) -> str:
    for line in profiles.splitlines():
        if line.startswith("[profiles.") and line.count(".") == 1:
            return line.removeprefix("[profiles.").rstrip("]")
    raise ValueError("no [profiles.NAME] table")


def empty_disk(path: Path, size: int) -> Path:
    """A sparse raw disk image of `size` bytes."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


async def install_golden(agent_image: AgentImage, tarball: Path, workdir: Path, size: int = 1 << 30) -> Path:
    """A raw disk image of `size` bytes holding an installed Debian (the rootfs path, BIOS and UEFI boot loaders),
    as a site would capture its golden machine's disk: one VM run up to `rebooting`."""
    disk = empty_disk(workdir / "golden.raw", size)
    async with (vm_site(workdir, agent_image, ROOTFS_PROFILE, {"debian": tarball}) as site,
                Vm(workdir=workdir, bootfile=site.bootfile, memory=1024, disk=disk,
                   hostfwd={site.ssh_port: 22}) as vm):
        await wait_for_state(site.app, vm, "rebooting", timeout=600, exit_ok=True)
        await vm.wait_for_exit(60)  # -no-reboot: QEMU exits as the agent reboots into the disk
    return disk
