"""The configuration: one TOML file, or embedded defaults when there is none.

Everything is validated at start-up; a bad key or value raises ConfigError naming it, so a typo
never becomes a machine that silently boots the wrong thing.

    [server]
    http = "0.0.0.0:8080"              # host:port; 80 when root
    tftp = "0.0.0.0:6969"              # 69 when root
    public_address = "192.0.2.10"      # how machines reach us, when it differs from what they ask for
    data_dir = "/var/lib/bootserver"
    # database = "postgresql://bootserver:PASSWORD@db.example/bootserver"   # replicas (README); default:
    #                                    # the SQLite file data_dir/bootserver.sqlite3 (or a path, sqlite:///path)
    # replica = "boot-a"                  # this server's name in events and jobs (default: the host name)
    # secret_key_file = "/var/lib/bootserver/secret.key"  # encrypts shared keys; the same file on every replica
    # job_lease_seconds = 30              # a replica silent this long loses its provisioning jobs to another
    # peers = ["http://192.0.2.11:8080"]  # the other replicas: nodes phone home there when we are down
    # event_days = 90                     # delete events older than this (default: keep every event)
    # enroll = "open"                     # who gets provisioned: open | known | approve (README: threat model)
    # window_minutes = 60                 # approve: how long an operator's approval stays open
    # trusted_proxies = ["192.0.2.1"]     # HTTP proxies whose X-Forwarded-For names the machine
    # new_machines_per_minute = 30        # machines one source address may introduce per minute
    # provision_per_source = 2            # provisioning jobs at once for one node address
    # job_minutes = 60                    # a provisioning job still running after this has failed
    # api_token = "..."                   # Bearer token for writes (default: made once in data_dir/api_token)
    # pages = "public"                    # "token": pages, API reads, streams and /metrics need the token too
    # origins = ["http://boot.example:8080"]  # this server's own origins, for writes (default: its names)
    # streams_per_client = 8              # live streams (SSE) open at once per client address; 429 beyond
    # streams_total = 100                 # live streams open at once in all
    # tftp_sessions = 1000                # TFTP transfers at once; a quarter kept for sources holding none
    # tftp_sessions_per_source = 16       # TFTP transfers at once from one source address

    [assets]                           # files by name; relative paths are under data_dir
    agent-kernel = "images/agent/vmlinuz"

    [profiles.agent]                   # what a machine boots
    kernel = "agent-kernel"
    initrd = ["agent-initrd"]
    cmdline = "console=ttyS0"

    [groups.default]                   # which machines get which profile; the most specific match wins
    profile = "agent"
    selector = {}                      # keys: mac, arch, platform, or any machine label

    [machines."52:54:00:12:34:56"]
    hostname = "node1"
    labels = { role = "raft" }
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
import uuid
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from .errors import BadRequest, ConfigError
from .mac import canonical_mac
from .profiles import Deployment, DiskLayout, deployment_from_toml, layout_from_toml
from .store.postgres import check_url
from .tomlcheck import only_keys, table

# Selector keys that come from the machine's request rather than from its configured labels.
FACT_KEYS = ("mac", "arch", "platform")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    http: Listen
    tftp: Listen | None  # None: TFTP off
    data_dir: Path
    public_address: str | None = None  # None: answer with the address the machine asked us on
    ipxe_dir: Path = Path("/usr/lib/ipxe")  # iPXE binaries served over TFTP for chainloading
    templates_dir: Path | None = None  # the operator's own iPXE templates, searched before ours
    ssh_keys: tuple[str, ...] = ()  # operators' public keys, put on every node beside the server's own
    token_minutes: int = 30  # a boot's phone-home token expires after this
    phone_home_minutes: int = 20  # a machine served a kernel that has not called back by then has failed
    provision_concurrency: int = 8  # nodes provisioned over SSH at once
    api_token: str | None = None  # when set: Bearer token for /api/v1 and the status pages' buttons
    database_url: str | None = None  # postgresql://... for replicas; None: an SQLite file
    database_file: Path | None = None  # an SQLite file other than data_dir/bootserver.sqlite3
    replica: str = field(default_factory=socket.gethostname)  # this server's name in events and job ownership
    secret_key_file: Path | None = None  # encrypts the secrets replicas share; None: data_dir/secret.key
    job_lease_seconds: int = 30  # a replica that stops renewing its jobs this long loses them to another
    peers: tuple[str, ...] = ()  # base URLs of the other replicas: a node's phone-home falls back to them
    event_days: int | None = None  # events older than this are deleted; None: every event is kept
    enroll: str = "open"  # open: any machine a group matches; known: [machines] only; approve: an operator opens
    window_minutes: int = 60  # enroll = "approve": an approval's provisioning window
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()  # their X-Forwarded-For names the client
    new_machines_per_minute: int = 30  # new machine rows one source address may cause per minute
    provision_per_source: int = 2  # provisioning jobs at once (on this replica) for one node address
    job_minutes: int = 60  # a provisioning job running longer has failed (a node that stalls frees its slot)
    pages: str = "public"  # "token": the pages, API reads, streams and /metrics need the API token too
    origins: tuple[str, ...] = ()  # scheme://host[:port] this server is reached by; (): its own names (web.py)
    streams_per_client: int = 8  # live streams (SSE) open at once from one client address
    streams_total: int = 100  # live streams open at once in all
    tftp_sessions: int = 1000  # TFTP transfers at once in all (a quarter kept for sources holding none)
    tftp_sessions_per_source: int = 16  # TFTP transfers at once from one source address

    @property
    def tftp_root(self) -> Path:
        return self.data_dir / "tftp"

    @property
    def database(self) -> Path | str:
        """Where the store is: a postgresql:// URL, or the SQLite file."""
        return self.database_url or self.database_file or self.data_dir / "bootserver.sqlite3"

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"


