"""[machines] and [groups]: the machines the operator knows, and which profile each kind of machine gets.

    [groups.raft]                      # the group with the most matching selector keys wins
    profile = "installer"
    selector = { role = "raft" }       # keys: mac, arch, platform, or any machine label

    [machines."52:54:00:12:34:56"]     # MACs in any common spelling
    hostname = "node1"
    labels = { role = "raft" }
    [machines."52:54:00:12:34:56".bmc]  # its BMC, for power control (bootserver/power/)
    driver = "ipmi"                    # or "redfish"
    address = "192.0.2.50"
    username = "admin"
    password = "encrypted:gAAAA..."    # `bootserver bmc encrypt-password`; or password_file = "/etc/..."
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from ..errors import ConfigError
from .check import (
    REQUIRED,
    Table,
    boolean,
    choice,
    given,
    ipv4,
    is_table,
    mac,
    only_keys,
    port,
    sections,
    string,
    string_table,
    subtable_where,
    table,
    uuid,
)
from .dhcp import DhcpConfig
from .server import Listen, listen

# Selector keys that come from the machine's request rather than from its configured labels.
FACT_KEYS = ("mac", "arch", "platform")


@dataclass(frozen=True)
class Group:
    """A set of machines chosen by selector; the group with most matching selector keys wins."""

    name: str
    profile: str
    selector: dict[str, str] = field(default_factory=dict)
    secure_boot: bool = False  # its UEFI machines boot through the signed shim and GRUB instead of iPXE


BMC_DRIVERS = ("ipmi", "redfish")
ENCRYPTED_PREFIX = "encrypted:"  # as provision/pki.py writes it: the config holds no BMC password in clear


@dataclass(frozen=True)
class Bmc:
    """A machine's baseboard management controller: how bootserver powers it and sets its next boot."""

    driver: str  # "ipmi" (pyghmi) | "redfish" (sushy)
    address: str  # host name or IP; for Redfish also a URL (https://bmc.example:8443)
    username: str
    password: str | None = None  # "encrypted:..." (with [server] secret_key_file), decrypted only when used
    password_file: Path | None = None  # a file holding the password in clear, mode 0600
    port: int | None = None  # None: the driver's default (IPMI 623, Redfish 443)
    verify: bool | Path = True  # Redfish: check its TLS certificate (true), against a CA file, or not (false)
    system: str | None = None  # Redfish: the system's id when the BMC manages several
    firmware: str | None = None  # "bios" | "uefi": the one-time network boot's mode; None: as the machine reported

    def __repr__(self) -> str:  # never the password, not even encrypted, in logs and tracebacks
        return f"Bmc({self.driver} {self.username}@{self.address}{f':{self.port}' if self.port else ''})"


@dataclass(frozen=True)
class Machine:
    """A machine the operator knows by MAC, with the labels groups select on."""

    mac: str
    hostname: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ssh: Listen | None = None  # where to reach its SSH when not at the reported IP:22 (NAT, port forwards)
    ip: IPv4Address | None = None  # its reserved address when bootserver is the DHCP server ([dhcp] mode = "full")
    uuid: str | None = None  # its SMBIOS UUID: a boot that reports another is refused
    bmc: Bmc | None = None  # its BMC: power control and one-time network boot
    secure_boot: bool = False  # boots through the signed shim and GRUB instead of iPXE (its firmware checks)


def read_groups(raw: Table, where: str) -> tuple[Group, ...]:
    """Every [groups.NAME] of the document `raw`, in the file's order."""
    return tuple(_group(name, body, here) for name, body, here in sections(raw, "groups", where))


def _group(name: str, raw: Table, where: str) -> Group:
    only_keys(raw, {"profile", "selector", "secure_boot"}, where)
    selector = string_table(raw, "selector", where, default={})
    if "mac" in selector:
        selector["mac"] = mac(selector["mac"], f"{where} selector.mac")
    return Group(name, string(raw, "profile", where), selector, boolean(raw, "secure_boot", where, default=False))


