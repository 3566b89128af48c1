"""[profiles.NAME.deploy]: what a profile puts on the node, and its reading.

Sources are resolved under data_dir and must exist when the config loads, and destinations stay inside the
target, so a mistake is reported at start-up rather than halfway through provisioning a machine. Putting
it on a node is `bootserver.provision.deploy`'s work.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError
from .check import Table, boolean, given, is_table, only_keys, string, table

T = TypeVar("T")

# Unit file names a deployment may install (the file is installed under its own name).
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".target", ".path", ".mount")


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


def deployment_from_toml(raw: Table, where: str, data_dir: Path) -> Deployment:
    """Validate a decoded [profiles.NAME.deploy] table; `where` names it in errors, relative sources are
    under `data_dir`."""
    only_keys(raw, {"check", "files", "templates", "tls", "units"}, where)
    check = raw.get("check")
    if check is not None and (not isinstance(check, str) or not check.strip()):
        raise ConfigError(f"{where} check: expected a shell command as a non-empty string, got {check!r}")
    tls = table(raw, "tls", where, default=None)
    return Deployment(
        files=_items(raw, "files", where, lambda item, here: _file(item, here, data_dir)),
        templates=_items(raw, "templates", where, lambda item, here: _file(item, here, data_dir)),
        tls_dir=None if tls is None else _tls_dir(tls, f"{where} tls"),
        units=_items(raw, "units", where, lambda item, here: _unit(item, here, data_dir)),
        check=check,
    )


def _items(raw: Table, key: str, where: str, read: Callable[[Table, str], T]) -> tuple[T, ...]:
    """Each table of the array of tables [[...key]], read by `read`; errors name it key[N]."""
    if not given(raw, key, where, default=()):
        return ()
    items = raw[key]
    if not isinstance(items, list):
        raise ConfigError(f"{where} {key}: expected an array of tables ([[...{key}]])")
    return tuple(read(is_table(item, f"{where} {key}[{i}]"), f"{where} {key}[{i}]") for i, item in enumerate(items))


def _file(raw: Table, where: str, data_dir: Path) -> DeployFile:
    only_keys(raw, {"source", "dest", "mode"}, where)
    return DeployFile(
        source=_source(raw, "source", where, data_dir=data_dir),
        dest=_absolute(raw, "dest", where),
        mode=_mode(raw, "mode", where, default=0o644),
    )


def _unit(raw: Table, where: str, data_dir: Path) -> Unit:
    only_keys(raw, {"source", "enable"}, where)
    source = _source(raw, "source", where, data_dir=data_dir)
    if not source.name.endswith(UNIT_SUFFIXES):
        raise ConfigError(f"{where} source: {source.name!r} is not a systemd unit name; it must end in "
                          f"{', '.join(UNIT_SUFFIXES)} (the file is installed under that name)")
    return Unit(source, boolean(raw, "enable", where, default=True))


def _tls_dir(raw: Table, where: str) -> str:
    only_keys(raw, {"dir"}, where)
    return _absolute(raw, "dir", where)


def _source(raw: Table, key: str, where: str, *, data_dir: Path) -> Path:
    path = Path(string(raw, key, where, nonempty=True)).expanduser()
    path = path if path.is_absolute() else data_dir / path
    if not path.is_file():
        raise ConfigError(f"{where} {key}: {path} does not exist or is not a file")
    return path


def _absolute(raw: Table, key: str, where: str) -> str:
    path = string(raw, key, where, nonempty=True)
    # ".." would climb out of the target root (/mnt) onto the node's own root filesystem.
    if not path.startswith("/") or ".." in path.split("/"):
        raise ConfigError(f"{where} {key}: {path!r} must be an absolute path without '..' components")
    return posixpath.normpath(path)


def _mode(raw: Table, key: str, where: str, *, default: int) -> int:
    if not given(raw, key, where, default):
        return default
    value: Any = raw[key]
    # An integer is refused: TOML reads `mode = 755` as decimal 755, which is not 0o755.
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise ConfigError(f"{where} {key}: expected an octal mode as a string, like \"0755\", got {value!r}")
    return int(value, 8)
