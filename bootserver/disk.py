"""Disk setup: a declarative layout (GPT, partitions, filesystems, mounts) turned into commands.

    [profiles.raft.disk]
    device = "/dev/vda"
    wipe = false                  # true: repartition even if the disk already holds partitions
    [[profiles.raft.disk.partitions]]
    label = "boot"
    size = "512MiB"
    type = "esp"                  # esp | linux | swap
    filesystem = "vfat"           # vfat | ext4 | swap | none
    mount = "/boot"               # under the target root (/mnt)
    [[profiles.raft.disk.partitions]]
    label = "nixos"
    size = "rest"                 # the last partition may take the rest of the disk
    type = "linux"
    filesystem = "ext4"
    mount = "/"
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .tomlcheck import only_keys

# Where the disk's root filesystem is mounted on the node while we deploy onto it.
TARGET_ROOT = "/mnt"


@dataclass(frozen=True)
class Partition:
    label: str
    size: str  # "512MiB", "20GiB", or "rest"
    type: str = "linux"  # esp | linux | swap
    filesystem: str = "ext4"  # vfat | ext4 | swap | none
    mount: str | None = None  # absolute path inside the target, e.g. "/" or "/boot"


@dataclass(frozen=True)
class DiskLayout:
    device: str
    partitions: tuple[Partition, ...]
    wipe: bool = False
    table: str = "gpt"


# The GPT partition type GUID of each partition type a layout may name.
TYPE_GUIDS = {
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
}
# The filesystem a partition type gets when the layout names none, and the ones it may hold.
DEFAULT_FILESYSTEM = {"esp": "vfat", "linux": "ext4", "swap": "swap"}
ALLOWED_FILESYSTEMS = {"esp": {"vfat"}, "linux": {"ext4", "vfat", "none"}, "swap": {"swap"}}
MOUNTABLE = {"ext4", "vfat"}
# Filesystem label limits: what mkfs would otherwise silently truncate.
LABEL_MAX = {"vfat": 11, "ext4": 16, "swap": 16}
GPT_NAME_MAX = 36  # UTF-16 code units in a GPT partition entry
GPT_MAX_PARTITIONS = 128
FAT_FORBIDDEN = set('*?.,;:/\\|+=<>[]"')

_SIZE = re.compile(r"[1-9][0-9]*(MiB|GiB|TiB)")  # fullmatch: "$" would let a newline through
# A kernel block device name: partition names are derived from it (see partition_path). Names under
# /dev/disk/by-* are udev symlinks, which the agent has not got.
_DEVICE = re.compile(r"/dev/[A-Za-z][A-Za-z0-9_-]*")

_DISK_KEYS = {"device", "wipe", "table", "partitions"}
_PARTITION_KEYS = {"label", "size", "type", "filesystem", "mount"}

REFUSAL = ("refusing to repartition {device}: it holds {what} "
           "(set wipe = true in the profile or mark the machine for re-provisioning)")


# --- validation --------------------------------------------------------------------------------

def layout_from_toml(raw: dict[str, Any], where: str) -> DiskLayout:
    """Validate a decoded [profiles.NAME.disk] table; `where` names it in errors ("config: [profiles.raft.disk]")."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    only_keys(raw, _DISK_KEYS, where)
    device = _device(raw, where)
    wipe = raw.get("wipe", False)
    if not isinstance(wipe, bool):
        raise ConfigError(f"{where} wipe: expected true or false, got {wipe!r}")
    table = raw.get("table", "gpt")
    if table != "gpt":
        raise ConfigError(f"{where} table: only \"gpt\" is supported, not {table!r}")
    entries = raw.get("partitions")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where} partitions: expected at least one [[partitions]] table")
    if len(entries) > GPT_MAX_PARTITIONS:
        raise ConfigError(f"{where} partitions: GPT holds at most {GPT_MAX_PARTITIONS}, not {len(entries)}")
    partitions = tuple(
        _partition(entry, f"{where} partitions[{i}]", last=i == len(entries) - 1) for i, entry in enumerate(entries)
    )
    _check_unique_labels(partitions, where)
    _check_mounts(partitions, where)
    return DiskLayout(device=device, partitions=partitions, wipe=wipe, table=table)


def _device(raw: dict[str, Any], where: str) -> str:
    device = raw.get("device")
    if not isinstance(device, str):
        raise ConfigError(f"{where} device: expected the disk's path, e.g. \"/dev/vda\", got {device!r}")
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"{where} device: {device!r} is not a kernel disk name under /dev "
                          f"(e.g. /dev/vda, /dev/sda, /dev/nvme0n1)")
    return device


