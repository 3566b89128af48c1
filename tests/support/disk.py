"""Reading a powered-off VM's disk image from the host: its partition table, and files of its filesystems through
read-only loop devices (root; only the test's own image file)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest


class loop_device:
    """A read-only loop device over part of a file."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.args = ["losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                     "--sizelimit", str(size), str(path)]

    def __enter__(self) -> str:
        if not Path("/dev/loop-control").exists():
            pytest.fail("loop devices are needed to read the disk image (run the tests as root)")
        self.device = subprocess.run(self.args, capture_output=True, text=True, check=True).stdout.strip()
        return self.device

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["losetup", "-d", self.device], check=False)


def partition_table(disk: Path) -> dict[str, Any]:
    """sfdisk's view of the image: label, sector size and partitions (start and size in sectors)."""
    return json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                     check=True).stdout)["partitiontable"]


def partition(disk: Path, table: dict[str, Any], number: int) -> loop_device:
    """A loop device over partition `number` (1-based) of the image."""
    part = table["partitions"][number - 1]
    sector = table.get("sectorsize", 512)
    return loop_device(disk, part["start"] * sector, part["size"] * sector)


def blkid(device: str) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def debugfs(device: str, request: str) -> bytes:
    result = subprocess.run(["debugfs", "-R", request, device], capture_output=True, check=True)
    if b"File not found" in result.stderr:
        raise AssertionError(f"debugfs {request}: {result.stderr.decode()}")
    return result.stdout