def read_machines(raw: Table, where: str) -> dict[str, Machine]:
    """Every [machines."MAC"] of the document `raw`, by canonical MAC."""
    machines: dict[str, Machine] = {}
    for key, body in table(raw, "machines", where, default={}).items():
        here = f"{where}: [machines.\"{key}\"]"
        machine = _machine(mac(key, f"{where}: [machines]"), is_table(body, here), here)
        if machine.mac in machines:
            raise ConfigError(f"{here}: the same MAC as another [machines] entry ({machine.mac})")
        machines[machine.mac] = machine
    return machines


def _machine(canonical_mac: str, raw: Table, where: str) -> Machine:
    only_keys(raw, {"hostname", "labels", "ssh", "ip", "uuid", "bmc", "secure_boot"}, where)
    labels = string_table(raw, "labels", where, default={})
    clash = set(labels) & set(FACT_KEYS)
    if clash:
        raise ConfigError(f"{where} labels: {sorted(clash)} are reserved for what machines report")
    return Machine(
        mac=canonical_mac,
        hostname=string(raw, "hostname", where, default=None),
        labels=labels,
        ssh=listen(raw, "ssh", where, default=None),
        ip=ipv4(raw, "ip", where, default=None),
        uuid=uuid(raw, "uuid", where, default=None),
        bmc=_bmc(raw, where),
        secure_boot=boolean(raw, "secure_boot", where, default=False),
    )


def _bmc(machine: Table, where: str) -> Bmc | None:
    raw = table(machine, "bmc", where, default=None)
    if raw is None:
        return None
    where = subtable_where(where, "bmc")
    only_keys(raw, {"driver", "address", "port", "username", "password", "password_file", "verify", "system",
                    "firmware"}, where)
    given(raw, "driver", where, REQUIRED)
    driver = choice(raw, "driver", where, choices=BMC_DRIVERS)
    password = string(raw, "password", where, default=None, nonempty=True)
    password_file = string(raw, "password_file", where, default=None, nonempty=True)
    if (password is None) == (password_file is None):
        raise ConfigError(f"{where}: give password (encrypted) or password_file, one of them")
    if password is not None and not password.startswith(ENCRYPTED_PREFIX):
        raise ConfigError(f"{where} password: write it encrypted, as `bootserver bmc encrypt-password` prints it "
                          f"(\"{ENCRYPTED_PREFIX}...\"), or put it in a password_file (mode 0600)")
    if driver == "ipmi" and any(key in raw for key in ("verify", "system")):
        raise ConfigError(f"{where}: verify and system are Redfish settings; driver is \"ipmi\"")
    return Bmc(driver=driver, address=string(raw, "address", where, nonempty=True),
               username=string(raw, "username", where), password=password,
               password_file=Path(password_file) if password_file else None,
               port=port(raw, "port", where, default=None), verify=_verify(raw, where),
               system=string(raw, "system", where, default=None, nonempty=True),
               firmware=choice(raw, "firmware", where, choices=("bios", "uefi")) if "firmware" in raw else None)


def _verify(raw: Table, where: str) -> bool | Path:
    """Redfish's TLS check: true (the system's CAs), false (none: a lab), or a CA file's path."""
    if not given(raw, "verify", where, default=True):
        return True
    if isinstance(raw["verify"], bool):
        return boolean(raw, "verify", where)
    return Path(string(raw, "verify", where, nonempty=True))


def check_reservations(machines: dict[str, Machine], dhcp: DhcpConfig, where: str) -> None:
    """Each reserved address belongs to one machine and, in full mode, to the subnet [dhcp] serves."""
    owners: dict[IPv4Address, str] = {}
    for machine in machines.values():
        if machine.ip is None:
            continue
        here = f"{where}: [machines.\"{machine.mac}\"] ip"
        if machine.ip in owners:
            raise ConfigError(f"{here}: {machine.ip} is reserved for {owners[machine.ip]} already")
        owners[machine.ip] = machine.mac
        subnet = dhcp.network
        if dhcp.mode == "full" and subnet is not None and (machine.ip not in subnet
                                                           or machine.ip == dhcp.server_address):
            raise ConfigError(f"{here}: {machine.ip} is not a free address of {subnet}, the subnet [dhcp] serves")
