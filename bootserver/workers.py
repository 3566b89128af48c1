"""Worker processes: HTTP on more cores, on one port.

`[server] workers = N` (default: the cores this process may run on). The server's own process, the owner, runs
everything (DHCP, TFTP, the provisioner, the power poll, HTTP) and starts N-1 workers that answer HTTP only. Each
process binds the HTTP port with SO_REUSEPORT, and the kernel spreads new connections over their sockets. A worker
opens the store and the core as the owner does, so it answers every route the same way. What only the owner does
reaches it as a datagram over a socket pair (OwnerLink): a phone-home or a first-boot report queued a job (the
owner's claim loop would find it within a second anyway: this is sooner), an operator asked for an installed OS
to be rebooted (over SSH, by the provisioner).

What a process counts in memory only (its group commits and write-behind writes, the BMC power states it saw) it
publishes every PUBLISH_SECONDS to a file of its own in data_dir/run; /metrics and the pages of any process read
the others' beside their own (siblings.py).

Signals: SIGTERM and SIGINT stop the owner, which stops its workers first (SIGTERM, then SIGKILL after
STOP_SECONDS); SIGHUP reloads the owner and is passed on to every worker, each re-reading the config file. Workers
ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the owner decides. A worker that exits is
started again after RESTART_SECONDS; one whose owner dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from .config import Config
from .errors import BootserverError

log = logging.getLogger(__name__)

READY_SECONDS = 60.0  # a worker not answering by then has failed to start
RESTART_SECONDS = 1.0  # a worker that exited is started again after this, doubled while it keeps dying young
RESTART_MAX_SECONDS = 60.0
YOUNG_SECONDS = 10.0  # a worker that exits sooner than this after its start died young
STOP_SECONDS = 10.0  # a worker still alive this long after SIGTERM is killed
RESEND_SECONDS, RESEND_TRIES = 0.05, 100  # an owner too busy to read its link: try again this often, this long
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclasses.dataclass(frozen=True)
class WorkerStart:
    """What a worker process is started with (pickled into it)."""

    config: Config  # the owner's config in force when it started the worker
    index: int
    port: int  # the HTTP port the owner bound (also when [server] http says 0)
    owner: int  # the owner's pid
    link: socket.socket  # the workers' end of the owner's socket pair
    log_level: int


class OwnerLink:
    """A worker's way to the owner: what a phone-home or an operator asked for that only the owner does."""

    def __init__(self, link: socket.socket) -> None:
        link.setblocking(False)
        self._link = link

    def ready(self, index: int) -> None:
        self._send(f"ready {index}", keep=True)

    def schedule(self, mac: str) -> None:
        """A job was queued: claim it now. Dropped when the owner is too busy to read: its poll finds the job."""
        self._send(f"schedule {mac}", keep=False)

    def reboot_soon(self, mac: str) -> None:
        """An operator asked for the installed OS of `mac` to be rebooted (over SSH: the provisioner's)."""
        self._send(f"reboot {mac}", keep=True)

    def _send(self, message: str, *, keep: bool, tries: int = RESEND_TRIES) -> None:
        try:
            self._link.send(message.encode())
        except BlockingIOError:  # the owner's queue is full (net.unix.max_dgram_qlen): it is busy
            if keep and tries > 0:
                asyncio.get_running_loop().call_later(RESEND_SECONDS, self._send, message, True, tries - 1)
            elif keep:
                log.error("the owner process took no message for %.0f s: %r is lost",
                          RESEND_SECONDS * RESEND_TRIES, message)
        except OSError as exc:  # the owner is gone: this worker is about to be stopped too
            log.warning("cannot reach the owner process (%s): %r is lost", exc, message)


