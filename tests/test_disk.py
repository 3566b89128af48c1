"""Disk layouts: every refusal names its key, the commands as printed, and the commands run on a real
loop device (as root: CI runs there too, so this fails rather than skips when it cannot)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bootserver.config.disk import TYPE_GUIDS, Partition, layout_from_toml
from bootserver.errors import ConfigError
from bootserver.provision import disk

WHERE = "config: [profiles.raft.disk]"

EXAMPLE: dict[str, Any] = {
    "device": "/dev/vda",
    "partitions": [
        {"label": "boot", "size": "512MiB", "type": "esp", "filesystem": "vfat", "mount": "/boot"},
        {"label": "nixos", "size": "rest", "type": "linux", "filesystem": "ext4", "mount": "/"},
    ],
}

GOLDEN = """\
if ! [ -b /dev/vda ]; then echo 'refusing to partition /dev/vda: it is not a block device on this machine' >&2; exit 1; fi; if sfdisk -d /dev/vda >/dev/null 2>&1; then echo 'refusing to repartition /dev/vda: it holds partitions (set wipe = true in the profile or mark the machine for re-provisioning)' >&2; exit 1; fi; if [ -n "$(blkid /dev/vda 2>/dev/null)" ]; then echo 'refusing to repartition /dev/vda: it holds a filesystem or other data (set wipe = true in the profile or mark the machine for re-provisioning)' >&2; exit 1; fi
if sectors=$(cat "/sys/class/block/$(basename "$(readlink -f /dev/vda)")/size" 2>/dev/null); then have=$((sectors / 2048)); if [ "$have" -lt 515 ]; then echo "refusing to partition /dev/vda: the layout needs at least 515 MiB and the disk holds only $have MiB" >&2; exit 1; fi; fi
printf '%s\\n' 'label: gpt' 'size=512MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="boot"' 'type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="nixos"' | sfdisk --wipe always --wipe-partitions always /dev/vda
partprobe /dev/vda
n=0; until [ -b /dev/vda1 ] && [ -b /dev/vda2 ]; do n=$((n+1)); if [ $n -gt 10 ]; then echo 'the partitions of /dev/vda did not appear under /dev within 10 seconds (can this kernel read GPT partition tables?)' >&2; exit 1; fi; sleep 1; done
mkfs.vfat -F 32 -n boot /dev/vda1
mkfs.ext4 -F -L nixos /dev/vda2
mkdir -p /mnt && mount -t ext4 /dev/vda2 /mnt
mkdir -p /mnt/boot && mount -t vfat /dev/vda1 /mnt/boot
"""  # noqa: E501

GOLDEN_WIPE_RELEASE = (
    "grep -E '^/dev/vda[0-9]+ ' /proc/mounts | cut -d' ' -f2 | sort -r | "
    "while read -r m; do umount \"$m\" || exit 1; done && "
    "grep -E '^/dev/vda[0-9]+ ' /proc/swaps | cut -d' ' -f1 | "
    "while read -r s; do swapoff \"$s\" || exit 1; done"
)


def _with(changes: dict[str, Any], partition: int | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(EXAMPLE)
    target = raw if partition is None else raw["partitions"][partition]
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return raw


# --- validation --------------------------------------------------------------------------------

def test_example_layout():
    layout = layout_from_toml(EXAMPLE, WHERE)
    assert layout.device == "/dev/vda" and layout.wipe is False and layout.table == "gpt"
    assert layout.partitions == (
        Partition("boot", "512MiB", "esp", "vfat", "/boot"),
        Partition("nixos", "rest", "linux", "ext4", "/"),
    )


def test_filesystem_follows_the_type_when_not_given():
    raw = {"device": "/dev/sda", "wipe": True, "partitions": [
        {"label": "EFI", "size": "1GiB", "type": "esp"},
        {"label": "swap", "size": "2GiB", "type": "swap"},
        {"label": "data", "size": "1TiB"},
        {"label": "raw", "size": "rest", "filesystem": "none"},
    ]}
    layout = layout_from_toml(raw, WHERE)
    assert layout.wipe is True
    assert [(p.type, p.filesystem) for p in layout.partitions] == [
        ("esp", "vfat"), ("swap", "swap"), ("linux", "ext4"), ("linux", "none")]


@pytest.mark.parametrize(("raw", "message"), [
    ("not a table", f"{WHERE}: expected a table"),
    (_with({"colour": "red"}), f"{WHERE}: unknown key 'colour'"),
    (_with({"colour": "red"}, 1), f"{WHERE} partitions[1]: unknown key 'colour'"),
    (_with({"device": None}), f"{WHERE} device: expected the disk's path"),
    (_with({"device": "vda"}), f"{WHERE} device: 'vda' is not a kernel disk name"),
    (_with({"device": "/dev/disk/by-id/x"}), f"{WHERE} device: '/dev/disk/by-id/x'"),
    (_with({"device": "/dev/vda; reboot"}), f"{WHERE} device:"),
    (_with({"wipe": "yes"}), f"{WHERE} wipe: expected true or false"),
    (_with({"table": "msdos"}), f"{WHERE} table: only \"gpt\""),
    (_with({"partitions": []}), f"{WHERE} partitions: expected at least one"),
    (_with({"partitions": {"label": "x"}}), f"{WHERE} partitions: expected at least one"),
    (_with({"partitions": ["x"]}), f"{WHERE} partitions[0]: expected a table"),
    (_with({"label": None}, 0), f"{WHERE} partitions[0].label: every partition needs a label"),
    (_with({"label": ""}, 0), f"{WHERE} partitions[0].label: every partition needs a label"),
    (_with({"label": "nixos"}, 0), f"{WHERE} partitions[1].label: 'nixos' is already the label of partitions[0]"),
    (_with({"label": 'a"b'}, 1), f"{WHERE} partitions[1].label: 'a\"b' may hold only printable ASCII"),
    (_with({"label": "a'b"}, 1), f"{WHERE} partitions[1].label:"),
    (_with({"label": "tab\there"}, 1), f"{WHERE} partitions[1].label:"),
    (_with({"label": "n\u00e9"}, 1), f"{WHERE} partitions[1].label:"),
    (_with({"label": " root"}, 1), f"{WHERE} partitions[1].label:"),
    (_with({"label": "x" * 37, "filesystem": "none", "mount": None}, 1),
     f"{WHERE} partitions[1].label: '{'x' * 37}' is longer than a GPT name's 36"),
    (_with({"label": "x" * 17}, 1), f"{WHERE} partitions[1].label: '{'x' * 17}' is longer than a ext4 label's 16"),
    (_with({"label": "BOOTLOADERSX"}, 0), f"{WHERE} partitions[0].label: 'BOOTLOADERSX' is longer than a vfat"),
    (_with({"label": "bo.ot"}, 0), f"{WHERE} partitions[0].label: 'bo.ot': FAT labels may not hold"),
    (_with({"size": None}, 0), f"{WHERE} partitions[0].size: None is not a size"),
    (_with({"size": "512M"}, 0), f"{WHERE} partitions[0].size: '512M' is not a size like"),
    (_with({"size": "512MB"}, 0), f"{WHERE} partitions[0].size: '512MB'"),
    (_with({"size": "0MiB"}, 0), f"{WHERE} partitions[0].size: '0MiB'"),
    (_with({"size": "512MiB\n"}, 0), f"{WHERE} partitions[0].size: '512MiB\\n'"),
    (_with({"device": "/dev/vda\n"}), f"{WHERE} device: '/dev/vda\\n'"),
    (_with({"size": 512}, 0), f"{WHERE} partitions[0].size: 512"),
    (_with({"size": "rest"}, 0), f"{WHERE} partitions[0].size: only the last partition may take the \"rest\""),
    (_with({"type": "ntfs"}, 1), f"{WHERE} partitions[1].type: 'ntfs' is not one of bios, esp, linux, swap"),
    (_with({"type": ["esp"]}, 1), f"{WHERE} partitions[1].type: ['esp'] is not one of"),
    (_with({"filesystem": "btrfs"}, 1), f"{WHERE} partitions[1].filesystem: 'btrfs' is not one of"),
    (_with({"filesystem": "ext4"}, 0),
     f"{WHERE} partitions[0].filesystem: a partition of type 'esp' holds vfat, not 'ext4'"),
    (_with({"filesystem": "swap"}, 1), f"{WHERE} partitions[1].filesystem: a partition of type 'linux' holds"),
    (_with({"type": "swap", "filesystem": None}, 1), f"{WHERE} partitions[1].mount: a 'swap' partition is not mounted"),
    (_with({"filesystem": "none"}, 1), f"{WHERE} partitions[1].mount: a 'none' partition is not mounted"),
    (_with({"mount": "boot"}, 0), f"{WHERE} partitions[0].mount: 'boot' is not an absolute path"),
    (_with({"mount": 5}, 0), f"{WHERE} partitions[0].mount: 5 is not an absolute path"),
    (_with({"mount": "/boot/"}, 0), f"{WHERE} partitions[0].mount: '/boot/' is not a plain path"),
    (_with({"mount": "/boot/../etc"}, 0), f"{WHERE} partitions[0].mount: '/boot/../etc' is not a plain path"),
    (_with({"mount": "//boot"}, 0), f"{WHERE} partitions[0].mount: '//boot' is not a plain path"),
    (_with({"mount": "/"}, 0), f"{WHERE} partitions[1].mount: '/' is already where partitions[0] is mounted"),
    (_with({"mount": "/srv"}, 1), f"{WHERE} partitions: one partition must be mounted at \"/\""),
], ids=lambda v: v if isinstance(v, str) and v.startswith("config") else None)
def test_refusals_name_the_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        layout_from_toml(raw, WHERE)
    assert str(caught.value).startswith(message), str(caught.value)


def test_no_mounts_at_all_is_fine():
    raw = _with({"mount": None}, 0)
    del raw["partitions"][1]["mount"]
    commands = disk.disk_commands(layout_from_toml(raw, WHERE), wipe=False)
    assert not any("mount" in c for c in commands)


# --- commands ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("device", "number", "path"), [
    ("/dev/vda", 1, "/dev/vda1"),
    ("/dev/sdb", 12, "/dev/sdb12"),
    ("/dev/xvda", 2, "/dev/xvda2"),
    ("/dev/nvme0n1", 1, "/dev/nvme0n1p1"),
    ("/dev/mmcblk0", 3, "/dev/mmcblk0p3"),
    ("/dev/loop0", 1, "/dev/loop0p1"),
    ("/dev/md127", 2, "/dev/md127p2"),
])
def test_partition_path(device, number, path):
    assert disk.partition_path(device, number) == path


def test_partition_numbers_start_at_one():
    with pytest.raises(ValueError, match="start at 1"):
        disk.partition_path("/dev/vda", 0)


def test_golden_dry_run():
    assert disk.dry_run(layout_from_toml(EXAMPLE, WHERE), wipe=False) == GOLDEN


def test_golden_dry_run_with_wipe():
    text = disk.dry_run(layout_from_toml(EXAMPLE, WHERE), wipe=True)
    lines = text.splitlines()
    assert lines[0] == ("if ! [ -b /dev/vda ]; then echo 'refusing to partition /dev/vda: it is not a block "
                        "device on this machine' >&2; exit 1; fi")
    assert lines[1] == GOLDEN.splitlines()[1]  # the size check
    assert lines[2] == GOLDEN_WIPE_RELEASE
    assert lines[3:] == GOLDEN.splitlines()[2:]


def test_mounts_go_parents_first_under_the_target():
    raw = {"device": "/dev/nvme0n1", "partitions": [
        {"label": "efi", "size": "256MiB", "type": "esp", "mount": "/boot/efi"},
        {"label": "var", "size": "10GiB", "mount": "/var"},
        {"label": "boot", "size": "1GiB", "mount": "/boot"},
        {"label": "my root", "size": "rest", "mount": "/"},
    ]}
    commands = disk.disk_commands(layout_from_toml(raw, WHERE), wipe=False, target="/target/")
    mounts = [c for c in commands if c.startswith("mkdir")]
    assert mounts == [
        "mkdir -p /target && mount -t ext4 /dev/nvme0n1p4 /target",
        "mkdir -p /target/boot && mount -t ext4 /dev/nvme0n1p3 /target/boot",
        "mkdir -p /target/var && mount -t ext4 /dev/nvme0n1p2 /target/var",
        "mkdir -p /target/boot/efi && mount -t vfat /dev/nvme0n1p1 /target/boot/efi",
    ]
    assert "mkfs.ext4 -F -L 'my root' /dev/nvme0n1p4" in commands  # quoted for the shell
    assert "name=\"my root\"" in next(c for c in commands if "sfdisk --wipe" in c)


def test_swap_and_unformatted_partitions():
    raw = {"device": "/dev/vda", "partitions": [
        {"label": "swap", "size": "2GiB", "type": "swap"},
        {"label": "raw", "size": "1GiB", "filesystem": "none"},
    ]}
    commands = disk.disk_commands(layout_from_toml(raw, WHERE), wipe=False)
    assert "mkswap -L swap /dev/vda1" in commands
    assert not any("/dev/vda2" in c and c.startswith("mk") for c in commands)
    sfdisk = next(c for c in commands if "sfdisk --wipe" in c)
    assert "'size=2GiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=\"swap\"'" in sfdisk


def test_a_missing_device_is_refused_with_its_name(tmp_path):
    layout = layout_from_toml(_with({"device": "/dev/bootserver-test-no-such-disk"}), WHERE)
    for wipe in (False, True):
        guard = disk.disk_commands(layout, wipe=wipe)[0]
        result = subprocess.run(["sh", "-c", guard], capture_output=True, text=True)
        assert result.returncode == 1
        assert result.stderr == ("refusing to partition /dev/bootserver-test-no-such-disk: "
                                 "it is not a block device on this machine\n")


# --- for real, on a loop device ----------------------------------------------------------------

def _kernel_mounts_vfat() -> bool:
    subprocess.run(["modprobe", "-q", "vfat"], capture_output=True)  # absent or built in: no matter
    return any(line.split()[-1] == "vfat" for line in Path("/proc/filesystems").read_text().splitlines())


# Some CI kernels (Firecracker's minimal config) have no FAT driver and no modules: the ESP is then
# made and checked (blkid, fsck.vfat) but not mounted. /var stays, so a mount inside "/" is always tested.
MOUNT_VFAT = _kernel_mounts_vfat()

REAL_LAYOUT = {
    "partitions": [
        {"label": "boot", "size": "40MiB", "type": "esp", "filesystem": "vfat",
         **({"mount": "/boot"} if MOUNT_VFAT else {})},
        {"label": "swap", "size": "16MiB", "type": "swap"},
        {"label": "var", "size": "8MiB", "type": "linux", "filesystem": "ext4", "mount": "/var"},
        {"label": "nixos", "size": "rest", "type": "linux", "filesystem": "ext4", "mount": "/"},
    ],
}


def _sh(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{command}\nexited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


@pytest.fixture
def loop_device(tmp_path):
    """A 128 MiB sparse file attached as a partitionable loop device."""
    if os.geteuid() != 0:
        pytest.fail("the disk tests attach loop devices and mount filesystems: run them as root")
    if not Path("/dev/loop-control").exists():
        pytest.fail("/dev/loop-control is missing: the disk tests need loop device support (modprobe loop)")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(128 * 1024 * 1024)
    device = _sh(f"losetup --find --show --partscan {image}").stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "target"
    path.mkdir()
    yield path
    # Whatever a failed assertion left mounted under the target goes, deepest first.
    if subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0:
        subprocess.run(["umount", "-R", str(path)], check=True)


def _run_all(commands: list[str]) -> None:
    for command in commands:
        _sh(command)


def _filesystems(device: str) -> list[dict[str, str]]:
    """blkid's view of each partition, probing the devices rather than trusting blkid's cache."""
    found = []
    for n in (1, 2, 3, 4):
        out = _sh(f"blkid -p -o export {disk.partition_path(device, n)}").stdout
        found.append(dict(line.split("=", 1) for line in out.splitlines() if "=" in line))
    return found


def _mounts() -> dict[str, str]:
    return {fields[1]: fields[0] for fields in (line.split() for line in Path("/proc/mounts").read_text().splitlines())}


def _check_applied(device: str, target: Path) -> list[str]:
    """Assert the real layout is on `device` and mounted at `target`; return the filesystem UUIDs."""
    table = json.loads(_sh(f"sfdisk --json {device}").stdout)["partitiontable"]
    assert table["label"] == "gpt"
    parts = table["partitions"]
    assert [p["node"] for p in parts] == [disk.partition_path(device, n) for n in (1, 2, 3, 4)]
    assert [p["type"] for p in parts] == [TYPE_GUIDS[t] for t in ("esp", "swap", "linux", "linux")]
    assert [p["name"] for p in parts] == ["boot", "swap", "var", "nixos"]
    assert [p["size"] for p in parts[:3]] == [40 * 2048, 16 * 2048, 8 * 2048]  # 512-byte sectors
    assert parts[3]["start"] + parts[3]["size"] >= 128 * 2048 - 2048  # "rest": up to the backup GPT
    filesystems = _filesystems(device)
    assert [(f["TYPE"], f["LABEL"]) for f in filesystems] == [
        ("vfat", "boot"), ("swap", "swap"), ("ext4", "var"), ("ext4", "nixos")]
    _sh(f"fsck.vfat -n {disk.partition_path(device, 1)}")
    mounts = _mounts()
    assert mounts[str(target)] == disk.partition_path(device, 4)
    assert mounts[str(target / "var")] == disk.partition_path(device, 3)
    if MOUNT_VFAT:
        assert mounts[str(target / "boot")] == disk.partition_path(device, 1)
    return [f["UUID"] for f in filesystems]


def test_commands_on_a_real_disk(loop_device, target):
    layout = layout_from_toml({"device": loop_device, **REAL_LAYOUT}, WHERE)

    _run_all(disk.disk_commands(layout, wipe=False, target=str(target)))
    first = _check_applied(loop_device, target)
    (target / "var" / "marker").write_text("first run")
    _sh(f"umount -R {target}")

    # Without wipe, the same layout again is refused by the first command, and the disk is untouched.
    commands = disk.disk_commands(layout, wipe=False, target=str(target))
    refused = _sh(commands[0], check=False)
    assert refused.returncode == 1
    assert refused.stderr == (f"refusing to repartition {loop_device}: it holds partitions (set wipe = true in "
                              f"the profile or mark the machine for re-provisioning)\n")
    assert [f["UUID"] for f in _filesystems(loop_device)] == first

    # With wipe it is done again: the same layout, new filesystems.
    _run_all(disk.disk_commands(layout, wipe=True, target=str(target)))
    second = _check_applied(loop_device, target)
    assert set(second).isdisjoint(first)
    assert not (target / "var" / "marker").exists()

    # And again while all of it is still mounted, as after a deploy that failed half-way.
    _run_all(disk.disk_commands(layout, wipe=True, target=str(target)))
    third = _check_applied(loop_device, target)
    assert set(third).isdisjoint(second)


def test_a_filesystem_on_the_whole_disk_is_refused(loop_device, target):
    _sh(f"mkfs.ext4 -q -F -L precious {loop_device}")
    layout = layout_from_toml({"device": loop_device, **REAL_LAYOUT}, WHERE)
    refused = _sh(disk.disk_commands(layout, wipe=False, target=str(target))[0], check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"refusing to repartition {loop_device}: it holds a filesystem or other data")
    assert "LABEL=precious" in _sh(f"blkid -p -o export {loop_device}").stdout
