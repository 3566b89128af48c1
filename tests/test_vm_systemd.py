"""The systemd unit under a real systemd: a Debian VM (QEMU, direct kernel boot) with the wheel installed as the
README says, and systemd/bootserver.service, its sysusers file and etc/bootserver.toml installed by the README's
own commands, run at boot.

`systemd-nspawn --boot` does not work on the machines this runs on, so the system is a disk made from an mmdebstrap
rootfs (`bootserver image os debian`'s build, with the packages the README's pip install needs) and the wheel with
its dependencies put into /opt/bootserver by the guest's own Python. In the guest, tests/support/systemd_guest.py
installs and starts the unit, then reloads it with a changed config, kills it with SIGKILL and reads the journal;
it reports what it saw on a second serial port and powers off. This test judges that report.

Needs root (chroot, files owned by others), qemu-system-x86, mmdebstrap, e2fsprogs, zstd; a missing one fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support.qemu import Vm
from support.require import require, require_root
from support.wheel import ROOT, build_dists

from bootserver.tools.osimage import OS_PACKAGES, OsImage, build_os_image, debian_recipe

pytestmark = pytest.mark.vm

# What the README's pip install needs beside the OS image's packages (python3 is among them)
SERVICE_PACKAGES = ("python3-venv", "ipxe", "libarchive13", "kmod")
CAP_NET_BIND_SERVICE, CAP_NET_RAW = 10, 13
CHECK_UNIT = """[Unit]
Description=tests/test_vm_systemd.py: install and drive bootserver.service, report on ttyS1, power off
After=basic.target systemd-sysusers.service

[Service]
Type=oneshot
WorkingDirectory=/root/src
ExecStart=/usr/bin/python3 /root/src/systemd_guest.py
"""


@pytest.fixture(scope="module")
def service_os() -> OsImage:
    """Debian with the README's pip prerequisites: `bootserver image os debian`'s build, cached in
    ~/.cache/bootserver/test-systemd-os (rebuilt when its inputs change, as the other test OS image is)."""
    require_root("it builds the OS image as root and chroots into it")
    require("qemu-system-x86_64", "mkfs.ext4", "chroot")
    for tool, package in {"mmdebstrap": "mmdebstrap", "zstd": "zstd"}.items():
        if shutil.which(tool) is None:
            pytest.fail(f"missing: {tool} ({package}): apt-get install it (./setup test does)")
    recipe = dataclasses.replace(debian_recipe("bookworm"), packages=OS_PACKAGES + SERVICE_PACKAGES)
    return build_os_image(recipe, Path.home() / ".cache/bootserver/test-systemd-os", progress=print)


def readme_systemd_commands() -> str:
    """The README's systemd install commands, without the image build (it needs the network) and journalctl -f."""
    installing = (ROOT / "README.md").read_text().split("\n## Installing\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\*\*systemd\.\*\*.*?```\n(.*?)```", installing, re.S)[1]
    lines = [line for line in block.splitlines() if "image build" not in line and "journalctl" not in line]
    assert any("systemctl enable --now bootserver" in line for line in lines), block
    return "\n".join(lines) + "\n"