def die_with_owner(owner: int) -> None:
    """Have the kernel send SIGTERM to this process when the owner exits, however it exits."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != owner:  # it died before prctl: nobody will send the signal
        os._exit(0)


class WorkerPool:
    """The owner's workers: started, kept running, told of signals, stopped."""

    def __init__(self, target: Callable[[WorkerStart], None], config: Callable[[], Config], port: int,
                 count: int, on_message: Callable[[str, str], None]) -> None:
        """`target`: the worker's main function (importable: it runs in a spawned interpreter); `config`: the one
        in force now; `on_message(verb, argument)`: what the owner does with a worker's schedule or reboot."""
        self._target = target
        self._config = config
        self._port = port
        self._count = count
        self._on_message = on_message
        self._mine, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._mine.setblocking(False)
        self._processes: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}  # index -> monotonic time of its last start
        self._delays: dict[int, float] = {}  # index -> the wait before its next restart
        self._ready: set[int] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # spawn, not fork: the owner's event loop, threads and sockets must not be copied into a worker.
        self._context = multiprocessing.get_context("spawn")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.pid is not None and p.exitcode is None]

    async def start(self) -> None:
        """Start every worker and return once each answers (or raise, naming the one that did not)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._mine.fileno(), self._receive)
        for index in range(1, self._count):
            self._spawn(index)
        deadline = time.monotonic() + READY_SECONDS
        while len(self._ready) < self._count - 1:
            for index, process in self._processes.items():
                if process.exitcode is not None:
                    raise BootserverError(f"worker {index} exited at start-up ({_exit(process)}): its log is above")
            if time.monotonic() > deadline:
                raise BootserverError(f"workers {sorted(set(self._processes) - self._ready)} did not start within "
                                      f"{READY_SECONDS:.0f} s: their log is above")
            await asyncio.sleep(0.05)
        log.info("%d worker processes answer HTTP on port %d beside this one (pids %s)", self._count - 1, self._port,
                 " ".join(map(str, self.pids)))

    def signal(self, signum: int) -> None:
        for process in self._processes.values():
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    async def stop(self) -> None:
        """SIGTERM to every worker (each closes its socket and writes what it holds), SIGKILL to the slow."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while any(p.exitcode is None for p in self._processes.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for index, process in self._processes.items():
            if process.exitcode is None:
                log.warning("worker %d did not stop within %.0f s of SIGTERM: killed", index, STOP_SECONDS)
                process.kill()
                process.join(5)
        if self._loop is not None:
            self._loop.remove_reader(self._mine.fileno())
            for process in self._processes.values():
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(process.sentinel)
        self._mine.close()
        self._theirs.close()

    def _spawn(self, index: int) -> None:
        assert self._loop is not None
        start = WorkerStart(self._config(), index, self._port, os.getpid(), self._theirs,
                            logging.getLogger().getEffectiveLevel())
        process = self._context.Process(target=self._target, args=(start,), name=f"bootserver-worker-{index}",
                                        daemon=True)
        process.start()
        self._processes[index] = process
        self._started[index] = time.monotonic()
        self._loop.add_reader(process.sentinel, self._exited, index, process)

    def _exited(self, index: int, process: BaseProcess) -> None:
        assert self._loop is not None
        self._loop.remove_reader(process.sentinel)
        # Not join(0): the sentinel is readable as soon as the child closes it, which can be before the kernel makes
        # it a zombie, and a non-blocking wait then finds it running (exit status None, never reaped). With a
        # timeout, multiprocessing waits for the sentinel and then reaps it blocking: at once, it is exiting.
        process.join(STOP_SECONDS)
        self._ready.discard(index)
        if self._stopping:
            return
        delay = self._delays[index] = restart_delay(self._delays.get(index), time.monotonic() - self._started[index])
        log.error("worker %d (pid %s) exited (%s): starting it again in %.0f s", index, process.pid, _exit(process),
                  delay)
        self._loop.call_later(delay, self._restart, index)

    def _restart(self, index: int) -> None:
        if not self._stopping:
            self._spawn(index)

    def _receive(self) -> None:
        while True:
            try:
                message = self._mine.recv(256).decode("ascii", "replace")
            except (BlockingIOError, OSError):
                return
            verb, _, argument = message.partition(" ")
            if verb == "ready" and argument.isdigit():
                self._ready.add(int(argument))
                log.info("worker %s answers HTTP", argument)
            else:
                self._on_message(verb, argument)


def restart_delay(previous: float | None, lived: float) -> float:
    """The wait before a worker that lived `lived` seconds is started again: RESTART_SECONDS, doubled (up to
    RESTART_MAX_SECONDS) each time in a row it died young, so that one that cannot start does not spin."""
    if previous is None or lived >= YOUNG_SECONDS:
        return RESTART_SECONDS
    return min(previous * 2, RESTART_MAX_SECONDS)


def _exit(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
