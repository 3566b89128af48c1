"""The one place that wires it all: config -> store and core -> provisioner -> HTTP, TFTP and DHCP servers.

`init_app(config)` returns an aiohttp Application that holds the parts under typed app keys; its cleanup
contexts open them in order (store and core, provisioner, HTTP site, worker processes, TFTP, DHCP) and close them
in reverse, also when one fails to start. The HTTP handlers live in web/'s own app, which the HTTP context serves.
With [server] workers > 1 this process (the owner) starts worker processes, each wired by `init_worker`: the store,
the core and the HTTP site only, on the owner's port (workers.py).

    app = init_app(config)
    async with running(app):
        http_address(app), app[STORE].node(mac), ...

`serve(app)` runs it until SIGINT or SIGTERM; SIGHUP calls `reload(app)`. No global state: everything hangs
off the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import resource
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import web

from . import config as configuration
from . import dhcp, tftp
from .booter import Booter
from .config import Config
from .errors import BootserverError, ConfigError
from .mac import canonical_mac
from .opening import open_core, open_store
from .provision.jobs import Provisioner
from .siblings import PUBLISH_SECONDS, Siblings
from .store import Store
from .web import create_app
from .workers import OwnerLink, WorkerPool, WorkerStart, die_with_owner

log = logging.getLogger(__name__)

# Idle keep-alive sockets are closed after this many seconds, so they cannot pile up.
KEEPALIVE_TIMEOUT = 15.0
# Connections the kernel holds for us before accept(): a rack that boots at once phones home at once.
# aiohttp's default of 128 overflowed with 1,000 machines calling together, and each overflowed client
# waited for its SYN to be resent (1 s, then 3 s): p99 2.5 s. The kernel caps it at net.core.somaxconn.
HTTP_BACKLOG = 4096


@dataclasses.dataclass
class LiveConfig:
    """The config the core decides from: the one the servers were started with, then each reload's. A holder,
    because a running app's keys are fixed."""

    config: Config


# What init_app sets: the config the servers were started with, the one in force (reloads replace it) and
# provisioning's SSH timeouts and keep-alives (`Provisioner`'s keywords), shortened by tests.
CONFIG = web.AppKey("config", Config)
LIVE_CONFIG = web.AppKey("live_config", LiveConfig)
SSH_OPTIONS = web.AppKey("ssh_options", dict[str, float])
# What the cleanup contexts set once their part is open; TFTP and DHCP only when configured.
STORE = web.AppKey("store", Store)
CORE = web.AppKey("core", Booter)
PROVISIONER = web.AppKey("provisioner", Provisioner)
HTTP = web.AppKey("http", web.AppRunner)
TFTP = web.AppKey("tftp", tftp.TftpServer)
DHCP = web.AppKey("dhcp", dhcp.DhcpServer)
# The task reading the event log into the fleet at startup.
FLEET_READ = web.AppKey("fleet_read", asyncio.Task)
# The owner's worker processes, when [server] workers > 1.
WORKERS = web.AppKey("workers", WorkerPool)


@dataclasses.dataclass(frozen=True)
class Role:
    """Which of the server's processes an app is: the owner (everything) or a worker (HTTP only)."""

    index: int = 0  # 0: the owner
    port: int | None = None  # a worker's: the HTTP port the owner bound

    @property
    def owner(self) -> bool:
        return self.index == 0


ROLE = web.AppKey("role", Role)  # set by init_app and init_worker


def init_app(config: Config, ssh_options: dict[str, float] | None = None) -> web.Application:
    """The server, not yet started: `running(app)` or `serve(app)` opens its parts."""
    app = web.Application()
    app[CONFIG] = config
    app[LIVE_CONFIG] = LiveConfig(config)
    app[SSH_OPTIONS] = ssh_options or {}
    app[ROLE] = Role()
    app.cleanup_ctx.extend([_store_and_core, _fleet_reader, _provisioner, _power_poll, _publisher, _http_site,
                            _workers, _tftp_server, _dhcp_server])
    return app


def init_worker(start: WorkerStart) -> web.Application:
    """A worker process's server, not yet started: the store, the core and HTTP on the owner's port."""
    app = web.Application()
    app[CONFIG] = start.config
    app[LIVE_CONFIG] = LiveConfig(start.config)
    app[SSH_OPTIONS] = {}
    app[ROLE] = Role(start.index, start.port)
    link = OwnerLink(start.link)

    async def owner_link(app: web.Application) -> AsyncIterator[None]:
        app[CORE].hand_jobs_to(link)
        link.ready(start.index)  # last: the HTTP site listens
        yield

    app.cleanup_ctx.extend([_store_and_core, _fleet_reader, _publisher, _http_site, owner_link])
    return app


def worker_main(start: WorkerStart) -> None:
    """A worker process (spawned by the owner's WorkerPool): serve until SIGTERM."""
    die_with_owner(start.owner)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides; it sends SIGTERM
    logging.basicConfig(level=start.log_level, force=True,
                        format=f"%(asctime)s %(levelname)s worker-{start.index} %(name)s: %(message)s")
    asyncio.run(serve(init_worker(start), stop_on=(signal.SIGTERM,)))