def make_disk(os_image: OsImage, work: Path) -> tuple[Path, Path, Path]:
    """The OS image with the wheel in /opt/bootserver, the repository's unit files, the README's commands and the
    guest's check; as an ext4 disk image. The kernel and initrd to boot it with."""
    root = work / "root"
    root.mkdir()
    subprocess.run(["tar", "-I", "zstd", "-xpf", str(os_image.tarball), "-C", str(root), "--numeric-owner"],
                   check=True)
    dists = build_dists(work / "dist")
    wheels = root / "root/wheels"  # the wheel and its dependencies as wheels: the guest has no network
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels),
                             str(dists.wheel)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("python3 -m venv /opt/bootserver",  # the README's pip install, of the wheel, offline
                    "/opt/bootserver/bin/pip install --quiet --no-index --find-links /root/wheels bootserver",
                    "ln -s /opt/bootserver/bin/bootserver /usr/local/bin/bootserver"):
        result = subprocess.run(["chroot", str(root), "sh", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    shutil.rmtree(wheels)
    src = root / "root/src"
    for name in ("systemd/bootserver.service", "systemd/bootserver.sysusers", "etc/bootserver.toml"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    (src / "install.sh").write_text(readme_systemd_commands())
    shutil.copy(ROOT / "tests/support/systemd_guest.py", src / "systemd_guest.py")
    (root / "etc/systemd/system/bootserver-check.service").write_text(CHECK_UNIT)
    (root / "etc/systemd/system/multi-user.target.wants/bootserver-check.service").symlink_to(
        "/etc/systemd/system/bootserver-check.service")
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")  # not a first boot: nothing prompts
    disk = work / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(3 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(disk)], check=True)
    kernel, initrd = sorted(root.glob("boot/vmlinuz-*"))[-1], sorted(root.glob("boot/initrd.img-*"))[-1]
    boot = work / "boot"
    boot.mkdir()
    shutil.copy(kernel, boot / "vmlinuz")
    shutil.copy(initrd, boot / "initrd.img")
    shutil.rmtree(root)
    return disk, boot / "vmlinuz", boot / "initrd.img"


async def test_the_unit_runs_reloads_restarts_and_logs_under_systemd(service_os: OsImage, tmp_path: Path,
                                                                      timing) -> None:
    started = time.monotonic()
    disk, kernel, initrd = make_disk(service_os, tmp_path)
    timing("systemd VM: the wheel and its dependencies into the OS image, as an ext4 disk", time.monotonic() - started)
    report_path = tmp_path / "report.json"
    async with Vm(workdir=tmp_path, kernel=kernel, initrd=initrd, disk=disk, memory=1024,
                  append="root=/dev/vda rw console=ttyS0 systemd.mask=systemd-networkd-wait-online.service",
                  extra_args=["-serial", f"file:{report_path}"]) as vm:
        await vm.wait_for_exit(timeout=600)
        timing("systemd VM: boot, install the unit, start, reload, kill -9 and restart, power off", vm.elapsed)
        lines = report_path.read_text().splitlines()
        assert lines, f"no report on ttyS1{vm.report()}"
    facts = json.loads(lines[-1])
    context = json.dumps(facts, indent=1)
    assert "error" not in facts, context

    first = facts["first"]
    assert first["healthz"] and first["unit"]["ActiveState"] == "active", context
    assert first["unit"]["User"] == "bootserver" and first["process"]["uid"] != "0", context
    assert int(first["process"]["cap_eff"], 16) == 1 << CAP_NET_BIND_SERVICE | 1 << CAP_NET_RAW, context
    assert listens(first["process"]["sockets"]) == {("tcp", 80), ("udp", 69)}, context
    assert facts["bootstrap"].startswith("#!ipxe\n"), context
    owners = {line.split(" ", 2)[2]: line.split(" ")[0] for line in facts["state_dir"].splitlines()}  # path: user
    assert owners.get("/var/lib/bootserver/bootserver.sqlite3") == "bootserver", context
    assert set(owners.values()) == {"bootserver"}, context  # the StateDirectory and all in it: the user's
    assert re.search(r"Overall exposure level for bootserver\.service: \d+\.\d+ OK", facts["security"]), context

    reload = facts["reload"]
    assert "local disk" not in reload["before"] and "local disk" in reload["after"], context
    assert reload["unit"] == {"MainPID": first["unit"]["MainPID"], "NRestarts": "0"}, context  # not a restart

    again = facts["restarted"]
    assert again["healthz"] and again["unit"]["ActiveState"] == "active", context
    assert again["unit"]["NRestarts"] == "1" and again["unit"]["MainPID"] != first["unit"]["MainPID"], context
    assert listens(again["process"]["sockets"]) == {("tcp", 80), ("udp", 69)}, context
    journal = facts["journal"]
    assert journal.count("serving HTTP on") == 2 and "reloaded /etc/bootserver/bootserver.toml" in journal, journal


def listens(sockets: list[str]) -> set[tuple[str, int]]:
    """(protocol, port) of `ss -Hltunp` lines."""
    return {(line.split()[0], int(line.split()[4].rsplit(":", 1)[1])) for line in sockets}
