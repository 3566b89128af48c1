"""The configuration: one TOML file, validated at start-up, every refusal naming its key.

One module a table, so the file's shape is the package's:

    document.py   the whole file: load, parse, Config, and the checks between tables
    server.py     [server]: listeners, data_dir, the store, limits and trust
    dhcp.py       [dhcp]: off, proxy or full
    profiles.py   [assets] and [profiles.NAME]: what a machine boots
    disk.py       [profiles.NAME.disk]: the disk layout provisioning makes
    deploy.py     [profiles.NAME.deploy]: the files, certificates and units provisioning puts on the node
    files.py      [profiles.NAME.files]: per-machine files for installers (preseed, kickstart, ...)
    machines.py   [machines] and [groups]: the machines we know (and their BMCs), and which profile each gets
    check.py      the checks they all share, in one shape: check(raw, key, where, *, default=...)
"""

from .deploy import DeployFile, Deployment, Unit
from .dhcp import DhcpConfig
from .disk import TYPE_GUIDS, DiskLayout, Partition
from .document import Config, load, parse
from .machines import FACT_KEYS, Bmc, Group, Machine
from .profiles import Profile
from .server import Listen, ServerConfig, default_data_dir
from .system import Health, OperatingSystem

__all__ = ["FACT_KEYS", "TYPE_GUIDS", "Bmc", "Config", "DeployFile", "Deployment", "DhcpConfig", "DiskLayout", "Group",
           "Health", "OperatingSystem",
           "Listen", "Machine", "Partition", "Profile", "ServerConfig", "Unit", "default_data_dir", "load", "parse"]
