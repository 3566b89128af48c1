"""Disk setup: a profile's declarative layout (GPT, partitions, filesystems, mounts; see
`bootserver.config.disk`) turned into the shell commands that make it on the node."""

from __future__ import annotations

import posixpath
import shlex

from ..config import TYPE_GUIDS, DiskLayout, Partition

# Where the disk's root filesystem is mounted on the node while we deploy onto it.
TARGET_ROOT = "/mnt"
# What the first command says about a disk that holds something, when the layout may not wipe it.
REFUSAL = ("refusing to repartition {device}: it holds {what} "
           "(set wipe = true in the profile or mark the machine for re-provisioning)")


def partition_path(device: str, number: int) -> str:
    """The kernel's name for partition `number` of `device`: a 'p' separates it from a name ending in a digit."""
    if number < 1:
        raise ValueError(f"partition numbers start at 1, not {number}")
    return f"{device}{'p' if device[-1:].isdigit() else ''}{number}"


def disk_commands(layout: DiskLayout, *, wipe: bool, target: str = TARGET_ROOT) -> list[str]:
    """Shell commands (busybox sh) that partition, format and mount `layout` under `target`, in order.

    Each is one line for `sh -c`; run them in order and stop at the first that fails. Without `wipe`
    the first refuses a disk that holds anything; with it, whatever the disk held is gone.
    """
    if not posixpath.isabs(target):
        raise ValueError(f"target {target!r} must be an absolute path")
    target = posixpath.normpath(target)
    numbered = list(enumerate(layout.partitions, start=1))
    commands = [guard(layout.device, wipe), _fits(layout)]
    if wipe:
        commands.append(release(layout.device))
    commands += [
        _sfdisk(layout),
        # sfdisk has the kernel re-read the table, which finds nothing on a kernel built without the
        # GPT parser (Firecracker's); parted's partprobe reads the table itself and adds each partition
        # (BLKPG). Busybox sh runs its own partprobe applet instead, a plain re-read: enough on Debian's
        # kernel, where GPT is built in.
        f"partprobe {shlex.quote(layout.device)}",
        _wait_for(layout.device, [partition_path(layout.device, n) for n, _ in numbered]),
    ]
    commands += [_mkfs(p, partition_path(layout.device, n)) for n, p in numbered if p.filesystem != "none"]
    # Parents before children: "/" first, then /boot before /boot/efi.
    mounted = sorted((p for p in numbered if p[1].mount), key=lambda p: (_depth(p[1].mount), p[1].mount))
    commands += [_mount_command(p, partition_path(layout.device, n), target) for n, p in mounted]
    return commands


def dry_run(layout: DiskLayout, *, wipe: bool, target: str = TARGET_ROOT) -> str:
    """The commands exactly as they would run, one a line (for --dry-run)."""
    return "".join(f"{command}\n" for command in disk_commands(layout, wipe=wipe, target=target))


def guard(device: str, wipe: bool) -> str:
    dev = shlex.quote(device)
    missing = shlex.quote(f"refusing to partition {device}: it is not a block device on this machine")
    command = f"if ! [ -b {dev} ]; then echo {missing} >&2; exit 1; fi"
    if wipe:
        return command
    partitions = shlex.quote(REFUSAL.format(device=device, what="partitions"))
    data = shlex.quote(REFUSAL.format(device=device, what="a filesystem or other data"))
    # sfdisk -d fails unless there is a partition table. blkid (util-linux or busybox) prints nothing
    # for a blank disk; it also catches a filesystem made on the whole disk, without a table.
    return (f"{command}; if sfdisk -d {dev} >/dev/null 2>&1; then echo {partitions} >&2; exit 1; fi; "
            f"if [ -n \"$(blkid {dev} 2>/dev/null)\" ]; then echo {data} >&2; exit 1; fi")


def _fits(layout: DiskLayout) -> str:
    """Refuse, before anything is written, a disk too small for the layout: the sum of its sizes, 1 MiB for
    the GPT and alignment in front, 1 MiB for the backup GPT, and at least 1 MiB for a "rest" partition.
    The size is the kernel's (sysfs, in 512-byte sectors; a /dev/disk/by-* name is followed to its disk); a
    device the kernel does not list there is left to sfdisk, which then says what is wrong with it."""
    need = 2 + sum(1 if p.size == "rest" else _mib(p.size) for p in layout.partitions)
    dev = shlex.quote(layout.device)
    message = (f"refusing to partition {layout.device}: the layout needs at least {need} MiB and the disk holds "
               f"only $have MiB")
    return (f"if sectors=$(cat \"/sys/class/block/$(basename \"$(readlink -f {dev})\")/size\" 2>/dev/null); "
            f"then have=$((sectors / 2048)); if [ \"$have\" -lt {need} ]; then echo \"{message}\" >&2; exit 1; fi; fi")


def _mib(size: str) -> int:
    units = {"MiB": 1, "GiB": 1024, "TiB": 1024 * 1024}
    return int(size[:-3]) * units[size[-3:]]


def release(device: str) -> str:
    """Unmount the disk's partitions (deepest first) and stop swapping on them: a second run after a
    failed one finds them in use, and the kernel will not drop partitions that are in use."""
    parts = shlex.quote(f"^{partition_path(device, 1)[:-1]}[0-9]+ ")
    return (f"grep -E {parts} /proc/mounts | cut -d' ' -f2 | sort -r | "
            f"while read -r m; do umount \"$m\" || exit 1; done && "
            f"grep -E {parts} /proc/swaps | cut -d' ' -f1 | "
            f"while read -r s; do swapoff \"$s\" || exit 1; done")


def _sfdisk(layout: DiskLayout) -> str:
    lines = [f"label: {layout.table}"]
    for p in layout.partitions:
        size = "" if p.size == "rest" else f"size={p.size}, "  # no size: as much as is left
        lines.append(f'{size}type={TYPE_GUIDS[p.type]}, name="{p.label}"')
    script = " ".join(shlex.quote(line) for line in lines)
    # --wipe: old table and filesystem signatures go, so blkid and mkfs never see stale ones. The
    # guard has already refused a disk holding anything unless the layout may wipe it.
    return (f"printf '%s\\n' {script} | "
            f"sfdisk --wipe always --wipe-partitions always {shlex.quote(layout.device)}")


def _wait_for(device: str, paths: list[str]) -> str:
    # devtmpfs makes the nodes as the kernel adds partitions, but give a udev system a moment.
    present = " && ".join(f"[ -b {shlex.quote(p)} ]" for p in paths)
    late = shlex.quote(f"the partitions of {device} did not appear under /dev within 10 seconds "
                       f"(can this kernel read GPT partition tables?)")
    return f"n=0; until {present}; do n=$((n+1)); if [ $n -gt 10 ]; then echo {late} >&2; exit 1; fi; sleep 1; done"


def _mkfs(partition: Partition, path: str) -> str:
    label, dev = shlex.quote(partition.label), shlex.quote(path)
    if partition.filesystem == "vfat":
        return f"mkfs.vfat -F 32 -n {label} {dev}"
    if partition.filesystem == "ext4":
        return f"mkfs.ext4 -F -L {label} {dev}"  # -F: never ask, stdin is no terminal
    return f"mkswap -L {label} {dev}"


def _mount_command(partition: Partition, path: str, target: str) -> str:
    assert partition.mount is not None
    where = shlex.quote(posixpath.normpath(posixpath.join(target, partition.mount.lstrip("/"))))
    return f"mkdir -p {where} && mount -t {partition.filesystem} {shlex.quote(path)} {where}"


def _depth(mount: str) -> int:
    return 0 if mount == "/" else mount.count("/")