@dataclass(frozen=True)
class Profile:
    """What a machine boots: a kernel, its initrds and command line, rendered by one iPXE template."""

    name: str
    kernel: str | None = None  # asset name; None for templates that boot no kernel (local disk)
    initrd: tuple[str, ...] = ()
    cmdline: str = ""
    template: str = "linux.ipxe.j2"
    disk: DiskLayout | None = None  # partition and format this before deploying
    deploy: Deployment | None = None  # files, configs, certificates and units put on the node


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


DHCP_MODES = ("off", "proxy", "full")
DHCP_ANSWERS = ("all", "known")


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


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    assets: dict[str, Path]
    profiles: dict[str, Profile]
    groups: tuple[Group, ...]
    machines: dict[str, Machine]
    source: Path | None = None  # the file this came from; None for embedded defaults
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bootserver")
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share"
    return Path(base) / "bootserver"


def _default_ports() -> tuple[int, int]:
    """Privileged well-known ports when we may bind them, unprivileged ones otherwise."""
    return (80, 69) if os.geteuid() == 0 else (8080, 6969)


def load(path: Path | None) -> Config:
    """The configuration in `path`, or the embedded defaults when `path` is None."""
    if path is None:
        return parse({}, source=None)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, source=path)


def parse(raw: dict[str, Any], source: Path | None = None) -> Config:
    """Validate a decoded TOML document into a Config. Missing sections get the embedded defaults."""
    where = str(source) if source else "config"
    only_keys(raw, {"server", "assets", "profiles", "groups", "machines", "dhcp"}, where)
    server = _server(_table(raw, "server", where), f"{where}: [server]")
    assets = _assets(_table(raw, "assets", where), server.data_dir, f"{where}: [assets]")
    profiles = {
        name: _profile(name, _table(body, None, f"{where}: [profiles.{name}]"), f"{where}: [profiles.{name}]",
                       server.data_dir)
        for name, body in _table(raw, "profiles", where).items()
    }
    groups = tuple(
        _group(name, _table(body, None, f"{where}: [groups.{name}]"), f"{where}: [groups.{name}]")
        for name, body in _table(raw, "groups", where).items()
    )
    machines = _machines(_table(raw, "machines", where), f"{where}: [machines]")
    if not profiles and not groups and not assets:
        assets, profiles, groups = _embedded_agent(server.data_dir)
    dhcp = _dhcp(_table(raw, "dhcp", where), f"{where}: [dhcp]")
    _check_reservations(machines, dhcp, where)
    config = Config(server, assets, profiles, groups, machines, source, dhcp)
    _check_references(config, where)
    return config


