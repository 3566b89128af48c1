"""[server]: where bootserver listens, keeps its state, and how far it trusts whom.

    [server]
    http = "0.0.0.0:8080"              # host:port; 80 when root
    tftp = "0.0.0.0:6969"              # 69 when root; "off" for no TFTP
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
    # boot_minutes = 15                   # an installed OS that has not reported its first boot by then has failed
    # running_minutes = 10                # health checks not all passing by then: failed
    # api_token = "..."                   # Bearer token for writes (default: made once in data_dir/api_token)
    # pages = "public"                    # "token": pages, API reads, streams and /metrics need the token too
    # origins = ["http://boot.example:8080"]  # this server's own origins, for writes (default: its names)
    # streams_per_client = 8              # live streams (SSE) open at once per client address; 429 beyond
    # streams_total = 100                 # live streams open at once in all
    # tftp_sessions = 1000                # TFTP transfers at once; a quarter kept for sources holding none
    # tftp_sessions_per_source = 16       # TFTP transfers at once from one source address
    # tftp_engine = "auto"                # "native": transfers in the C loop (built with the package), "python"
    # bmc_timeout_seconds = 20            # one BMC call (power, boot override) that takes longer has failed
    # bmc_concurrency = 4                 # BMC calls at once (polling, deploy --now, the API)
    # power_poll_seconds = 60             # how often the power state of machines with a BMC is read
    # workers = 2                         # processes answering HTTP on one port (default: the number of cores)
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import TypeVar

from ..errors import ConfigError
from ..store.postgres import check_url
from .check import REQUIRED, Table, choice, given, only_keys, positive, string, strings

T = TypeVar("T")

ENROLL_MODES = ("open", "known", "approve")
PAGES_MODES = ("public", "token")
TFTP_ENGINES = ("auto", "native", "python")  # tftp.TftpServer's engine
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


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
    secure_boot_dir: Path | None = None  # shimx64.efi and grubx64.efi (Debian's signed ones); default data_dir
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
    boot_minutes: int = 15  # from the reboot into an installed OS to its first-boot report, or failed
    running_minutes: int = 10  # from that report until the profile's health checks all pass, or failed
    pages: str = "public"  # "token": the pages, API reads, streams and /metrics need the API token too
    origins: tuple[str, ...] = ()  # scheme://host[:port] this server is reached by; (): its own names (web.py)
    streams_per_client: int = 8  # live streams (SSE) open at once from one client address
    streams_total: int = 100  # live streams open at once in all
    tftp_sessions: int = 1000  # TFTP transfers at once in all (a quarter kept for sources holding none)
    tftp_sessions_per_source: int = 16  # TFTP transfers at once from one source address
    tftp_engine: str = "auto"  # where transfers run: "native" (the C loop), "python"; "auto": native where built
    bmc_timeout_seconds: int = 20  # one BMC call taking longer has failed (the server never waits longer)
    bmc_concurrency: int = 4  # BMC calls at once, each in a thread of its own (pyghmi and sushy block)
    power_poll_seconds: int = 60  # how often the server reads the power state of every machine with a BMC
    workers: int = 1  # processes answering HTTP on one port (workers.py); the config file's default: the cores

    @property
    def tftp_root(self) -> Path:
        return self.data_dir / "tftp"

    @property
    def secure_boot_files(self) -> Path:
        """Where the signed shim and GRUB are (`bootserver image secureboot` puts them there)."""
        return self.secure_boot_dir or self.data_dir / "secureboot"

    @property
    def database(self) -> Path | str:
        """Where the store is: a postgresql:// URL, or the SQLite file."""
        return self.database_url or self.database_file or self.data_dir / "bootserver.sqlite3"

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bootserver")
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share"
    return Path(base) / "bootserver"


def _default_ports() -> tuple[int, int]:
    """Privileged well-known ports when we may bind them, unprivileged ones otherwise."""
    return (80, 69) if os.geteuid() == 0 else (8080, 6969)


