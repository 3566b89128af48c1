"""The app object: config, store and core, plus the protocol servers that feed the core.

No global state: everything a request needs hangs off one App, built by App.open(config).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import resource
import signal
from dataclasses import dataclass, field

from aiohttp import web

from . import config as configuration
from . import dhcp, tftp
from .booter import Booter
from .config import Config
from .errors import ConfigError
from .provision.jobs import Provisioner
from .store import Store
from .web import create_app

log = logging.getLogger(__name__)

# Idle keep-alive sockets are closed after this many seconds, so they cannot pile up.
KEEPALIVE_TIMEOUT = 15.0
# Connections the kernel holds for us before accept(): a rack that boots at once phones home at once.
# aiohttp's default of 128 overflowed with 1,000 machines calling together, and each overflowed client
# waited for its SYN to be resent (1 s, then 3 s): p99 2.5 s. The kernel caps it at net.core.somaxconn.
HTTP_BACKLOG = 4096


@dataclass
class App:
    config: Config
    store: Store
    booter: Booter
    provisioner: Provisioner
    _runner: web.AppRunner | None = field(default=None, repr=False)
    _tftp: tftp.TftpServer | None = field(default=None, repr=False)
    _dhcp: dhcp.DhcpServer | None = field(default=None, repr=False)

    @classmethod
    def open(cls, config: Config, ssh_options: dict[str, float] | None = None) -> App:
        """Everything but the listening sockets. `ssh_options`: provisioning's SSH timeouts and
        keep-alives (`provision.provision`'s keywords), shortened by tests."""
        config.server.data_dir.mkdir(parents=True, exist_ok=True)
        config.server.tftp_root.mkdir(exist_ok=True)
        booter = Booter.open(config)
        provisioner = booter.provisioner(**(ssh_options or {}))
        return cls(config, provisioner.store, booter, provisioner)

    async def start(self) -> None:
        server = self.config.server
        self.provisioner.start()
        self._runner = web.AppRunner(create_app(self.booter, server.public_address),
                                     keepalive_timeout=KEEPALIVE_TIMEOUT, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, server.http.host, server.http.port, backlog=HTTP_BACKLOG).start()
        if server.tftp is not None:
            routes = tftp.Routes(self.booter, server.public_address, self.http_port)
            cap = tftp.session_cap(raise_fd_limit(), wanted=server.tftp_sessions)
            if cap < server.tftp_sessions:
                log.warning("tftp: at most %d transfers at once: the open-file limit is too low for %d "
                            "(raise it, e.g. LimitNOFILE= in the systemd unit)", cap, server.tftp_sessions)
            self._tftp = tftp.TftpServer(routes.resolve, routes.record, max_sessions=cap,
                                         max_sessions_per_client=min(server.tftp_sessions_per_source, cap))
            await self._tftp.start(server.tftp.host, server.tftp.port)
            routes.tftp_port = self._tftp.address[1]
        if self.config.dhcp.mode != "off":
            self._dhcp = dhcp.DhcpServer(self.booter, self.config.dhcp, self.http_port)
            await self._dhcp.start()
        log.info("serving HTTP on %s, TFTP on %s, data in %s", self.http_address,
                 self._tftp.address if self._tftp else "(off)", server.data_dir)

    @property
    def http_address(self) -> tuple[str, int]:
        assert self._runner is not None, "App.start() first"
        return self._runner.addresses[0][:2]

    @property
    def http_port(self) -> int:
        """The HTTP port machines are told about: the bound one once started, else the configured one."""
        return self.http_address[1] if self._runner else self.config.server.http.port

    @property
    def tftp_address(self) -> tuple[str, int]:
        assert self._tftp is not None, "TFTP is off or App.start() was not called"
        return self._tftp.address

    @property
    def dhcp_addresses(self) -> list[tuple[str, int]]:
        """The DHCP port, then the PXE port (4011); empty when [dhcp] mode is off."""
        return self._dhcp.addresses if self._dhcp else []

    async def stop(self) -> None:
        await self.provisioner.stop()
        if self._dhcp is not None:
            await self._dhcp.close()
        if self._tftp is not None:
            await self._tftp.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.booter.close()

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP). A valid one replaces what decides what machines get, from the
        next request on; an invalid one is logged, naming its bad key, and the last good one stays. What
        the running sockets and jobs were built from needs a restart: it is kept, and the log says so."""
        source = self.config.source
        if source is None:
            log.warning("reload: running on the embedded defaults, there is no config file to re-read")
            return False
        try:
            new = configuration.load(source)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous configuration: %s", exc)
            return False
        for what in needs_restart(self.config, new):
            log.warning("reload: %s changed, not applied: restart bootserver for it", what)
        applied = keep_runtime(self.config, new)
        self.booter.reload(applied)  # the web app, the provisioner and DHCP read it through the booter
        self.config = applied
        log.info("reloaded %s", source)
        return True

    async def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down cleanly; SIGHUP reloads the config file."""
        keep_heap_compact()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


# Settings the running servers were built from: sockets, the store, the DHCP responder, the job cap.
RESTART_SERVER_KEYS = ("http", "tftp", "data_dir", "public_address", "provision_concurrency", "database_url",
                       "database_file", "replica", "secret_key_file", "job_lease_seconds", "tftp_sessions",
                       "tftp_sessions_per_source")
FIELD_KEYS = {"database_url": "database", "database_file": "database"}  # ServerConfig field -> TOML key


def needs_restart(old: Config, new: Config) -> list[str]:
    """What changed between `old` and `new` that a reload cannot apply, as config key names."""
    changed = list(dict.fromkeys(f"[server] {FIELD_KEYS.get(key, key)}" for key in RESTART_SERVER_KEYS
                                 if getattr(old.server, key) != getattr(new.server, key)))
    if old.dhcp != new.dhcp:
        changed.append("[dhcp]")
    if _reservations(old) != _reservations(new):
        changed.append("[machines] ip (DHCP reservations)")
    return changed


def keep_runtime(old: Config, new: Config) -> Config:
    """`new`, with the settings of `old` that only a restart may change."""
    server = dataclasses.replace(new.server, **{key: getattr(old.server, key) for key in RESTART_SERVER_KEYS})
    machines = {mac: dataclasses.replace(m, ip=old.machines[mac].ip if mac in old.machines else None)
                for mac, m in new.machines.items()}
    return dataclasses.replace(new, server=server, dhcp=old.dhcp, machines=machines)


def _reservations(config: Config) -> dict[str, object]:
    return {m.mac: m.ip for m in config.machines.values() if m.ip is not None}


# glibc's mallopt() parameters (malloc.h).
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8


def keep_heap_compact() -> None:
    """Stop glibc's heap from growing for good under a long run of requests (fuzz/run measured +20% RSS
    over 100,000 requests with no Python object left behind; with this, none after the warm-up).

    glibc raises its mmap threshold whenever a large block (a status page, a JSON body) is freed, so later
    large blocks come from the heap, whose holes are rarely given back; and each thread that mallocs (the
    executor's) may get an arena of its own. A fixed threshold and two arenas keep the heap compact.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc (musl, the container's base is Debian): nothing to tune
        pass


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one, and return it. systemd and many shells start
    services with a soft limit of 1,024, which a full TFTP session table alone would exhaust."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft
