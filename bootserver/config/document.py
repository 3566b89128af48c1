"""The whole configuration: one TOML file, or embedded defaults when there is none.

Everything is validated at start-up; a bad key or value raises ConfigError naming it, so a typo
never becomes a machine that silently boots the wrong thing. Each table is read by its own module
(server.py, dhcp.py, profiles.py, machines.py); here they are put together and checked against each other.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .check import only_keys, table
from .dhcp import DhcpConfig, read_dhcp
from .machines import Group, Machine, check_reservations, read_groups, read_machines
from .profiles import Profile, read_assets, read_profiles
from .server import ServerConfig, read_server


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    assets: dict[str, Path]
    profiles: dict[str, Profile]
    groups: tuple[Group, ...]
    machines: dict[str, Machine]
    source: Path | None = None  # the file this came from; None for embedded defaults
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)


def load(path: Path | None) -> Config:
    """The configuration in `path`, or the embedded defaults when `path` is None."""
    if path is None:
        return parse({}, source=None)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, source=path)


def parse(raw: dict[str, Any], source: Path | None = None) -> Config:
    """Validate a decoded TOML document into a Config. Missing sections get the embedded defaults."""
    where = str(source) if source else "config"
    only_keys(raw, {"server", "assets", "profiles", "groups", "machines", "dhcp"}, where)
    server = read_server(table(raw, "server", where, default={}), f"{where}: [server]")
    assets = read_assets(raw, where, data_dir=server.data_dir)
    profiles = read_profiles(raw, where, data_dir=server.data_dir)
    groups = read_groups(raw, where)
    machines = read_machines(raw, where)
    if not profiles and not groups and not assets:
        assets, profiles, groups = _embedded_agent(server.data_dir)
    dhcp = read_dhcp(table(raw, "dhcp", where, default={}), f"{where}: [dhcp]")
    check_reservations(machines, dhcp, where)
    config = Config(server, assets, profiles, groups, machines, source, dhcp)
    _check_references(config, where)
    return config


def _embedded_agent(data_dir: Path) -> tuple[dict[str, Path], dict[str, Profile], tuple[Group, ...]]:
    """Out of the box every machine boots the agent image that `bootserver image build` makes."""
    images = data_dir / "images" / "agent"
    assets = {"agent-kernel": images / "vmlinuz", "agent-initrd": images / "initrd.img"}
    profile = Profile("agent", "agent-kernel", ("agent-initrd",), "console=tty0 console=ttyS0")
    return assets, {"agent": profile}, (Group("default", "agent"),)


def _os_assets(profile: Profile) -> list[str]:
    return [profile.os.source] if profile.os else []


def _check_references(config: Config, where: str) -> None:
    """Every asset a profile names and every profile a group names exists, and no two groups tie."""
    for profile in config.profiles.values():
        for asset in ([profile.kernel] if profile.kernel else []) + list(profile.initrd) + _os_assets(profile):
            if asset not in config.assets:
                raise ConfigError(f"{where}: [profiles.{profile.name}] names asset {asset!r}, "
                                  f"which is not in [assets]")
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for group in config.groups:
        if group.profile not in config.profiles:
            raise ConfigError(f"{where}: [groups.{group.name}] names profile {group.profile!r}, "
                              f"which is not in [profiles]")
        key = tuple(sorted(group.selector.items()))
        if key in seen:
            raise ConfigError(f"{where}: [groups.{group.name}] has the same selector as "
                              f"[groups.{seen[key]}], so neither could win")
        seen[key] = group.name
