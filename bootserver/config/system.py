"""A profile's installed system: [profiles.NAME.os] (what goes on the disk) and [profiles.NAME.health]
(when it counts as running).

    [profiles.cluster.os]
    rootfs = "debian-bookworm"        # an asset: a root filesystem tarball (.tar, .tar.gz, .tar.xz, .tar.zst)
    cmdline = "console=tty0 console=ttyS0,115200"   # the installed kernel's command line (the default)

    [profiles.cluster.health]         # all must pass in one round, within [server] running_minutes
    commands = ["systemctl is-active raftd"]        # run over SSH, the installed OS's pinned host key
    urls = ["http://{ip}:7000/peers"]               # 2xx from the node's address
"""

from __future__ import annotations

from dataclasses import dataclass

from .check import Table, only_keys, string, strings

DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200"


@dataclass(frozen=True)
class OperatingSystem:
    rootfs: str  # asset name
    cmdline: str = DEFAULT_CMDLINE


@dataclass(frozen=True)
class Health:
    commands: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()


def os_from_toml(raw: Table, where: str) -> OperatingSystem:
    only_keys(raw, {"rootfs", "cmdline"}, where)
    return OperatingSystem(rootfs=string(raw, "rootfs", where, nonempty=True),
                           cmdline=string(raw, "cmdline", where, default=DEFAULT_CMDLINE))


def health_from_toml(raw: Table, where: str) -> Health:
    only_keys(raw, {"commands", "urls"}, where)
    urls = strings(raw, "urls", where, expected="a list of http:// URLs", accept=_http_url)
    return Health(commands=strings(raw, "commands", where, expected="a list of shell commands",
                                   accept=lambda c: bool(c.strip())), urls=urls)


def _http_url(url: str) -> bool:
    return url.startswith(("http://", "https://")) and len(url) > len("https://")
