"""[dhcp]: whether and how bootserver answers DHCP itself (the servers are in bootserver/dhcp/).

    [dhcp]
    mode = "proxy"                     # off (default) | proxy | full
    server_address = "192.0.2.10"      # ours on the boot segment: next-server and DHCP server id
    # full mode: pool = "192.0.2.100-192.0.2.199", netmask, router, dns, domain, lease_seconds
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ..errors import ConfigError
from .check import Table, choice, ipv4, only_keys, port, positive, string, strings

DHCP_MODES = ("off", "proxy", "full")
DHCP_ANSWERS = ("all", "known")

_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class DhcpConfig:
    """Whether and how bootserver answers DHCP itself (see bootserver/dhcp/).

    proxy: beside another DHCP server that hands out addresses, answer PXE clients with the boot file only.
    full: hand out addresses from `pool` (and [machines] reservations) as well.
    """

    mode: str = "off"
    answer: str = "all"  # "known": only MACs listed under [machines]
    interface: str | None = None  # bind to this interface (SO_BINDTODEVICE); None: every interface
    server_address: IPv4Address | None = None  # our address on that segment: next-server and server id
    port: int = 67
    proxy_port: int = 4011  # PXE boot-server discovery (ProxyDHCP REQUESTs)
    pool: tuple[IPv4Address, IPv4Address] | None = None  # full mode: first and last address handed out
    netmask: IPv4Address | None = None
    router: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()
    domain: str | None = None  # full mode: option 15, the DNS domain of the segment
    lease_seconds: int = 3600

    @property
    def network(self) -> IPv4Network | None:
        if self.server_address is None or self.netmask is None:
            return None
        return IPv4Network(f"{self.server_address}/{self.netmask}", strict=False)


def read_dhcp(raw: Table, where: str) -> DhcpConfig:
    """The [dhcp] table, validated; a full server's pool, netmask and router checked against each other."""
    _dhcp(raw, where)
    mode = choice(raw, "mode", where, choices=DHCP_MODES)
    if mode == "off":
        return DhcpConfig()
    if "server_address" not in raw:
        raise ConfigError(f"{where} server_address: required when mode is {mode!r} (our IPv4 address on the "
                          f"segment the machines boot on: it is their next-server)")
    dhcp = DhcpConfig(
        mode=mode,
        answer=choice(raw, "answer", where, choices=DHCP_ANSWERS),
        interface=string(raw, "interface", where, default=None),
        server_address=ipv4(raw, "server_address", where),
        port=port(raw, "port", where, default=67),
        proxy_port=port(raw, "proxy_port", where, default=4011),
        pool=_pool(raw, "pool", where),
        netmask=ipv4(raw, "netmask", where, default=None),
        router=ipv4(raw, "router", where, default=None),
        dns=_dns(raw, "dns", where),
        domain=_domain(raw, "domain", where),
        lease_seconds=positive(raw, "lease_seconds", where, default=3600),
    )
    if mode == "full":
        _check_full_mode(dhcp, where)
    return dhcp


def _dhcp(raw: Table, where: str) -> None:
    """The keys [dhcp] has (named for its table: tests/test_settings.py finds them by this name)."""
    only_keys(raw, {"mode", "answer", "interface", "server_address", "port", "proxy_port", "pool", "netmask",
                     "router", "dns", "domain", "lease_seconds"}, where)


def _pool(raw: Table, key: str, where: str) -> tuple[IPv4Address, IPv4Address] | None:
    text = string(raw, key, where, default=None)
    if text is None:
        return None
    first, sep, last = text.partition("-")
    if not sep:
        raise ConfigError(f"{where} {key}: expected FIRST-LAST, e.g. \"10.100.0.100-10.100.0.199\"")
    start, end = (ipv4({key: a.strip()}, key, where) for a in (first, last))
    if start > end:
        raise ConfigError(f"{where} {key}: {start} comes after {end}")
    return start, end


def _dns(raw: Table, key: str, where: str) -> tuple[IPv4Address, ...]:
    return tuple(ipv4({key: address}, key, where)
                 for address in strings(raw, key, where, expected="a list of IPv4 addresses"))


def _domain(raw: Table, key: str, where: str) -> str | None:
    domain = string(raw, key, where, default=None)
    if domain is None:
        return None
    labels = domain.rstrip(".").split(".")
    if len(domain) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{where} {key}: {domain!r} is not a DNS name (letters, digits and hyphens, "
                          f"dot-separated labels of 1-63 characters, e.g. \"lab.example.org\")")
    return domain


def _check_full_mode(dhcp: DhcpConfig, where: str) -> None:
    """A full DHCP server needs a pool inside the subnet it serves; anything else hands out dead addresses."""
    for key in ("pool", "netmask"):
        if getattr(dhcp, key) is None:
            raise ConfigError(f"{where} {key}: required when mode is 'full'")
    assert dhcp.pool is not None and dhcp.netmask is not None
    try:
        IPv4Network(f"0.0.0.0/{dhcp.netmask}")
    except ValueError:
        raise ConfigError(f"{where} netmask: {str(dhcp.netmask)!r} is not a netmask (e.g. 255.255.255.0)") from None
    subnet = dhcp.network
    assert subnet is not None
    first, last = dhcp.pool
    if first not in subnet or last not in subnet:
        raise ConfigError(f"{where} pool: {first}-{last} is not inside {subnet}, the subnet of server_address")
    if dhcp.server_address is not None and first <= dhcp.server_address <= last:
        raise ConfigError(f"{where} pool: {first}-{last} holds server_address {dhcp.server_address}")
    if dhcp.router is not None and dhcp.router not in subnet:
        raise ConfigError(f"{where} router: {dhcp.router} is not inside {subnet}")
