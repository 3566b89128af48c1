"""[profiles.NAME.files]: per-machine files for installers (a preseed, a kickstart, cloud-init's NoCloud
meta-data and user-data, an Ignition config), each a jinja2 template rendered for the machine that fetches it.

    [profiles.debian-installer.files]
    "preseed.cfg" = "installer/preseed.cfg.j2"        # relative to data_dir, as deploy sources are
    "late.sh" = "installer/late.sh.j2"

A name is what the installer asks for (/boot/{mac}/files/{name}), so it holds only letters, digits, '-', '_'
and '.', never a '/' or a leading '.'. Each template must exist and parse when the config loads; a
`file_url('NAME')` call in the profile's command line or in one of its files must name one of them. Who may
fetch one is `bootserver.installer`'s rule.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2 import nodes

from ..errors import ConfigError
from .check import Table, name, string


def files_from_toml(raw: Table, where: str, data_dir: Path) -> dict[str, Path]:
    """Each file's name and its template, relative paths under `data_dir`; `where` names the table in errors."""
    files = {}
    for key in raw:
        name(key, f"{where} {key!r}")
        path = Path(string(raw, key, where, nonempty=True)).expanduser()
        files[key] = path if path.is_absolute() else data_dir / path
        _parse(read_template(files[key], f"{where} {key}"), f"{where} {key}: {files[key]}")
    for key, path in files.items():
        check_file_urls(path.read_text(), set(files), f"{where} {key}: {path}")
    return files


def read_template(path: Path, where: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} does not exist (relative paths are under data_dir)") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: {path} is a directory, not a template file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text, so not a jinja2 template") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None


def check_file_urls(source: str, names: set[str], where: str) -> None:
    """Every `file_url('NAME')` in the template `source` names one of the profile's files: a typo is an error at
    load, not a 404 the installer meets halfway through."""
    for call in _parse(source, where).find_all(nodes.Call):
        if not (isinstance(call.node, nodes.Name) and call.node.name == "file_url"):
            continue
        if len(call.args) != 1 or not isinstance(call.args[0], nodes.Const) or call.kwargs:
            raise ConfigError(f"{where}: file_url takes one file name in quotes, as in file_url('preseed.cfg')")
        wanted = call.args[0].value
        if wanted not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ConfigError(f"{where}: file_url({wanted!r}) names no file of the profile's files table "
                              f"(it has: {known})")


def _parse(source: str, where: str) -> nodes.Template:
    try:
        return jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{where}, line {exc.lineno}: {exc.message}") from None
