"""Every setting is documented: each key the config accepts appears in the README, and each [server] and [dhcp]
key in etc/bootserver.toml too (as Datasette checks its settings against its docs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bootserver

ROOT = Path(bootserver.__file__).resolve().parent.parent


def accepted_keys() -> dict[str, set[str]]:
    """The keys of each `only_keys(raw, {...}, where)` call in the package, by the function that makes it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "bootserver").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
                if getattr(call.func, "id", None) == "only_keys" and isinstance(call.args[1], ast.Set):
                    keys = {e.value for e in call.args[1].elts if isinstance(e, ast.Constant)}
                    found.setdefault(function.name, set()).update(keys)
    return found


def documented(text: str, key: str) -> bool:
    return re.search(rf"(^|[\s`\[.\"{{]){re.escape(key)}(\s*=|`|\]|\.)", text, re.M) is not None


def test_the_config_reader_is_found():
    keys = accepted_keys()
    assert {"enroll", "http", "api_token"} <= keys["_server"] and "mode" in keys["_dhcp"]


def test_every_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = sorted(f"{where}: {key}" for where, keys in accepted_keys().items() for key in keys
                     if not documented(readme, key))
    assert missing == []


def test_every_server_and_dhcp_key_is_in_the_packaged_config():
    packaged = (ROOT / "etc" / "bootserver.toml").read_text()
    keys = accepted_keys()
    missing = sorted(k for k in keys["_server"] | keys["_dhcp"] if not documented(packaged, k))
    assert missing == []
