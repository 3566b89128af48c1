"""[machines] and [groups]: the machines the operator knows, and which profile each kind of machine gets.

    [groups.raft]                      # the group with the most matching selector keys wins
    profile = "installer"
    selector = { role = "raft" }       # keys: mac, arch, platform, or any machine label

    [machines."52:54:00:12:34:56"]     # MACs in any common spelling
    hostname = "node1"
    labels = { role = "raft" }
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from ..errors import ConfigError
from .check import Table, ipv4, is_table, mac, only_keys, sections, string, string_table, table, uuid
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


@dataclass(frozen=True)
class Machine:
    """A machine the operator knows by MAC, with the labels groups select on."""

    mac: str
    hostname: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ssh: Listen | None = None  # where to reach its SSH when not at the reported IP:22 (NAT, port forwards)
    ip: IPv4Address | None = None  # its reserved address when bootserver is the DHCP server ([dhcp] mode = "full")
    uuid: str | None = None  # its SMBIOS UUID: a boot that reports another is refused


def read_groups(raw: Table, where: str) -> tuple[Group, ...]:
    """Every [groups.NAME] of the document `raw`, in the file's order."""
    return tuple(_group(name, body, here) for name, body, here in sections(raw, "groups", where))


def _group(name: str, raw: Table, where: str) -> Group:
    only_keys(raw, {"profile", "selector"}, where)
    selector = string_table(raw, "selector", where, default={})
    if "mac" in selector:
        selector["mac"] = mac(selector["mac"], f"{where} selector.mac")
    return Group(name, string(raw, "profile", where), selector)


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
    only_keys(raw, {"hostname", "labels", "ssh", "ip", "uuid"}, where)
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
    )


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
