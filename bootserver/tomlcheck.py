"""Checks shared by every part of the config (server, profiles, disk layouts, deployments).

Each names the key it refuses, so a typo in a TOML file is an error that says where, not a default.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table")
    return value


def only_keys(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
