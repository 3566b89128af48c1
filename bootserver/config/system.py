"""A profile's installed system: [profiles.NAME.os] (what goes on the disk) and [profiles.NAME.health]
(when it counts as running).

An OS comes from one of two sources. A root filesystem tarball, unpacked onto the partition of the
profile's [disk] layout mounted at "/", then made bootable by bootserver:

    [profiles.cluster.os]
    rootfs = "debian-bookworm"        # an asset: a root filesystem tarball (.tar, .tar.gz, .tar.xz, .tar.zst)
    cmdline = "console=tty0 console=ttyS0,115200"   # the installed kernel's command line (the default)

or a whole-disk image, written over the disk as it is (its partitions and boot loader are its own; the
profile has no [disk] layout):

    [profiles.golden.os]
    image = "golden"                  # an asset: .raw/.img or .qcow2, each optionally .gz, .xz or .zst
    device = "/dev/vda"               # the disk it is written to
    sha256 = "…"                      # the asset file's digest (else the file ASSET.sha256 beside it)
    grow = true                       # grow the last partition and its ext4 to the end of the disk
    root = 3                          # the partition holding "/" (default: the last one on the disk)
    wipe = false                      # true: overwrite a disk that holds partitions or data

    [profiles.cluster.health]         # all must pass in one round, within [server] running_minutes
    commands = ["systemctl is-active raftd"]        # run over SSH, the installed OS's pinned host key
    urls = ["http://{ip}:7000/peers"]               # 2xx from the node's address
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from .check import Table, boolean, only_keys, positive, string, strings
from .disk import device_name

DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200"
_SHA256 = re.compile(r"[0-9a-f]{64}")
IMAGE_ONLY = ("device", "sha256", "grow", "root", "wipe")


@dataclass(frozen=True)
class OperatingSystem:
    rootfs: str | None = None  # asset name: a root filesystem tarball
    cmdline: str = DEFAULT_CMDLINE  # rootfs: the installed kernel's command line
    image: str | None = None  # asset name: a whole-disk image
    device: str | None = None  # image: the disk written
    sha256: str | None = None  # image: its expected digest; None: read ASSET.sha256 at install time
    grow: bool = True  # image: grow the last partition and its filesystem to the disk's end
    root: int | None = None  # image: the partition number of "/"; None: the last partition on the disk
    wipe: bool = False  # image: may overwrite a disk that holds partitions or data

    @property
    def source(self) -> str:
        """The asset this OS comes from."""
        return self.rootfs or self.image or ""


@dataclass(frozen=True)
class Health:
    commands: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()


def os_from_toml(raw: Table, where: str) -> OperatingSystem:
    only_keys(raw, {"rootfs", "cmdline", "image", "device", "sha256", "grow", "root", "wipe"}, where)
    if ("rootfs" in raw) == ("image" in raw):
        raise ConfigError(f"{where}: give one source: rootfs = ASSET (a root filesystem tarball) or "
                          f"image = ASSET (a whole-disk image)")
    if "rootfs" in raw:
        extra = [key for key in IMAGE_ONLY if key in raw]
        if extra:
            raise ConfigError(f"{where} {extra[0]}: only a whole-disk image takes {extra[0]!r} (image = ASSET); "
                              f"a rootfs goes onto the [disk] layout")
        return OperatingSystem(rootfs=string(raw, "rootfs", where, nonempty=True),
                               cmdline=string(raw, "cmdline", where, default=DEFAULT_CMDLINE))
    if "cmdline" in raw:
        raise ConfigError(f"{where} cmdline: a whole-disk image boots with its own boot loader's configuration; "
                          f"remove cmdline")
    return OperatingSystem(image=string(raw, "image", where, nonempty=True),
                           device=device_name(raw, "device", where),
                           sha256=_sha256(raw, "sha256", where),
                           grow=boolean(raw, "grow", where, default=True),
                           root=positive(raw, "root", where, default=None),
                           wipe=boolean(raw, "wipe", where, default=False))


def health_from_toml(raw: Table, where: str) -> Health:
    only_keys(raw, {"commands", "urls"}, where)
    urls = strings(raw, "urls", where, expected="a list of http:// URLs", accept=_http_url)
    return Health(commands=strings(raw, "commands", where, expected="a list of shell commands",
                                   accept=lambda c: bool(c.strip())), urls=urls)


def _sha256(raw: Table, key: str, where: str) -> str | None:
    digest = string(raw, key, where, default=None)
    if digest is not None and not _SHA256.fullmatch(digest.lower()):
        raise ConfigError(f"{where} {key}: {digest!r} is not a SHA-256 digest (64 hexadecimal digits)")
    return digest.lower() if digest else None


def _http_url(url: str) -> bool:
    return url.startswith(("http://", "https://")) and len(url) > len("https://")
