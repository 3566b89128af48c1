"""[profiles.NAME.disk]: the disk layout a profile asks provisioning to make, and its reading.

It is configuration: read and checked when the config loads, so a mistake is reported at start-up.
Making it on a node is `bootserver.provision.disk`'s work.

    [profiles.raft.disk]
    device = "/dev/vda"
    wipe = false                  # true: repartition even if the disk already holds partitions
    [[profiles.raft.disk.partitions]]
    label = "boot"
    size = "512MiB"
    type = "esp"                  # esp | linux | swap | bios (GRUB on a BIOS machine: 1MiB, no filesystem)
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
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .check import Table, boolean, is_table, only_keys


@dataclass(frozen=True)
class Partition:
    label: str
    size: str  # "512MiB", "20GiB", or "rest"
    type: str = "linux"  # esp | linux | swap | bios
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
    "bios": "21686148-6449-6E6F-744E-656564454649",  # GRUB's core image on a BIOS machine's GPT disk
}
# The filesystem a partition type gets when the layout names none, and the ones it may hold.
DEFAULT_FILESYSTEM = {"esp": "vfat", "linux": "ext4", "swap": "swap", "bios": "none"}
ALLOWED_FILESYSTEMS = {"esp": {"vfat"}, "linux": {"ext4", "vfat", "none"}, "swap": {"swap"}, "bios": {"none"}}
MOUNTABLE = {"ext4", "vfat"}
# Filesystem label limits: what mkfs would otherwise silently truncate.
LABEL_MAX = {"vfat": 11, "ext4": 16, "swap": 16}
GPT_NAME_MAX = 36  # UTF-16 code units in a GPT partition entry
GPT_MAX_PARTITIONS = 128
FAT_FORBIDDEN = set('*?.,;:/\\|+=<>[]"')

_SIZE = re.compile(r"[1-9][0-9]*(MiB|GiB|TiB)")  # fullmatch: "$" would let a newline through
# A kernel block device name: partition names are derived from it (see provision.disk.partition_path). Names under
# /dev/disk/by-* are udev symlinks, which the agent has not got.
_DEVICE = re.compile(r"/dev/[A-Za-z][A-Za-z0-9_-]*")


def layout_from_toml(raw: Any, where: str) -> DiskLayout:
    """Validate a decoded [profiles.NAME.disk] table; `where` names it in errors ("config: [profiles.raft.disk]")."""
    raw = is_table(raw, where)
    only_keys(raw, {"device", "wipe", "table", "partitions"}, where)
    device = device_name(raw, "device", where)
    wipe = boolean(raw, "wipe", where, default=False)
    table = raw.get("table", "gpt")
    if table != "gpt":
        raise ConfigError(f"{where} table: only \"gpt\" is supported, not {table!r}")
    entries = raw.get("partitions")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where} partitions: expected at least one [[partitions]] table")
    if len(entries) > GPT_MAX_PARTITIONS:
        raise ConfigError(f"{where} partitions: GPT holds at most {GPT_MAX_PARTITIONS}, not {len(entries)}")
    partitions = tuple(_partition(entry, f"{where} partitions[{i}]", last=i == len(entries) - 1)
                       for i, entry in enumerate(entries))
    _check_unique_labels(partitions, where)
    _check_mounts(partitions, where)
    return DiskLayout(device=device, partitions=partitions, wipe=wipe, table=table)


def device_name(raw: Table, key: str, where: str) -> str:
    device = raw.get(key)
    if not isinstance(device, str):
        raise ConfigError(f"{where} {key}: expected the disk's path, e.g. \"/dev/vda\", got {device!r}")
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"{where} {key}: {device!r} is not a kernel disk name under /dev "
                          f"(e.g. /dev/vda, /dev/sda, /dev/nvme0n1)")
    return device


# A partition's checks have the shape of bootserver.config.check's, but name its keys partitions[N].key.

def _partition(entry: Any, where: str, *, last: bool) -> Partition:
    raw = is_table(entry, where)
    only_keys(raw, {"label", "size", "type", "filesystem", "mount"}, where)
    ptype = _choice(raw, "type", where, default="linux", allowed=set(TYPE_GUIDS))
    filesystem = _choice(raw, "filesystem", where, default=DEFAULT_FILESYSTEM[ptype],
                         allowed={"vfat", "ext4", "swap", "none"})
    if filesystem not in ALLOWED_FILESYSTEMS[ptype]:
        allowed = " or ".join(sorted(ALLOWED_FILESYSTEMS[ptype]))
        raise ConfigError(f"{where}.filesystem: a partition of type {ptype!r} holds {allowed}, not {filesystem!r}")
    return Partition(
        label=_label(raw, "label", where, filesystem=filesystem),
        size=_size(raw, "size", where, last=last),
        type=ptype,
        filesystem=filesystem,
        mount=_mount(raw, "mount", where, filesystem=filesystem),
    )


def _choice(raw: Table, key: str, where: str, *, default: str, allowed: set[str]) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(sorted(allowed))}")
    return value


def _label(raw: Table, key: str, where: str, *, filesystem: str) -> str:
    label = raw.get(key)
    where = f"{where}.{key}"
    if not isinstance(label, str) or not label:
        raise ConfigError(f"{where}: every partition needs a label (its GPT name and filesystem label)")
    # Printable ASCII keeps the label safe in the sfdisk script (name="...") and in LABEL= lookups.
    if not all(" " <= c <= "~" for c in label) or set(label) & {'"', "'", "\\"} or label.strip() != label:
        raise ConfigError(f"{where}: {label!r} may hold only printable ASCII, without quotes, "
                          f"backslashes or leading and trailing spaces")
    if len(label) > GPT_NAME_MAX:
        raise ConfigError(f"{where}: {label!r} is longer than a GPT name's {GPT_NAME_MAX} characters")
    limit = LABEL_MAX.get(filesystem)
    if limit and len(label) > limit:
        raise ConfigError(f"{where}: {label!r} is longer than a {filesystem} label's {limit} characters")
    if filesystem == "vfat" and set(label) & FAT_FORBIDDEN:
        raise ConfigError(f"{where}: {label!r}: FAT labels may not hold any of {''.join(sorted(FAT_FORBIDDEN))}")
    return label


def _size(raw: Table, key: str, where: str, *, last: bool) -> str:
    size = raw.get(key)
    if size == "rest":
        if not last:
            raise ConfigError(f"{where}.{key}: only the last partition may take the \"rest\" of the disk")
        return size
    if not isinstance(size, str) or not _SIZE.fullmatch(size):
        raise ConfigError(f"{where}.{key}: {size!r} is not a size like \"512MiB\", \"20GiB\", \"1TiB\" or \"rest\"")
    return size


def _mount(raw: Table, key: str, where: str, *, filesystem: str) -> str | None:
    if key not in raw:
        return None
    mount, where = raw[key], f"{where}.{key}"
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


