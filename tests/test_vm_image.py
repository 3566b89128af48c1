"""Whole-disk images onto real VMs, from power-on to `running`: a golden disk is made once by the rootfs path
(Debian with GRUB for BIOS and UEFI, on a 1 GiB disk), taken as qcow2+zstd, streamed onto a 3 GiB disk,
verified, grown, made another machine (its own hostname and host key) and booted by real firmware (OVMF).
A flipped byte (`failed` with both digests, no boot sectors left on the disk) and the other forms are shown on a
real disk by tests/test_diskimage.py, through a real sshd as the agent's."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
from pathlib import Path

import pytest
from support.qemu import DEFAULT_MAC, Vm
from support.site import IMAGE_PROFILE, empty_disk, install_golden, vm_site
from support.vm import events, wait_for_state

from bootserver.app import STORE
from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def golden(agent_image: AgentImage, os_image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw disk image holding an installed Debian, as a site would capture its golden machine's disk.

    Made by one VM's rootfs install (90 s of CI), then kept in ~/.cache/bootserver/test-golden under a key of what
    made it (the agent image, the OS image, the provisioning code and the site's profile) and made again when any
    of them changes. tests/test_vm_install.py takes that install to `running` itself, every run."""
    inputs = [agent_image.kernel.read_bytes(), agent_image.initrd.read_bytes(), os_image.sha256.encode(),
              *(p.read_bytes() for p in sorted(ROOT.glob("bootserver/provision/*.py"))),
              (ROOT / "tests/support/site.py").read_bytes()]
    key = hashlib.sha256(b"\0".join(inputs)).hexdigest()[:16]
    cached = Path.home() / ".cache/bootserver/test-golden" / f"{key}.raw"
    if not cached.is_file():
        workdir = tmp_path_factory.mktemp("golden")
        made = asyncio.run(install_golden(agent_image, os_image.tarball, workdir))
        cached.parent.mkdir(parents=True, exist_ok=True)
        for old in cached.parent.glob("*.raw"):  # one kept: each is a sparse 1 GiB file
            old.unlink()
        part = cached.with_suffix(".part")
        subprocess.run(["cp", "--sparse=always", str(made), str(part)], check=True)
        part.replace(cached)
    return cached


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


async def test_an_image_is_streamed_verified_grown_and_boots_to_running(golden, agent_image, tmp_path, timing):
    """A qcow2+zstd image on OVMF: converted, its digest from the .sha256 file beside it (as `sha256sum` writes
    it). The raw form is the same stream without the conversion: tests/test_diskimage.py writes each form to a
    real disk, so one VM to running is enough here."""
    firmware, form = "uefi", "qcow2.zst"
    qcow2 = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(golden), str(qcow2)], check=True)
    subprocess.run(["zstd", "-q", "--rm", str(qcow2)], check=True)
    image = tmp_path / "golden.qcow2.zst"
    (tmp_path / "golden.qcow2.zst.sha256").write_text(f"{sha256(image)}  golden.qcow2.zst\n")
    digest = ""
    disk = empty_disk(tmp_path / "disk.img", 3 << 30)
    async with (vm_site(tmp_path, agent_image, IMAGE_PROFILE.format(digest=digest), {"golden": image},
                        hostname="node2") as site,
                Vm(workdir=tmp_path, firmware=firmware, bootfile=site.bootfile, memory=1024, disk=disk,
                   hostfwd={site.ssh_port: 22}, reboot=True) as vm):
        timing(f"{firmware}, {form} image: power-on to rebooting",
               await wait_for_state(site.app, vm, "rebooting", timeout=600))
        timing(f"{firmware}, {form} image: power-on to booted",
               await wait_for_state(site.app, vm, "booted", timeout=600))
        timing(f"{firmware}, {form} image: power-on to running",
               await wait_for_state(site.app, vm, "running", timeout=600))
        await vm.wait_for_serial(r"node2 login:", timeout=120)  # its getty may print after the checks passed
        serial = vm.serial_log
        store = site.app[STORE]
        installed = next(e.detail for e in store.events(DEFAULT_MAC) if e.kind == "installed")
        progress = [e.detail for e in store.events(DEFAULT_MAC) if e.kind == "install-progress"]
    assert installed["source"] == image.name and installed["sha256"] == sha256(image), events(site.app)
    assert re.fullmatch(r"/dev/vda3: 0\.9 GiB -> 2\.9 GiB", installed["grown"]), installed
    assert progress[-1]["bytes"] == progress[-1]["total"] == 1 << 30, progress[-1]
    timing(f"{firmware}, {form} image: install step (stream, verify, grow, personalize)", installed["seconds"])
    assert "node2 login:" in serial, serial[-3000:]  # the image, made this machine