def read_server(raw: Table, where: str) -> ServerConfig:
    """The [server] table, validated, with the default of every key left out."""
    _server(raw, where)
    http_port, tftp_port = _default_ports()
    data_dir = Path(string(raw, "data_dir", where, default=str(default_data_dir()))).expanduser()
    return ServerConfig(
        http=listen(raw, "http", where, default=Listen("0.0.0.0", http_port)),
        tftp=None if raw.get("tftp") in ("", "off") else listen(raw, "tftp", where,
                                                                default=Listen("0.0.0.0", tftp_port)),
        data_dir=data_dir,
        public_address=string(raw, "public_address", where, default=None),
        ipxe_dir=Path(string(raw, "ipxe_dir", where, default="/usr/lib/ipxe")),
        secure_boot_dir=_optional_path(raw, "secure_boot_dir", where),
        templates_dir=_path(raw, "templates_dir", where),
        ssh_keys=strings(raw, "ssh_keys", where, expected="a list of OpenSSH public key lines (ssh-ed25519 AAAA...)",
                         accept=lambda key: key.startswith("ssh-")),
        token_minutes=positive(raw, "token_minutes", where, default=30),
        phone_home_minutes=positive(raw, "phone_home_minutes", where, default=20),
        provision_concurrency=positive(raw, "provision_concurrency", where, default=8),
        api_token=_api_token(raw, "api_token", where),
        database_url=_database_url(raw, "database", where),
        database_file=_database_file(raw, "database", where, data_dir=data_dir),
        replica=_replica(raw, "replica", where),
        secret_key_file=_path(raw, "secret_key_file", where),
        job_lease_seconds=positive(raw, "job_lease_seconds", where, default=30),
        peers=_peers(raw, "peers", where),
        event_days=positive(raw, "event_days", where, default=None),
        enroll=choice(raw, "enroll", where, choices=ENROLL_MODES),
        window_minutes=positive(raw, "window_minutes", where, default=60),
        trusted_proxies=_networks(raw, "trusted_proxies", where),
        new_machines_per_minute=positive(raw, "new_machines_per_minute", where, default=30),
        provision_per_source=positive(raw, "provision_per_source", where, default=2),
        job_minutes=positive(raw, "job_minutes", where, default=60),
        boot_minutes=positive(raw, "boot_minutes", where, default=15),
        running_minutes=positive(raw, "running_minutes", where, default=10),
        pages=choice(raw, "pages", where, choices=PAGES_MODES),
        origins=_origins(raw, "origins", where),
        streams_per_client=positive(raw, "streams_per_client", where, default=8),
        streams_total=positive(raw, "streams_total", where, default=100),
        tftp_sessions=positive(raw, "tftp_sessions", where, default=1000),
        tftp_sessions_per_source=positive(raw, "tftp_sessions_per_source", where, default=16),
        tftp_engine=choice(raw, "tftp_engine", where, choices=TFTP_ENGINES),
        bmc_timeout_seconds=positive(raw, "bmc_timeout_seconds", where, default=20),
        bmc_concurrency=positive(raw, "bmc_concurrency", where, default=4),
        power_poll_seconds=positive(raw, "power_poll_seconds", where, default=60),
        workers=positive(raw, "workers", where, default=len(os.sched_getaffinity(0))),
    )


def _server(raw: Table, where: str) -> None:
    """The keys [server] has (named for its table: tests/test_settings.py finds them by this name)."""
    only_keys(raw, {"http", "tftp", "data_dir", "public_address", "ipxe_dir", "secure_boot_dir", "templates_dir",
                    "ssh_keys",
                     "token_minutes", "phone_home_minutes", "provision_concurrency", "api_token", "database",
                     "replica", "secret_key_file", "job_lease_seconds", "peers", "event_days", "enroll",
                     "window_minutes", "trusted_proxies", "new_machines_per_minute", "provision_per_source",
                     "job_minutes", "boot_minutes", "running_minutes", "pages", "origins", "streams_per_client",
                     "streams_total", "tftp_sessions", "tftp_sessions_per_source", "tftp_engine",
                     "bmc_timeout_seconds", "bmc_concurrency", "power_poll_seconds", "workers"}, where)