async def _store_and_core(app: web.Application) -> AsyncIterator[None]:
    server, role = app[CONFIG].server, app[ROLE]
    server.data_dir.mkdir(parents=True, exist_ok=True)
    server.tftp_root.mkdir(exist_ok=True)
    run_dir = server.data_dir / "run"
    if server.workers <= 1:
        siblings = Siblings()
    else:
        siblings = Siblings.owner(run_dir) if role.owner else Siblings(run_dir, role.index)
    store = open_store(app[CONFIG], migrate=role.owner)  # workers start once the owner has migrated it
    core = open_core(app[CONFIG], store, siblings)  # which closes the store if it fails
    app[STORE], app[CORE] = store, core
    try:
        yield
    finally:
        core.close()


async def _publisher(app: web.Application) -> AsyncIterator[None]:
    """With worker processes: publish what this one counts in memory for the others (siblings.py)."""
    if app[CONFIG].server.workers <= 1:
        yield
        return
    siblings = app[CORE].siblings

    async def publish_forever() -> None:
        while True:
            try:
                siblings.publish(app[CORE].figures())
            except OSError as exc:  # a full disk: the others' /metrics lag until it has room again
                log.warning("cannot publish this process's figures for the others: %s", exc)
            await asyncio.sleep(PUBLISH_SECONDS)

    async with _in_background(publish_forever(), "publish-figures"):
        yield


async def _fleet_reader(app: web.Application) -> AsyncIterator[None]:
    """Read the event log into the fleet (fleet.py) once, a batch per turn of the event loop, so that the server
    answers meanwhile; from then on each view reads what is new."""
    async def read() -> None:
        started, fleet = time.monotonic(), app[CORE].fleet()
        while fleet.refresh():
            await asyncio.sleep(0)
        log.info("fleet: the event log read in %.1f s", time.monotonic() - started)

    async with _in_background(read(), "fleet-reader") as task:
        app[FLEET_READ] = task
        yield


async def _provisioner(app: web.Application) -> AsyncIterator[None]:
    provisioner = app[CORE].provisioner(**app[SSH_OPTIONS])
    provisioner.start()
    app[PROVISIONER] = provisioner
    try:
        yield
    finally:
        await provisioner.stop()


async def _power_poll(app: web.Application) -> AsyncIterator[None]:
    """Read the power state of every machine with a BMC every [server] power_poll_seconds: for the pages and
    /metrics. Its calls are bounded like all BMC calls (PowerControl); a slow or dead BMC only costs its timeout."""
    async def poll_forever() -> None:
        while True:
            try:
                await app[CORE].poll_power()
            except Exception:  # a bug here must not end the polling for good
                log.exception("power poll failed")
            await asyncio.sleep(app[LIVE_CONFIG].config.server.power_poll_seconds)

    async with _in_background(poll_forever(), "power-poll"):
        yield


