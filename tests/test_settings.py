"""Every setting is documented: each key the config accepts appears in the README, and each [server] and [dhcp]
key in etc/bootserver.toml too (as Datasette checks its settings against its docs).

The keys are the loader's own: each table is given an unknown key and the refusal lists the known ones. The
probes below must reach every key set the loader's source checks (`only_keys` calls), so that a new table
cannot go undocumented by being left out of them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import bootserver
from bootserver import config as configuration
from bootserver.errors import ConfigError

ROOT = Path(bootserver.__file__).resolve().parent.parent
UNKNOWN = {"no_such_key": 1}
PROFILE = "[profiles.p]"

# Where each table is, as a document holding an unknown key in it (and only what it takes to get there).
PROBES: dict[str, dict] = {
    "top level": UNKNOWN,
    "[server]": {"server": UNKNOWN},
    "[dhcp]": {"dhcp": UNKNOWN},
    "[profiles.*]": {"profiles": {"p": UNKNOWN}},
    "[profiles.*.disk]": {"profiles": {"p": {"disk": UNKNOWN}}},
    "[[profiles.*.disk.partitions]]": {"profiles": {"p": {"disk": {"device": "/dev/vda", "partitions": [UNKNOWN]}}}},
    "[profiles.*.deploy]": {"profiles": {"p": {"deploy": UNKNOWN}}},
    "[[profiles.*.deploy.files]]": {"profiles": {"p": {"deploy": {"files": [UNKNOWN]}}}},
    "[[profiles.*.deploy.templates]]": {"profiles": {"p": {"deploy": {"templates": [UNKNOWN]}}}},
    "[[profiles.*.deploy.units]]": {"profiles": {"p": {"deploy": {"units": [UNKNOWN]}}}},
    "[profiles.*.deploy.tls]": {"profiles": {"p": {"deploy": {"tls": UNKNOWN}}}},
    "[profiles.*.os]": {"profiles": {"p": {"os": UNKNOWN}}},
    "[profiles.*.health]": {"profiles": {"p": {"health": UNKNOWN}}},
    "[groups.*]": {"groups": {"g": UNKNOWN}},
    "[machines.*]": {"machines": {"52:54:00:00:00:01": UNKNOWN}},
    "[machines.*.bmc]": {"machines": {"52:54:00:00:00:01": {"bmc": UNKNOWN}}},
}


def known_keys(document: dict) -> set[str]:
    """The keys the loader names as known when it refuses the unknown one in `document`."""
    with pytest.raises(ConfigError, match="unknown key 'no_such_key'") as refusal:
        configuration.parse(document)
    return set(re.search(r"\(known: ([^)]*)\)", str(refusal.value))[1].split(", "))


def accepted_keys() -> dict[str, set[str]]:
    return {table: known_keys(document) for table, document in PROBES.items()}


def checked_in_source() -> set[str]:
    """Every key of every `only_keys(raw, KEYS, where)` call in the package: KEYS a set literal or a module-level
    name bound to one."""
    found: set[str] = set()
    for path in (ROOT / "bootserver").rglob("*.py"):
        tree = ast.parse(path.read_text())
        named = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if getattr(call.func, "id", None) == "only_keys" and len(call.args) > 1:
                keys = call.args[1]
                keys = named.get(keys.id, keys) if isinstance(keys, ast.Name) else keys
                assert isinstance(keys, ast.Set), f"{path.name}: only_keys with keys this test cannot read"
                found |= {e.value for e in keys.elts if isinstance(e, ast.Constant)}
    return found


def documented(text: str, key: str) -> bool:
    return re.search(rf"(^|[\s`\[.\"{{]){re.escape(key)}(\s*=|`|\]|\.)", text, re.M) is not None


def test_the_probes_reach_every_table_the_loader_checks():
    probed = set().union(*accepted_keys().values())
    assert {"enroll", "http", "api_token", "mode", "partitions", "filesystem", "enable"} <= probed
    assert checked_in_source() - probed == set()


def test_every_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = sorted(f"{table}: {key}" for table, keys in accepted_keys().items() for key in keys
                     if not documented(readme, key))
    assert missing == []


def test_every_server_and_dhcp_key_is_in_the_packaged_config():
    packaged = (ROOT / "etc" / "bootserver.toml").read_text()
    keys = accepted_keys()
    missing = sorted(k for k in keys["[server]"] | keys["[dhcp]"] if not documented(packaged, k))
    assert missing == []


def test_the_packaged_config_names_every_top_level_table():
    """The site's own tables ([assets], [profiles], ...) are not in the packaged file, but it says where to read
    about each."""
    packaged = (ROOT / "etc" / "bootserver.toml").read_text()
    assert sorted(t for t in accepted_keys()["top level"] if f"[{t}]" not in packaged) == []
