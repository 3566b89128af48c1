"""A QEMU VM that runs this machine's own programs: the host's root file system shared read-only over 9p, so the
guest runs the very Python, virtualenv and checkout the tests run, with virtio disks of its own for what it writes.

What it is for: a power cut. `kill -9` of QEMU loses everything the guest kernel held in memory and had not yet
written to its disks (its page cache, dirty file data, an uncommitted ext4 journal), as cutting a machine's power
does. What QEMU had already written to its image files survives in the host's files, so a disk's own volatile
write cache is not part of the model: a flush the guest asked for reached the host (QEMU's default cache mode
passes flushes to fdatasync), which is what a disk that honours flushes gives.

The guest is the agent image's kernel and initramfs (its busybox, NIC, disk and ext4 modules) with a second
archive appended (the kernel unpacks both, the later one winning): the 9p modules and an /init that mounts the
host's root at /newroot, proc/sys/dev and a tmpfs /run inside it, each disk /dev/vdX at /run/vdX, configures
QEMU's user-mode network statically (10.0.2.15, gateway 10.0.2.2) and runs, chrooted, the shell script named by
`hostroot.run=PATH` on the kernel command line (a host path: the test writes it).

    kernel, initrd = hostroot_image(tmp_path)
    Vm(workdir=..., kernel=kernel, initrd=initrd, append=hostroot_append(script), memory=768,
       extra_args=[*share_host_root(), *virtio_disk(image)], hostfwd={port: 8080})
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import libarchive
from libarchive.entry import FileType

from bootserver.tools import apt
from bootserver.tools.contents import module_closure, modules_root, plain, read_module
from bootserver.tools.image import default_cache_dir

from .agent_image import agent_image_dir, build_test_agent_image

MODULES = ("9p", "9pnet_virtio")
TAG = "hostroot"

INIT = """#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
kver=$(uname -r)
for module in $(cat /etc/bootserver/modules); do insmod "/lib/modules/$kver/$module" 2>/dev/null; done
for module in $(cat /hostroot/modules); do insmod "/hostroot/$module" 2>/dev/null; done
hostname hostroot  # the server names its replica after the host
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose TAG /newroot || echo "hostroot: no 9p root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
for disk in /sys/block/vd*; do
    name=${disk##*/}
    mkdir -p "/newroot/run/$name"
    mount -t ext4 "/dev/$name" "/newroot/run/$name" && echo "hostroot: /dev/$name at /run/$name"
done
script=$(sed -n 's/.*hostroot\\.run=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
echo "hostroot: running $script"
chroot /newroot /bin/sh "$script" &
wait
echo "hostroot: $script ended"
while :; do sleep 3600; done
""".replace("TAG", TAG)


def hostroot_image(workdir: Path) -> tuple[Path, Path]:
    """The kernel and the initramfs (the agent's plus ours, concatenated), built into workdir."""
    agent = build_test_agent_image()
    extra = workdir / "hostroot.cpio.gz"
    modules_dir = agent_image_dir() / "hostroot-modules"
    if not (modules_dir / "modules").is_file():
        _extract_modules(agent.version, modules_dir)
    with libarchive.file_writer(str(extra), "cpio_newc", "gzip") as archive:
        attrs = {"uid": 0, "gid": 0, "mtime": 0}
        archive.add_file_from_memory("hostroot", 0, b"", filetype=FileType.DIRECTORY, permission=0o755, **attrs)
        for path in sorted(modules_dir.iterdir()):
            data = path.read_bytes()
            archive.add_file_from_memory(f"hostroot/{path.name}", len(data), data, permission=0o644, **attrs)
        init = INIT.encode()
        archive.add_file_from_memory("init", len(init), init, permission=0o755, **attrs)
    initrd = workdir / "hostroot-initrd.img"
    initrd.write_bytes(agent.initrd.read_bytes() + extra.read_bytes())
    return agent.kernel, initrd


def _extract_modules(version: str, dest: Path) -> None:
    """The 9p modules and what they need beyond the agent's, flat in dest with `modules` (their load order)."""
    debs = apt.fetch_debs([f"linux-image-{version}"], default_cache_dir() / "debs", lambda _: None)
    work = dest.with_name("hostroot-kernel")
    subprocess.run(["rm", "-rf", str(work)], check=True)
    subprocess.run(["dpkg", "-x", str(debs[0]), str(work)], check=True)
    dest.mkdir(parents=True, exist_ok=True)
    order = []
    for module in module_closure(work, version, MODULES):
        name = Path(plain(module)).name
        (dest / name).write_bytes(read_module(modules_root(work) / version / module))
        order.append(name)
    (dest / "modules").write_text("".join(f"{name}\n" for name in order))
    subprocess.run(["rm", "-rf", str(work)], check=True)


def hostroot_append(script: Path) -> str:
    return f"console=ttyS0 panic=-1 hostroot.run={script}"


def share_host_root() -> list[str]:
    """QEMU's arguments for the host's / as the 9p share the guest's /init mounts (read-only)."""
    return ["-virtfs", f"local,path=/,mount_tag={TAG},security_model=none,readonly=on"]


def virtio_disk(image: Path, name: str) -> list[str]:
    return ["-drive", f"file={image},if=none,id={name},format=raw", "-device", f"virtio-blk-pci,drive={name}"]