def listen(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> Listen | T:
    """host:port, as in "0.0.0.0:8080" or "[::]:69"."""
    if not given(raw, key, where, default):
        return default
    text = string(raw, key, where)
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where} {key}: {text!r} is not host:port with a port 0-65535")
    return Listen(host.strip("[]") or "0.0.0.0", int(port))


def _path(raw: Table, key: str, where: str) -> Path | None:
    text = string(raw, key, where, default=None)
    return None if text is None else Path(text)


def _networks(raw: Table, key: str, where: str) -> tuple[IPv4Network | IPv6Network, ...]:
    values = strings(raw, key, where, expected="a list of addresses or networks (\"192.0.2.1\", \"10.0.0.0/8\")")
    try:
        return tuple(ip_network(v) for v in values)
    except ValueError as exc:
        raise ConfigError(f"{where} {key}: {exc}") from None


def _origins(raw: Table, key: str, where: str) -> tuple[str, ...]:
    """scheme://host[:port] without a path: what a browser sends as Origin for this server's pages."""
    origins = strings(raw, key, where, expected="a list of origins like \"http://boot.example:8080\"",
                      accept=lambda o: re.fullmatch(r"(?i)https?://[^/?#\s@]+/?", o) is not None)
    return tuple(o.rstrip("/").lower() for o in origins)


def _database_url(raw: Table, key: str, where: str) -> str | None:
    """A postgresql:// URL for replicas; None for an SQLite file (the key left out, or a path)."""
    value = string(raw, key, where, default="")
    if value.startswith(POSTGRESQL_SCHEMES):
        try:
            check_url(value)
        except ValueError:  # libpq's message quotes the URL: the password with it
            raise ConfigError(f"{where} {key}: not a URL libpq understands: expected "
                              f"postgresql://user:password@host:port/dbname (special characters %-encoded)") from None
        return value
    if "://" in value.removeprefix("sqlite://"):
        raise ConfigError(f"{where} {key}: expected postgresql://user:password@host/dbname or an SQLite file, "
                          f"got {value.split('://')[0]}://...; leave it out for data_dir/bootserver.sqlite3")
    return None


def _database_file(raw: Table, key: str, where: str, *, data_dir: Path) -> Path | None:
    """An SQLite file given as a path or sqlite:///path (relative: under data_dir); None: the default one."""
    value = string(raw, key, where, default="")
    if not value or value.startswith(POSTGRESQL_SCHEMES):
        return None
    path = Path(value.removeprefix("sqlite://")).expanduser()
    if not path.name:
        raise ConfigError(f"{where} {key}: expected an SQLite file's path, got {value!r}")
    return data_dir / path


def _replica(raw: Table, key: str, where: str) -> str:
    name = string(raw, key, where, default=socket.gethostname())
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{where} {key}: expected a short name of letters, digits, '-', '_' or '.', "
                          f"got {name!r}")
    return name


def _peers(raw: Table, key: str, where: str) -> tuple[str, ...]:
    peers = strings(raw, key, where, expected="a list of the other replicas' base URLs (http://host:port)",
                    accept=lambda p: p.startswith("http://"))
    return tuple(p.rstrip("/") for p in peers)


def _api_token(raw: Table, key: str, where: str) -> str | None:
    """A shared secret sent as `Authorization: Bearer ...`: long enough not to be guessed, header-safe."""
    token = string(raw, key, where, default=None)
    if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token):
        raise ConfigError(f"{where} {key}: expected at least 16 printable ASCII characters without spaces "
                          f"(e.g. from `openssl rand -hex 24`)")
    return token


def _optional_path(raw: Table, key: str, where: str) -> Path | None:
    text = string(raw, key, where, default=None, nonempty=True)
    return None if text is None else Path(text).expanduser()
