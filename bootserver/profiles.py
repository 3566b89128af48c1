"""What a profile asks provisioning to do, and its TOML: a disk layout and a deployment.

These are configuration: parsed and checked when the config loads (sources must exist, paths stay inside
the target), so a mistake is reported at start-up. Carrying them out is `bootserver.provision`'s work.

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

    [profiles.raft.deploy]
    check = "test -x /usr/local/bin/raftd"            # optional, run after everything (inside the target)
    [[profiles.raft.deploy.files]]
    source = "files/raftd"                            # relative to data_dir
    dest = "/usr/local/bin/raftd"
    mode = "0755"
    [[profiles.raft.deploy.templates]]
    source = "templates/raft.toml.j2"                 # jinja2, relative to data_dir
    dest = "/etc/raft/raft.toml"
    mode = "0644"
    [profiles.raft.deploy.tls]
    dir = "/etc/raft/tls"                             # node.key (0600, made on the node), node.crt, ca.crt
    [[profiles.raft.deploy.units]]
    source = "units/raftd.service"                    # relative to data_dir
    enable = true
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tomlcheck import only_keys, table

# Unit file names a deployment may install (the file is installed under its own name).
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".target", ".path", ".mount")


# --- disk layout ---------------------------------------------------------------------------------

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
# A kernel block device name: partition names are derived from it (see provision.disk.partition_path). Names under
# /dev/disk/by-* are udev symlinks, which the agent has not got.
_DEVICE = re.compile(r"/dev/[A-Za-z][A-Za-z0-9_-]*")

_DISK_KEYS = {"device", "wipe", "table", "partitions"}
_PARTITION_KEYS = {"label", "size", "type", "filesystem", "mount"}

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


# --- deployment ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployFile:
    source: Path  # absolute, on the server
    dest: str  # absolute path inside the target root
    mode: int = 0o644


@dataclass(frozen=True)
class Unit:
    source: Path  # absolute, on the server; installed as /etc/systemd/system/<name>
    enable: bool = True


@dataclass(frozen=True)
class Deployment:
    files: tuple[DeployFile, ...] = ()
    templates: tuple[DeployFile, ...] = ()
    tls_dir: str | None = None
    units: tuple[Unit, ...] = ()
    check: str | None = None


def deployment_from_toml(raw: dict[str, Any], where: str, data_dir: Path) -> Deployment:
    """Validate a `[profiles.X.deploy]` table. Sources are resolved under data_dir and must exist now,
    so a typo is reported at start-up rather than halfway through provisioning a machine."""
    only_keys(raw, {"check", "files", "templates", "tls", "units"}, where)
    check = raw.get("check")
    if check is not None and (not isinstance(check, str) or not check.strip()):
        raise ConfigError(f"{where} check: expected a shell command as a non-empty string, got {check!r}")
    return Deployment(
        files=tuple(_file(item, f"{where} files[{i}]", data_dir) for i, item in enumerate(_list(raw, "files", where))),
        templates=tuple(_file(item, f"{where} templates[{i}]", data_dir)
                        for i, item in enumerate(_list(raw, "templates", where))),
        tls_dir=_tls_dir(raw.get("tls"), f"{where} tls"),
        units=tuple(_unit(item, f"{where} units[{i}]", data_dir) for i, item in enumerate(_list(raw, "units", where))),
        check=check,
    )


def _file(raw: Any, where: str, data_dir: Path) -> DeployFile:
    raw = table(raw, where)
    only_keys(raw, {"source", "dest", "mode"}, where)
    return DeployFile(
        source=_source(raw, where, data_dir),
        dest=_absolute(_required_str(raw, "dest", where), f"{where} dest"),
        mode=_mode(raw.get("mode", "0644"), f"{where} mode"),
    )


def _unit(raw: Any, where: str, data_dir: Path) -> Unit:
    raw = table(raw, where)
    only_keys(raw, {"source", "enable"}, where)
    source = _source(raw, where, data_dir)
    if not source.name.endswith(UNIT_SUFFIXES):
        raise ConfigError(f"{where} source: {source.name!r} is not a systemd unit name; it must end in "
                          f"{', '.join(UNIT_SUFFIXES)} (the file is installed under that name)")
    enable = raw.get("enable", True)
    if not isinstance(enable, bool):
        raise ConfigError(f"{where} enable: expected true or false, got {enable!r}")
    return Unit(source, enable)


def _tls_dir(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    raw = table(raw, where)
    only_keys(raw, {"dir"}, where)
    return _absolute(_required_str(raw, "dir", where), f"{where} dir")


def _source(raw: dict[str, Any], where: str, data_dir: Path) -> Path:
    path = Path(_required_str(raw, "source", where)).expanduser()
    path = path if path.is_absolute() else data_dir / path
    if not path.is_file():
        raise ConfigError(f"{where} source: {path} does not exist or is not a file")
    return path


def _absolute(path: str, where: str) -> str:
    # ".." would climb out of the target root (/mnt) onto the node's own root filesystem.
    if not path.startswith("/") or ".." in path.split("/"):
        raise ConfigError(f"{where}: {path!r} must be an absolute path without '..' components")
    return posixpath.normpath(path)


def _mode(value: Any, where: str) -> int:
    # An integer is refused: TOML reads `mode = 755` as decimal 755, which is not 0o755.
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise ConfigError(f"{where}: expected an octal mode as a string, like \"0755\", got {value!r}")
    return int(value, 8)


def _required_str(raw: dict[str, Any], key: str, where: str) -> str:
    if key not in raw:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} {key}: expected a non-empty string, got {value!r}")
    return value


def _list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where} {key}: expected an array of tables ([[...{key}]])")
    return value