@contextlib.asynccontextmanager
async def _in_background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task]:
    """`work` as a task while the block runs, cancelled and awaited after it."""
    task = asyncio.create_task(work, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _http_site(app: web.Application) -> AsyncIterator[None]:
    server, role = app[CONFIG].server, app[ROLE]
    runner = web.AppRunner(create_app(app[CORE], server.public_address),
                           keepalive_timeout=KEEPALIVE_TIMEOUT, access_log=None)
    await runner.setup()
    port = server.http.port if role.port is None else role.port
    try:
        # SO_REUSEPORT: every process of the server binds the port, and the kernel spreads connections over them.
        await web.TCPSite(runner, server.http.host, port, backlog=HTTP_BACKLOG,
                          reuse_port=server.workers > 1 or None).start()
        app[HTTP] = runner
        yield
    finally:
        await runner.cleanup()


async def _workers(app: web.Application) -> AsyncIterator[None]:
    """The owner's worker processes ([server] workers - 1), once its own HTTP site listens (on the port they
    share); stopped before it closes."""
    count = app[CONFIG].server.workers
    if count <= 1:
        yield
        return

    def from_worker(verb: str, argument: str) -> None:
        try:
            mac = canonical_mac(argument)
        except BootserverError:
            log.warning("a worker sent %r %r: not a MAC", verb, argument[:64])
            return
        if verb == "schedule":
            app[PROVISIONER].schedule(mac)
        elif verb == "reboot":
            app[PROVISIONER].reboot_soon(mac)

    pool = WorkerPool(worker_main, lambda: app[LIVE_CONFIG].config, http_address(app)[1], count, from_worker)
    try:
        await pool.start()
        app[WORKERS] = pool
        yield
    finally:
        await pool.stop()


async def _tftp_server(app: web.Application) -> AsyncIterator[None]:
    server = app[CONFIG].server
    if server.tftp is None:
        yield
        return
    routes = tftp.Routes(app[CORE], server.public_address, http_address(app)[1])
    cap = tftp.session_cap(raise_fd_limit(), wanted=server.tftp_sessions)
    if cap < server.tftp_sessions:
        log.warning("tftp: at most %d transfers at once: the open-file limit is too low for %d "
                    "(raise it, e.g. LimitNOFILE= in the systemd unit)", cap, server.tftp_sessions)
    tftp_server = tftp.TftpServer(routes.resolve, routes.record, max_sessions=cap,
                                  max_sessions_per_client=min(server.tftp_sessions_per_source, cap),
                                  engine=server.tftp_engine)
    try:
        await tftp_server.start(server.tftp.host, server.tftp.port)
        routes.tftp_port = tftp_server.address[1]
        app[TFTP] = tftp_server
        yield
    finally:
        await tftp_server.close()


async def _dhcp_server(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.dhcp.mode == "off":
        yield
        return
    dhcp_server = dhcp.DhcpServer(app[CORE], config.dhcp, http_address(app)[1])
    try:
        await dhcp_server.start()
        app[DHCP] = dhcp_server
        yield
    finally:
        await dhcp_server.close()


@contextlib.asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[web.Application]:
    """`app` started (every part open, every socket listening) inside the block, stopped after it. A part
    that fails to start closes the ones opened before it, and its error is raised."""
    app.on_startup.freeze()  # as aiohttp's AppRunner: the contexts may still set app keys while starting
    try:
        await app.startup()
        app.freeze()
        tftp_server = app.get(TFTP)
        if app[ROLE].owner:
            log.info("serving HTTP on %s, TFTP on %s, data in %s", http_address(app),
                     tftp_server.address if tftp_server else "(off)", app[CONFIG].server.data_dir)
        yield app
    finally:
        app.freeze()  # shutdown's signals must be frozen, also after a failed start
        await app.shutdown()
        await app.cleanup()


async def serve(app: web.Application, stop_on: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Run until SIGINT or SIGTERM (`stop_on`), then shut down cleanly; SIGHUP reloads the config file."""
    keep_heap_compact()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_on:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, app)
    async with running(app):
        app[FLEET_READ].add_done_callback(freeze_long_lived)
        await stop.wait()


def http_address(app: web.Application) -> tuple[str, int]:
    """The address the HTTP site listens on (its port the bound one, also when [server] http says 0)."""
    return _part(app, HTTP, "HTTP").addresses[0][:2]


def tftp_address(app: web.Application) -> tuple[str, int]:
    return _part(app, TFTP, "TFTP ([server] tftp is \"off\"?)").address


def dhcp_addresses(app: web.Application) -> list[tuple[str, int]]:
    """The DHCP port, then the PXE port (4011); empty when [dhcp] mode is off."""
    dhcp_server = app.get(DHCP)
    return dhcp_server.addresses if dhcp_server else []


def _part(app: web.Application, key: web.AppKey[Any], what: str) -> Any:
    if key not in app:
        raise BootserverError(f"{what}: not listening; start the app first (`async with running(app)`)")
    return app[key]


def reload(app: web.Application) -> bool:
    """Re-read the config file (SIGHUP). A valid one replaces what decides what machines get, from the
    next request on; an invalid one is logged, naming its bad key, and the last good one stays. What
    the running sockets and jobs were built from needs a restart: it is kept, and the log says so."""
    source = app[CONFIG].source
    if source is None:
        log.warning("reload: running on the embedded defaults, there is no config file to re-read")
        return False
    workers = app.get(WORKERS)
    if workers is not None:
        workers.signal(signal.SIGHUP)  # each re-reads the file, and says in the log what it did
    core = app.get(CORE)
    if core is None:
        log.warning("reload: still starting; send SIGHUP again once serving")
        return False
    try:
        new = configuration.load(source)
    except ConfigError as exc:
        log.error("reload refused, still serving the previous configuration: %s", exc)
        return False
    live = app[LIVE_CONFIG]
    for what in needs_restart(live.config, new):
        log.warning("reload: %s changed, not applied: restart bootserver for it", what)
    live.config = keep_runtime(live.config, new)
    core.reload(live.config)  # the web app, the provisioner and DHCP read it through the core
    log.info("reloaded %s", source)
    return True


# Settings the running servers were built from: sockets, the store, the DHCP responder, the job cap.
RESTART_SERVER_KEYS = ("http", "tftp", "data_dir", "public_address", "provision_concurrency", "database_url",
                       "database_file", "replica", "secret_key_file", "job_lease_seconds", "tftp_sessions",
                       "tftp_sessions_per_source", "bmc_timeout_seconds", "bmc_concurrency", "workers")
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


def freeze_long_lived(fleet_read: asyncio.Task) -> None:
    """Leave what is alive now out of the garbage collector's full passes. The fleet read from the event log is
    millions of objects that live as long as the server, and each full pass walked them all: pauses of 100-300 ms
    in the list pages at 10,000 machines x 100 events (benchmarks/run state). Collected first, so that no garbage
    is kept for good; what the server builds later is collected as usual."""
    if fleet_read.cancelled():  # shutting down
        return
    gc.collect()
    gc.freeze()
    log.info("gc: %d objects alive after the fleet was read, left out of full collections", gc.get_freeze_count())


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