def _partition(raw: Any, where: str, *, last: bool) -> Partition:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    only_keys(raw, _PARTITION_KEYS, where)
    ptype = _choice(raw, "type", where, "linux", TYPE_GUIDS)
    filesystem = _choice(raw, "filesystem", where, DEFAULT_FILESYSTEM[ptype], {"vfat", "ext4", "swap", "none"})
    if filesystem not in ALLOWED_FILESYSTEMS[ptype]:
        allowed = " or ".join(sorted(ALLOWED_FILESYSTEMS[ptype]))
        raise ConfigError(f"{where}.filesystem: a partition of type {ptype!r} holds {allowed}, not {filesystem!r}")
    label = _label(raw, where, filesystem)
    size = _size(raw, where, last=last)
    mount = raw.get("mount")
    if mount is not None:
        mount = _mount(mount, f"{where}.mount", filesystem)
    return Partition(label=label, size=size, type=ptype, filesystem=filesystem, mount=mount)


def _choice(raw: dict[str, Any], key: str, where: str, default: str, allowed: Any) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(sorted(allowed))}")
    return value


def _label(raw: dict[str, Any], where: str, filesystem: str) -> str:
    label = raw.get("label")
    if not isinstance(label, str) or not label:
        raise ConfigError(f"{where}.label: every partition needs a label (its GPT name and filesystem label)")
    # Printable ASCII keeps the label safe in the sfdisk script (name="...") and in LABEL= lookups.
    if not all(" " <= c <= "~" for c in label) or set(label) & {'"', "'", "\\"} or label.strip() != label:
        raise ConfigError(f"{where}.label: {label!r} may hold only printable ASCII, without quotes, "
                          f"backslashes or leading and trailing spaces")
    if len(label) > GPT_NAME_MAX:
        raise ConfigError(f"{where}.label: {label!r} is longer than a GPT name's {GPT_NAME_MAX} characters")
    limit = LABEL_MAX.get(filesystem)
    if limit and len(label) > limit:
        raise ConfigError(f"{where}.label: {label!r} is longer than a {filesystem} label's {limit} characters")
    if filesystem == "vfat" and set(label) & FAT_FORBIDDEN:
        raise ConfigError(f"{where}.label: {label!r}: FAT labels may not hold any of {''.join(sorted(FAT_FORBIDDEN))}")
    return label


def _size(raw: dict[str, Any], where: str, *, last: bool) -> str:
    size = raw.get("size")
    if size == "rest":
        if not last:
            raise ConfigError(f"{where}.size: only the last partition may take the \"rest\" of the disk")
        return size
    if not isinstance(size, str) or not _SIZE.fullmatch(size):
        raise ConfigError(f"{where}.size: {size!r} is not a size like \"512MiB\", \"20GiB\", \"1TiB\" or \"rest\"")
    return size


def _mount(mount: Any, where: str, filesystem: str) -> str:
    if filesystem not in MOUNTABLE:
        raise ConfigError(f"{where}: a {filesystem!r} partition is not mounted; remove the mount")
    if not isinstance(mount, str) or not mount.startswith("/"):
        raise ConfigError(f"{where}: {mount!r} is not an absolute path like \"/\" or \"/boot\"")
    if posixpath.normpath(mount) != mount or mount.startswith("//"):
        raise ConfigError(f"{where}: {mount!r} is not a plain path (no '..', '.', '//' or trailing '/')")
    return mount


def _check_unique_labels(partitions: tuple[Partition, ...], where: str) -> None:
    seen: dict[str, int] = {}
    for i, partition in enumerate(partitions):
        if partition.label in seen:
            raise ConfigError(f"{where} partitions[{i}].label: {partition.label!r} is already the label of "
                              f"partitions[{seen[partition.label]}]")
        seen[partition.label] = i


def _check_mounts(partitions: tuple[Partition, ...], where: str) -> None:
    seen: dict[str, int] = {}
    for i, partition in enumerate(partitions):
        if partition.mount is None:
            continue
        if partition.mount in seen:
            raise ConfigError(f"{where} partitions[{i}].mount: {partition.mount!r} is already where "
                              f"partitions[{seen[partition.mount]}] is mounted")
        seen[partition.mount] = i
    if seen and "/" not in seen:
        raise ConfigError(f"{where} partitions: one partition must be mounted at \"/\" when any is mounted "
                          f"(the others are mounted inside it)")


# --- commands ----------------------------------------------------------------------------------

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
    commands = [_guard(layout.device, wipe)]
    if wipe:
        commands.append(_release(layout.device))
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


def _guard(device: str, wipe: bool) -> str:
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


def _release(device: str) -> str:
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
