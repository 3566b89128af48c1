"""The transfer loop in C (engine.c), driven from here: an `Engine` runs every handed-over transfer on one thread
of its own, and a `NativeSession` stands for one such transfer in the server's table.

The library is built with the package (hatch_build.py compiles engine.c with the C compiler, if there is one)
and loaded with ctypes, whose calls release the GIL: engine_run blocks in C for the engine's whole life and
never holds it. Where the library is missing the server runs every transfer in Python (session.py), which
behaves the same; `[server] tftp_engine` chooses, and `available()` says why the C loop cannot be had.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .session import UNANSWERED_RETRIES, Admitted, Blocks
from .wire import Negotiated, SockAddr, oack_packet

if TYPE_CHECKING:
    from .server import TftpServer

log = logging.getLogger(__package__)

LIBRARY = Path(__file__).with_name("_engine.so")
OK, CLIENT_ERROR, NEVER_ANSWERED, TIMED_OUT, READ_ERROR, CANCELLED = range(6)
DONE_BATCH = 64  # reports read per call


class _Done(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("acked", ctypes.c_int64), ("outcome", ctypes.c_int32),
                ("code", ctypes.c_int32), ("message", ctypes.c_char * 256)]


@dataclass(frozen=True)
class Ended:
    """How the engine says a transfer ended (engine.c's struct done)."""

    acked: int
    outcome: int
    code: int
    message: str


def _load(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    lib.engine_source.restype = ctypes.c_char_p
    lib.engine_source.argtypes = []
    lib.engine_new.restype = ctypes.c_void_p
    lib.engine_new.argtypes = [ctypes.c_double]
    for name in ("engine_run", "engine_done_fd"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    lib.engine_add.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32,
                               ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int,
                               ctypes.c_char_p, ctypes.c_int]
    lib.engine_add.restype = ctypes.c_int
    lib.engine_cancel.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.engine_cancel.restype = ctypes.c_int
    lib.engine_take_done.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Done), ctypes.c_int]
    lib.engine_take_done.restype = ctypes.c_int
    for name in ("engine_stop", "engine_free"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = None
    return lib


def available(library: Path | None = None) -> str | None:
    """None if the C loop (`library`, default LIBRARY) can be used here; else why not, in words for the log."""
    library = library or LIBRARY
    if not library.exists():
        return f"{library} was not built (no C compiler when the package was installed)"
    try:
        lib = _load(library)
    except OSError as exc:
        return f"{library} cannot be loaded: {exc}"
    source = library.with_name("engine.c")
    built_from = lib.engine_source().decode()
    if source.exists() and built_from != hashlib.sha256(source.read_bytes()).hexdigest():
        return (f"{library} was built from another {source.name} (edited since?): rebuild it with "
                f"`python hatch_build.py`, or reinstall the package")
    return None


class Engine:
    """One C loop for every transfer handed over; its reports come back on the event loop."""

    def __init__(self, on_ended: Callable[[int, Ended], None], sweep_interval: float) -> None:
        self._lib = _load(LIBRARY)
        self._on_ended = on_ended
        self._engine = self._lib.engine_new(sweep_interval)
        if not self._engine:
            raise OSError(errno.ENOMEM, "the TFTP engine could not be created")
        self._done_fd = self._lib.engine_done_fd(self._engine)
        self._reports = (_Done * DONE_BATCH)()
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._done_fd, self._take_reports)
        self._thread = threading.Thread(target=self._run, name="tftp-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed = self._lib.engine_run(self._engine)
        if failed:
            log.error("tftp: the transfer loop stopped: %s", os.strerror(failed))

    def add(self, sock: socket.socket, blocks: Blocks, sockaddr: SockAddr, negotiated: Negotiated,
            timeout: float, retries: int) -> int:
        """Hand a transfer over (its socket and file are the engine's from now on); its id."""
        transfer_id = next(self._ids)
        oack = oack_packet(negotiated.oack) if negotiated.oack else None
        data, fd = blocks.hand_over()
        scope = sockaddr[3] if len(sockaddr) > 3 else 0
        failed = self._lib.engine_add(self._engine, transfer_id, sock.fileno(), -1 if fd is None else fd, data,
                                      blocks.size, sock.family, sockaddr[0].split("%", 1)[0].encode(), sockaddr[1],
                                      scope, negotiated.blksize, negotiated.windowsize, timeout, retries,
                                      UNANSWERED_RETRIES, oack, len(oack or b""))
        if failed:
            if fd is not None:
                os.close(fd)
            raise OSError(failed, f"the TFTP engine refused the transfer: {os.strerror(failed)}")
        sock.detach()  # the engine closes it
        return transfer_id

    def cancel(self, transfer_id: int) -> None:
        self._lib.engine_cancel(self._engine, transfer_id)

    def _take_reports(self) -> None:
        while True:
            n = self._lib.engine_take_done(self._engine, self._reports, DONE_BATCH)
            for report in self._reports[:n]:
                ended = Ended(report.acked, report.outcome, report.code, report.message.decode("utf-8", "replace"))
                try:
                    self._on_ended(report.id, ended)
                except Exception:  # a bug of ours must not stop the reports of every other transfer
                    log.exception("tftp: reporting transfer %d failed", report.id)
            if n < DONE_BATCH:
                return

    async def close(self) -> None:
        """Stop the loop; every transfer still running is reported as ended by the server's closing."""
        self._lib.engine_stop(self._engine)
        await asyncio.to_thread(self._thread.join)
        self._loop.remove_reader(self._done_fd)
        self._take_reports()
        self._lib.engine_free(self._engine)
        self._engine = None


class NativeSession:
    """A transfer the engine runs: what the server's table keeps of it (see session.Session for the Python twin)."""

    deadline = None  # the engine keeps its own retransmission deadlines

    def __init__(self, server: TftpServer, engine: Engine, admitted: Admitted) -> None:
        self._server = server
        self._engine = engine
        self._admitted = admitted
        self.peer = admitted.peer
        self.id: int | None = None

    def start(self) -> None:
        a = self._admitted
        self.id = self._engine.add(a.sock, a.blocks, a.sockaddr, a.negotiated, a.timeout, self._server.retries)

    def on_deadline(self) -> None:  # never called: deadline is always None
        pass

    def finish(self, error: str | None) -> None:
        """Ask the engine to end it; it is reported when the engine says it ended."""
        if self.id is not None:
            self._engine.cancel(self.id)

    def ended(self, how: Ended) -> None:
        self._admitted.blocks.close()
        self._server._forget(self)
        self._server._report(self._admitted.ended(how.acked, self._error(how)))

    def _error(self, how: Ended) -> str | None:
        if how.outcome == OK:
            return None
        if how.outcome == CLIENT_ERROR:
            return self._admitted.client_aborted(how.code, how.message)
        if how.outcome == NEVER_ANSWERED:
            return self._admitted.never_answered(how.code)
        if how.outcome == TIMED_OUT:
            return self._admitted.timed_out(how.code)
        if how.outcome == READ_ERROR:
            return self._admitted.unreadable(how.message)
        return "server closed"