def _embedded_agent(data_dir: Path) -> tuple[dict[str, Path], dict[str, Profile], tuple[Group, ...]]:
    """Out of the box every machine boots the agent image that `bootserver image build` makes."""
    images = data_dir / "images" / "agent"
    assets = {"agent-kernel": images / "vmlinuz", "agent-initrd": images / "initrd.img"}
    profile = Profile("agent", "agent-kernel", ("agent-initrd",), "console=tty0 console=ttyS0")
    return assets, {"agent": profile}, (Group("default", "agent"),)


def _server(raw: dict[str, Any], where: str) -> ServerConfig:
    only_keys(raw, {"http", "tftp", "data_dir", "public_address", "ipxe_dir", "templates_dir", "ssh_keys",
                     "token_minutes", "phone_home_minutes", "provision_concurrency", "api_token", "database",
                     "replica", "secret_key_file", "job_lease_seconds", "peers", "event_days", "enroll",
                     "window_minutes", "trusted_proxies", "new_machines_per_minute", "provision_per_source",
                     "job_minutes", "pages", "origins", "streams_per_client",
                     "streams_total", "tftp_sessions", "tftp_sessions_per_source"}, where)
    ssh_keys = raw.get("ssh_keys", [])
    if not isinstance(ssh_keys, list) or not all(isinstance(k, str) and k.startswith("ssh-") for k in ssh_keys):
        raise ConfigError(f"{where} ssh_keys: expected a list of OpenSSH public key lines (ssh-ed25519 AAAA...)")
    http_port, tftp_port = _default_ports()
    data_dir = Path(_str(raw, "data_dir", where, str(default_data_dir()))).expanduser()
    tftp_raw = raw.get("tftp", f"0.0.0.0:{tftp_port}")
    templates = raw.get("templates_dir")
    return ServerConfig(
        http=_listen(_str(raw, "http", where, f"0.0.0.0:{http_port}"), f"{where} http"),
        tftp=None if tftp_raw in ("", "off") else _listen(_str(raw, "tftp", where, tftp_raw), f"{where} tftp"),
        data_dir=data_dir,
        public_address=raw.get("public_address") and _str(raw, "public_address", where),
        ipxe_dir=Path(_str(raw, "ipxe_dir", where, "/usr/lib/ipxe")),
        templates_dir=Path(_str(raw, "templates_dir", where)) if templates is not None else None,
        ssh_keys=tuple(ssh_keys),
        token_minutes=_positive(raw, "token_minutes", where, 30),
        phone_home_minutes=_positive(raw, "phone_home_minutes", where, 20),
        provision_concurrency=_positive(raw, "provision_concurrency", where, 8),
        api_token=_api_token(raw, where),
        database_url=_database_url(raw, where),
        database_file=_database_file(raw, where, data_dir),
        replica=_replica(raw, where),
        secret_key_file=Path(_str(raw, "secret_key_file", where)) if "secret_key_file" in raw else None,
        job_lease_seconds=_positive(raw, "job_lease_seconds", where, 30),
        peers=_peers(raw, where),
        event_days=_positive(raw, "event_days", where, 1) if "event_days" in raw else None,
        enroll=_choice(raw, "enroll", where, ENROLL_MODES),
        window_minutes=_positive(raw, "window_minutes", where, 60),
        trusted_proxies=_networks(raw, "trusted_proxies", where),
        new_machines_per_minute=_positive(raw, "new_machines_per_minute", where, 30),
        provision_per_source=_positive(raw, "provision_per_source", where, 2),
        job_minutes=_positive(raw, "job_minutes", where, 60),
        pages=_choice(raw, "pages", where, ("public", "token")),
        origins=_origins(raw, where),
        streams_per_client=_positive(raw, "streams_per_client", where, 8),
        streams_total=_positive(raw, "streams_total", where, 100),
        tftp_sessions=_positive(raw, "tftp_sessions", where, 1000),
        tftp_sessions_per_source=_positive(raw, "tftp_sessions_per_source", where, 16),
    )


