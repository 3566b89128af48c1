"""[assets] and [profiles]: the files machines boot, and what each profile boots and provisions.

    [assets]                           # files by name; relative paths are under data_dir
    agent-kernel = "images/agent/vmlinuz"

    [profiles.agent]                   # what a machine boots
    kernel = "agent-kernel"
    initrd = ["agent-initrd"]
    cmdline = "console=ttyS0"
    [profiles.agent.disk]              # optional: bootserver.config.disk
    [profiles.agent.deploy]            # optional: bootserver.config.deploy
    [profiles.agent.os]                # optional: bootserver.config.system (an OS installed onto the disk)
    [profiles.agent.health]            # optional: bootserver.config.system (when the installed OS is running)
    [profiles.agent.files]             # optional: bootserver.config.files (per-machine files for installers)

A profile's sub-tables are each read by their own module; a new one is a key in `_profile`'s only_keys,
a field of Profile, and one `_subtable` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

from ..errors import ConfigError
from .check import Table, boolean, name, only_keys, sections, string, strings, subtable_where, table
from .deploy import Deployment, deployment_from_toml
from .disk import DiskLayout, layout_from_toml
from .files import check_file_urls, files_from_toml
from .system import Health, OperatingSystem, health_from_toml, os_from_toml

T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """What a machine boots: a kernel, its initrds and command line, rendered by one iPXE template."""

    name: str
    kernel: str | None = None  # asset name; None for templates that boot no kernel (local disk)
    initrd: tuple[str, ...] = ()
    cmdline: str = ""
    template: str = "linux.ipxe.j2"
    disk: DiskLayout | None = None  # partition and format this before deploying
    deploy: Deployment | None = None  # files, configs, certificates and units put on the node
    os: OperatingSystem | None = None  # installed onto the disk, which the machine then boots
    health: Health | None = None  # when the installed OS counts as running
    files: dict[str, Path] = field(default_factory=dict)  # installer files by name: jinja2 templates
    secure_boot: bool = False  # its UEFI machines boot through the signed shim and GRUB instead of iPXE
    grub_template: str | None = None  # the GRUB twin of `template` for those machines; default by kernel or none


def read_assets(raw: Table, where: str, *, data_dir: Path) -> dict[str, Path]:
    """[assets] of the document `raw`: each name's file, relative paths under data_dir."""
    body, where = table(raw, "assets", where, default={}), f"{where}: [assets]"
    assets = {}
    for key in body:
        name(key, where)
        path = Path(string(body, key, where)).expanduser()
        assets[key] = path if path.is_absolute() else data_dir / path
    return assets


def read_profiles(raw: Table, where: str, *, data_dir: Path) -> dict[str, Profile]:
    """Every [profiles.NAME] of the document `raw`, by name."""
    return {key: _profile(key, body, here, data_dir) for key, body, here in sections(raw, "profiles", where)}


def _profile(key: str, raw: Table, where: str, data_dir: Path) -> Profile:
    only_keys(raw, {"kernel", "initrd", "cmdline", "template", "disk", "deploy", "os", "health", "files",
                    "secure_boot", "grub_template"}, where)
    profile = Profile(
        name=key,
        kernel=string(raw, "kernel", where, default=None),
        initrd=_initrd(raw, "initrd", where),
        cmdline=string(raw, "cmdline", where, default=""),
        template=string(raw, "template", where, default="linux.ipxe.j2"),
        disk=_subtable(raw, "disk", where, layout_from_toml),
        deploy=_subtable(raw, "deploy", where, partial(deployment_from_toml, data_dir=data_dir)),
        os=_subtable(raw, "os", where, os_from_toml),
        health=_subtable(raw, "health", where, health_from_toml),
        files=_subtable(raw, "files", where, partial(files_from_toml, data_dir=data_dir)) or {},
        secure_boot=boolean(raw, "secure_boot", where, default=False),
        grub_template=string(raw, "grub_template", where, default=None),
    )
    _check_system(profile, where)
    check_file_urls(profile.cmdline, set(profile.files), f"{where} cmdline")
    return profile


def _check_system(profile: Profile, where: str) -> None:
    """A rootfs goes onto a disk the profile lays out, with a root filesystem; an image is a disk of its own;
    health is the installed OS's."""
    if profile.os and profile.os.image and profile.disk:
        raise ConfigError(f"{where}: a whole-disk image brings its own partitions: remove "
                          f"[profiles.{profile.name}.disk] (or install a rootfs onto that layout instead)")
    if profile.os and profile.os.rootfs and not (profile.disk and any(p.mount == "/" for p in profile.disk.partitions)):
        raise ConfigError(f"{where}: a rootfs needs a disk to install onto: add [profiles.{profile.name}.disk] with "
                          f"a partition mounted at \"/\"")
    if profile.health and not profile.os:
        raise ConfigError(f"{where}: health checks an installed OS: add [profiles.{profile.name}.os]")


def _subtable(raw: Table, key: str, where: str, read: Callable[[Table, str], T]) -> T | None:
    """[profiles.NAME.key], read by `read`; None when the profile has none."""
    body = table(raw, key, where, default=None)
    return None if body is None else read(body, subtable_where(where, key))


def _initrd(raw: Table, key: str, where: str) -> tuple[str, ...]:
    """One asset name, or a list of them."""
    if isinstance(raw.get(key), str):
        return (raw[key],)
    return strings(raw, key, where, expected="an asset name or a list of asset names")
