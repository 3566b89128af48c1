"""The Debian OS image the tests install (`bootserver image os debian`), built once into a directory that
survives runs, and reading what its tarball holds without unpacking it."""

from __future__ import annotations

import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bootserver.tools.osimage import OsImage, build_os_image, debian_recipe


def os_image_dir() -> Path:
    """$BOOTSERVER_TEST_OS_IMAGE_DIR, or ~/.cache/bootserver/test-os-image."""
    return Path(os.environ.get("BOOTSERVER_TEST_OS_IMAGE_DIR") or Path.home() / ".cache/bootserver/test-os-image")


def build_test_os_image() -> OsImage:
    """Debian bookworm from the host's mirrors: built by the first session that asks (~40 s), then
    reused for as long as its inputs (the recipe and the customize hook) are the same."""
    return build_os_image(debian_recipe("bookworm"), os_image_dir(), progress=print)


@dataclass(frozen=True)
class Member:
    type: bytes  # tarfile's: REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE, CHRTYPE...
    mode: int
    size: int
    link: str  # a symlink's or hard link's target, else ""
    data: bytes | None  # regular files under etc/, read while streaming; None elsewhere


def tar_members(tarball: Path) -> dict[str, Member]:
    """Every entry of a .tar.zst by its path without "./", decompressed by zstd in one pass."""
    members: dict[str, Member] = {}
    with subprocess.Popen(["zstd", "-dc", str(tarball)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                name = info.name.removeprefix("./").rstrip("/")
                data = None
                if info.isreg() and name.startswith("etc/") and info.size < 1_000_000:
                    data = tar.extractfile(info).read()
                members[name] = Member(info.type, info.mode, info.size, info.linkname, data)
    assert proc.returncode == 0, f"zstd -dc {tarball} failed"
    return members
