"""Config files for tests that start a server: the [server] section every one of them needs, written once.

    path.write_text(server_section(data, http=f"127.0.0.1:{port}", enroll="known") + SITE)

Values are Python values (str, int, bool, Path, lists of them) rendered as TOML, so that a test states only
what it is about.
"""

from __future__ import annotations

import json
from pathlib import Path

Value = str | int | bool | Path | list


def toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: the same escapes as JSON's


def section(name: str, **settings: Value) -> str:
    """`[name]` and one `key = value` line for each setting, in order."""
    return f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items())


def server_section(data_dir: Path, http: str = "127.0.0.1:0", tftp: str = "off", workers: int = 1,
                   **settings: Value) -> str:
    """A [server] section on `data_dir`: HTTP on a port of 127.0.0.1 (the system's choice unless given), TFTP off
    unless given, one process unless `workers` says more (test_workers.py), and any other [server] `settings`."""
    return section("server", http=http, tftp=tftp, data_dir=data_dir, workers=workers, **settings)


def hostname_site(data_dir: Path, mac: str, hostname: str, extra: str = "", **server: Value) -> str:
    """A config whose one profile's command line says the machine's hostname (`hostname=...` in its script), for
    tests that watch a change reach the scripts; `server`: server_section's settings, `extra`: more of the
    machine's table. Its kernel is data_dir/images/vmlinuz."""
    return (server_section(data_dir, **server) + '[assets]\nkernel = "images/vmlinuz"\n'
            '[profiles.p]\nkernel = "kernel"\ncmdline = "hostname={{ hostname }}"\n[groups.all]\nprofile = "p"\n'
            f'[machines."{mac}"]\nhostname = "{hostname}"\n{extra}')