ENROLL_MODES = ("open", "known", "approve")


def _networks(raw: dict[str, Any], key: str, where: str) -> tuple[IPv4Network | IPv6Network, ...]:
    values = raw.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where} {key}: expected a list of addresses or networks (\"192.0.2.1\", \"10.0.0.0/8\")")
    try:
        return tuple(ip_network(v) for v in values)
    except ValueError as exc:
        raise ConfigError(f"{where} {key}: {exc}") from None


def _origins(raw: dict[str, Any], where: str) -> tuple[str, ...]:
    """scheme://host[:port] without a path: what a browser sends as Origin for this server's pages."""
    origins = raw.get("origins", [])
    if not isinstance(origins, list) or not all(
            isinstance(o, str) and re.fullmatch(r"(?i)https?://[^/?#\s@]+/?", o) for o in origins):
        raise ConfigError(f"{where} origins: expected a list of origins like \"http://boot.example:8080\"")
    return tuple(o.rstrip("/").lower() for o in origins)


POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def _database_url(raw: dict[str, Any], where: str) -> str | None:
    """A postgresql:// URL for replicas; None for an SQLite file (the key left out, or a path)."""
    value = _str(raw, "database", where, "")
    if value.startswith(POSTGRESQL_SCHEMES):
        try:
            check_url(value)
        except ValueError:  # libpq's message quotes the URL: the password with it
            raise ConfigError(f"{where} database: not a URL libpq understands: expected "
                              f"postgresql://user:password@host:port/dbname (special characters %-encoded)") from None
        return value
    if "://" in value.removeprefix("sqlite://"):
        raise ConfigError(f"{where} database: expected postgresql://user:password@host/dbname or an SQLite file, "
                          f"got {value.split('://')[0]}://...; leave it out for data_dir/bootserver.sqlite3")
    return None


def _database_file(raw: dict[str, Any], where: str, data_dir: Path) -> Path | None:
    """An SQLite file given as a path or sqlite:///path (relative: under data_dir); None: the default one."""
    value = _str(raw, "database", where, "")
    if not value or value.startswith(POSTGRESQL_SCHEMES):
        return None
    path = Path(value.removeprefix("sqlite://")).expanduser()
    if not path.name:
        raise ConfigError(f"{where} database: expected an SQLite file's path, got {value!r}")
    return data_dir / path


def _replica(raw: dict[str, Any], where: str) -> str:
    name = _str(raw, "replica", where, socket.gethostname())
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{where} replica: expected a short name of letters, digits, '-', '_' or '.', "
                          f"got {name!r}")
    return name


def _peers(raw: dict[str, Any], where: str) -> tuple[str, ...]:
    peers = raw.get("peers", [])
    if not isinstance(peers, list) or not all(isinstance(p, str) and p.startswith("http://") for p in peers):
        raise ConfigError(f"{where} peers: expected a list of the other replicas' base URLs (http://host:port)")
    return tuple(p.rstrip("/") for p in peers)


def _api_token(raw: dict[str, Any], where: str) -> str | None:
    """A shared secret sent as `Authorization: Bearer ...`: long enough not to be guessed, header-safe."""
    if "api_token" not in raw:
        return None
    token = _str(raw, "api_token", where)
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{where} api_token: expected at least 16 printable ASCII characters without spaces "
                          f"(e.g. from `openssl rand -hex 24`)")
    return token


def _listen(text: str, where: str) -> Listen:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not host:port with a port 0-65535")
    return Listen(host.strip("[]") or "0.0.0.0", int(port))


def _assets(raw: dict[str, Any], data_dir: Path, where: str) -> dict[str, Path]:
    assets = {}
    for name in raw:
        _check_name(name, where)
        path = Path(_str(raw, name, where)).expanduser()
        assets[name] = path if path.is_absolute() else data_dir / path
    return assets


def _profile(name: str, raw: dict[str, Any], where: str, data_dir: Path) -> Profile:
    _check_name(name, where)
    only_keys(raw, {"kernel", "initrd", "cmdline", "template", "disk", "deploy"}, where)
    initrd = raw.get("initrd", [])
    if isinstance(initrd, str):
        initrd = [initrd]
    if not isinstance(initrd, list) or not all(isinstance(i, str) for i in initrd):
        raise ConfigError(f"{where} initrd: expected an asset name or a list of asset names")
    return Profile(
        name=name,
        kernel=raw.get("kernel") and _str(raw, "kernel", where),
        initrd=tuple(initrd),
        cmdline=_str(raw, "cmdline", where, ""),
        template=_str(raw, "template", where, "linux.ipxe.j2"),
        disk=layout_from_toml(_table(raw, "disk", where), f"{where.removesuffix(']')}.disk]")
        if "disk" in raw else None,
        deploy=deployment_from_toml(_table(raw, "deploy", where), f"{where.removesuffix(']')}.deploy]", data_dir)
        if "deploy" in raw else None,
    )


def _group(name: str, raw: dict[str, Any], where: str) -> Group:
    _check_name(name, where)
    only_keys(raw, {"profile", "selector"}, where)
    if "profile" not in raw:
        raise ConfigError(f"{where}: missing key 'profile'")
    selector = _string_table(raw.get("selector", {}), f"{where} selector")
    if "mac" in selector:
        selector["mac"] = _mac(selector["mac"], f"{where} selector.mac")
    return Group(name, _str(raw, "profile", where), selector)


def _machines(raw: dict[str, Any], where: str) -> dict[str, Machine]:
    machines: dict[str, Machine] = {}
    for key, body in raw.items():
        mac = _mac(key, where)
        here = f"{where.removesuffix(']')}.\"{key}\"]"
        if mac in machines:
            raise ConfigError(f"{here}: the same MAC as another [machines] entry ({mac})")
        body = _table(body, None, here)
        only_keys(body, {"hostname", "labels", "ssh", "ip", "uuid"}, here)
        labels = _string_table(body.get("labels", {}), f"{here} labels")
        clash = set(labels) & set(FACT_KEYS)
        if clash:
            raise ConfigError(f"{here} labels: {sorted(clash)} are reserved for what machines report")
        hostname = body.get("hostname") and _str(body, "hostname", here)
        ssh = _listen(_str(body, "ssh", here), f"{here} ssh") if "ssh" in body else None
        ip = _ipv4(body, "ip", here) if "ip" in body else None
        smbios = _uuid(_str(body, "uuid", here), f"{here} uuid") if "uuid" in body else None
        machines[mac] = Machine(mac, hostname, labels, ssh, ip, smbios)
    return machines


def _dhcp(raw: dict[str, Any], where: str) -> DhcpConfig:
    only_keys(raw, {"mode", "answer", "interface", "server_address", "port", "proxy_port", "pool", "netmask",
                     "router", "dns", "domain", "lease_seconds"}, where)
    mode = _choice(raw, "mode", where, DHCP_MODES)
    if mode == "off":
        return DhcpConfig()
    if "server_address" not in raw:
        raise ConfigError(f"{where} server_address: required when mode is {mode!r} (our IPv4 address on the "
                          f"segment the machines boot on: it is their next-server)")
    dns = raw.get("dns", [])
    if not isinstance(dns, list):
        raise ConfigError(f"{where} dns: expected a list of IPv4 addresses")
    dhcp = DhcpConfig(
        mode=mode,
        answer=_choice(raw, "answer", where, DHCP_ANSWERS),
        interface=_str(raw, "interface", where) if "interface" in raw else None,
        server_address=_ipv4(raw, "server_address", where),
        port=_port(raw, "port", where, 67),
        proxy_port=_port(raw, "proxy_port", where, 4011),
        pool=_pool(raw, where) if "pool" in raw else None,
        netmask=_ipv4(raw, "netmask", where) if "netmask" in raw else None,
        router=_ipv4(raw, "router", where) if "router" in raw else None,
        dns=tuple(_ipv4({"dns": d}, "dns", where) for d in dns),
        domain=_domain(raw, where) if "domain" in raw else None,
        lease_seconds=_positive(raw, "lease_seconds", where, 3600),
    )
    if mode == "full":
        _check_full_mode(dhcp, where)
    return dhcp


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _domain(raw: dict[str, Any], where: str) -> str:
    domain = _str(raw, "domain", where)
    labels = domain.rstrip(".").split(".")
    if len(domain) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{where} domain: {domain!r} is not a DNS name (letters, digits and hyphens, "
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


def _check_reservations(machines: dict[str, Machine], dhcp: DhcpConfig, where: str) -> None:
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


def _check_references(config: Config, where: str) -> None:
    for profile in config.profiles.values():
        for asset in ([profile.kernel] if profile.kernel else []) + list(profile.initrd):
            if asset not in config.assets:
                raise ConfigError(f"{where}: [profiles.{profile.name}] names asset {asset!r}, "
                                  f"which is not in [assets]")
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for group in config.groups:
        if group.profile not in config.profiles:
            raise ConfigError(f"{where}: [groups.{group.name}] names profile {group.profile!r}, "
                              f"which is not in [profiles]")
        key = tuple(sorted(group.selector.items()))
        if key in seen:
            raise ConfigError(f"{where}: [groups.{group.name}] has the same selector as "
                              f"[groups.{seen[key]}], so neither could win")
        seen[key] = group.name


# Small validators: each names the key it refuses.

def _table(raw: dict[str, Any], key: str | None, where: str) -> dict[str, Any]:
    """raw itself (key None) or its sub-table `key`, which may be absent."""
    return table(raw, where) if key is None else table(raw.get(key, {}), f"{where} {key}")


def _str(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where} {key}: expected a string, got {value!r}")
    return value


def _positive(raw: dict[str, Any], key: str, where: str, default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} {key}: expected a whole number of at least 1, got {value!r}")
    return value


def _choice(raw: dict[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str:
    value = _str(raw, key, where, choices[0])
    if value not in choices:
        raise ConfigError(f"{where} {key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _port(raw: dict[str, Any], key: str, where: str, default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{where} {key}: expected a port number 0-65535, got {value!r}")
    return value


def _ipv4(raw: dict[str, Any], key: str, where: str) -> IPv4Address:
    text = _str(raw, key, where)
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{where} {key}: {text!r} is not an IPv4 address") from None


def _pool(raw: dict[str, Any], where: str) -> tuple[IPv4Address, IPv4Address]:
    first, sep, last = _str(raw, "pool", where).partition("-")
    if not sep:
        raise ConfigError(f"{where} pool: expected FIRST-LAST, e.g. \"10.100.0.100-10.100.0.199\"")
    start, end = (_ipv4({"pool": a.strip()}, "pool", where) for a in (first, last))
    if start > end:
        raise ConfigError(f"{where} pool: {start} comes after {end}")
    return start, end


def _string_table(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where}: expected a table of strings")
    return dict(value)


def _mac(text: Any, where: str) -> str:
    try:
        return canonical_mac(str(text))
    except BadRequest as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _uuid(text: str, where: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a UUID (as in /sys/class/dmi/id/product_uuid)") from None


def _check_name(name: str, where: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"{where}: name {name!r} may hold only letters, digits, '-', '_' and '.'")
