"""The TFTP server: the listening port, admission of new transfers, and the retransmission sweep.

One `_Listener` protocol on the well-known port decodes requests and refuses or admits them; every
admitted transfer becomes a `Session` on the event loop (session.py) or, with the C loop, a `NativeSession`
that its thread runs (native.py, engine.c). Admission and reports are the event loop's either way.

Admission keeps room for sources that hold no transfer. A source (IP address) may hold at most
`max_sessions_per_client` transfers; the table holds at most `max_sessions`; and a source that already
holds a transfer may not start another once the table holds `max_sessions - new_source_reserve` or
more. The last `new_source_reserve` places (a quarter of the table by default) are thus only ever
taken by a source's *first* transfer. Without it, 63 addresses x 16 transfers fill 1,000 places and
every real machine is told "too many sessions"; with it, filling the table takes at least 47 addresses
for the 750 shared places plus 250 more, one place each, and until then a booting machine, which
fetches one file at a time and so holds nothing when it asks, still finds a place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable

from ..errors import BadRequest, Forbidden, NotFound, StoreUnavailable, TooManyRequests
from ..payload import Payload
from . import native
from .native import Ended, NativeSession
from .session import Admitted, Blocks, Session, Transfer
from .wire import (
    DEFAULT_BLKSIZE,
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERR_UNDEFINED,
    MAX_BLKSIZE,
    WRQ,
    Address,
    MalformedPacket,
    Request,
    SockAddr,
    error_packet,
    negotiate,
    parse_request,
    path_mtu,
)

log = logging.getLogger(__package__)  # one logger for the package: "bootserver.tftp"

# How often, at most, the server looks for transfers whose retransmission deadline has passed.
SWEEP_INTERVAL = 0.1
# Transfers at once, in all and per client address. A firmware or iPXE fetches one file at a time (a PXE
# ROM's tsize probe ends at once), so 16 leaves room for a few machines behind one NAT; 1,000 in all is
# well above a rack booting together. A client that never answers holds its session timeout * 2 seconds
# (its first packet and one retransmission: 2 s by default), so 1,000 abandoned or forged requests cost
# 2 s of a full table, not a leak.
MAX_SESSIONS = 1000
MAX_SESSIONS_PER_CLIENT = 16
# The share of the table kept for sources that hold no transfer (see the module docstring): a quarter,
# so that sources that already hold transfers can never take more than three quarters of it.
NEW_SOURCE_RESERVE_FRACTION = 4  # reserve = max_sessions // this
LISTEN_BUFFER = 1 << 20  # bytes of receive buffer asked for the listening socket
# File descriptors a transfer holds: its socket, and the open file unless the payload is in memory.
FDS_PER_SESSION = 2
ENGINES = ("auto", "native", "python")


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, server: TftpServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: SockAddr) -> None:
        try:
            self._server._on_datagram(data, addr)
        except Exception:  # a bug of ours; the port must keep serving everybody else
            log.exception("tftp: internal error handling a datagram from %s:%d", addr[0], addr[1])
            self._server._send_error(addr, ERR_UNDEFINED, "internal error")

    def error_received(self, exc: Exception) -> None:
        log.debug("tftp: listening socket error: %s", exc)


class TftpServer:
    """Serves what `resolve(filename, peer)` returns; reports every transfer to `on_done`."""

    def __init__(self, resolve: Callable[[str, Address], Payload], on_done: Callable[[Transfer], None], *,
                 timeout: float = 1.0, retries: int = 5, max_sessions: int = MAX_SESSIONS,
                 max_sessions_per_client: int = MAX_SESSIONS_PER_CLIENT,
                 new_source_reserve: int | None = None, engine: str = "auto") -> None:
        """`new_source_reserve`: places of the table only a source holding no transfer may take (see the
        module docstring); None for a quarter of `max_sessions`. `engine`: where transfers run, "native" (the
        C loop, native.py), "python" (session.py) or "auto" (native where it was built)."""
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        missing = native.available() if engine != "python" else None
        if engine == "native" and missing:
            raise RuntimeError(f"the native TFTP engine is not available: {missing}")
        self.engine = "python" if engine == "python" or missing else "native"
        if engine == "auto" and missing:
            log.warning("tftp: transfers run in Python: %s", missing)
        if new_source_reserve is None:
            new_source_reserve = max_sessions // NEW_SOURCE_RESERVE_FRACTION
        if not 0 <= new_source_reserve < max_sessions:
            raise ValueError(f"new_source_reserve {new_source_reserve} is not in [0, max_sessions {max_sessions})")
        self._resolve = resolve
        self._on_done = on_done
        self.timeout = timeout
        self.retries = retries
        self._max_sessions = max_sessions
        self._max_per_client = max_sessions_per_client
        self._new_source_reserve = new_source_reserve
        self._transport: asyncio.DatagramTransport | None = None
        self._family = socket.AF_INET
        self._sessions: dict[Address, Session | NativeSession] = {}
        self._engine: native.Engine | None = None
        self._native: dict[int, NativeSession] = {}  # the engine's transfers by its id
        self._per_host: Counter[str] = Counter()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.scratch = memoryview(bytearray(4 + MAX_BLKSIZE))  # every DATA packet is built here, see _send_block

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), local_addr=(host, port))
        self._transport = transport
        if self.engine == "native":
            self._engine = native.Engine(self._native_ended, self._sweep_interval())
        sock = transport.get_extra_info("socket")
        self._family = sock.family
        # Room for a rack's worth of RRQs arriving at once (the default holds ~300 small datagrams and
        # drops the rest); the kernel caps it at net.core.rmem_max.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_BUFFER)
        log.info("tftp: listening on %s:%d, transfers in %s", *self.address,
                 "the C loop" if self._engine is not None else "Python")

    @property
    def sessions(self) -> int:
        """Transfers running now."""
        return len(self._sessions)

    @property
    def address(self) -> Address:
        if self._transport is None:
            raise RuntimeError("TftpServer.start() has not been called")
        sockname = self._transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._engine is not None:
            await self._engine.close()  # reports every transfer it still ran
            self._engine = None
        for session in list(self._sessions.values()):
            session.finish("server closed")
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        await asyncio.sleep(0)  # let the listening transport run connection_lost and close its socket

    # requests

    def _on_datagram(self, data: bytes, sockaddr: SockAddr) -> None:
        peer: Address = (sockaddr[0], sockaddr[1])
        try:
            request = parse_request(data)
        except MalformedPacket as exc:
            looks_like_request = data[:2] in (b"\0\1", b"\0\2")
            log.log(logging.WARNING if looks_like_request else logging.DEBUG,
                    "tftp %s:%d: dropped malformed datagram: %s", *peer, exc)
            if data[:2] != b"\0\5":  # never answer an ERROR with an ERROR (no ping-pong between servers)
                self._send_error(sockaddr, ERR_ILLEGAL, "malformed request")
            return
        started = time.monotonic()
        if request.opcode == WRQ:
            self._refuse(sockaddr, request, started, ERR_ACCESS, "read-only server", "write refused: read-only server")
        elif request.mode != "octet":
            self._refuse(sockaddr, request, started, ERR_ILLEGAL, f"mode {request.mode!r} not supported, use octet",
                         f"unsupported mode {request.mode!r}")
        elif peer in self._sessions:
            # Same host and port: the client's TID, so a retransmitted RRQ of a running transfer.
            log.debug("tftp %s:%d: ignored duplicate request for %r", *peer, request.filename)
        elif not self._has_room(peer[0]):
            self._refuse(sockaddr, request, started, ERR_UNDEFINED, "too many sessions", "too many sessions")
        else:
            self._admit(sockaddr, request, started)

    def _has_room(self, host: str) -> bool:
        """Whether `host` may start one more transfer now (the policy is in the module docstring)."""
        held, running = self._per_host.get(host, 0), len(self._sessions)
        if held >= self._max_per_client or running >= self._max_sessions:
            return False
        # A source already served may not eat into the reserve kept for sources holding nothing.
        return held == 0 or running < self._max_sessions - self._new_source_reserve

    def _admit(self, sockaddr: SockAddr, request: Request, started: float) -> None:
        peer: Address = (sockaddr[0], sockaddr[1])
        payload = self._resolve_payload(sockaddr, request, started)
        if payload is None:
            return
        try:
            blocks = Blocks(payload)
        except OSError as exc:
            self._refuse(sockaddr, request, started, ERR_NOT_FOUND, "file not found", f"cannot open: {exc}")
            return
        negotiated = negotiate(request.options, size=blocks.size, mtu=path_mtu(self._family, sockaddr),
                               ipv6=self._family == socket.AF_INET6)
        try:
            sock = self._transfer_socket()
        except OSError as exc:
            blocks.close()
            log.warning("tftp %s:%d: cannot open a transfer socket: %s", *peer, exc)
            self._refuse(sockaddr, request, started, ERR_UNDEFINED, "internal error", f"no transfer socket: {exc}")
            return
        admitted = Admitted(sock, sockaddr, request.filename, payload, blocks, negotiated, started,
                            negotiated.timeout or self.timeout)
        session: Session | NativeSession = (Session(self, admitted) if self._engine is None
                                            else NativeSession(self, self._engine, admitted))
        log.debug("tftp %s:%d: sending %r, options %s", *peer, request.filename, negotiated.oack)
        try:
            session.start()
        except OSError as exc:  # the engine could not take it (out of memory): nothing was handed over
            sock.close()
            blocks.close()
            log.warning("tftp %s:%d: %s", *peer, exc)
            self._refuse(sockaddr, request, started, ERR_UNDEFINED, "internal error", str(exc))
            return
        self._sessions[peer] = session
        self._per_host[peer[0]] += 1
        if isinstance(session, NativeSession):
            assert session.id is not None
            self._native[session.id] = session

    def _resolve_payload(self, sockaddr: SockAddr, request: Request, started: float) -> Payload | None:
        """What to send, or None after refusing the request."""
        peer: Address = (sockaddr[0], sockaddr[1])
        try:
            return self._resolve(request.filename, peer)
        except NotFound as exc:
            self._refuse(sockaddr, request, started, ERR_NOT_FOUND, "file not found", f"not found: {exc}")
        except Forbidden as exc:
            self._refuse(sockaddr, request, started, ERR_ACCESS, "access violation", f"forbidden: {exc}")
        except BadRequest as exc:
            self._refuse(sockaddr, request, started, ERR_ILLEGAL, "bad request", f"bad request: {exc}")
        except TooManyRequests as exc:
            self._refuse(sockaddr, request, started, ERR_UNDEFINED, "too many new machines from this address, "
                         "try again later", str(exc))
        except StoreUnavailable as exc:  # the store logs it; the client is told, in short, why
            self._refuse(sockaddr, request, started, ERR_UNDEFINED, "server cannot record requests: "
                         "store unavailable (disk full or read-only), try again later", str(exc))
        except Exception as exc:
            log.exception("tftp %s:%d: resolving %r failed", *peer, request.filename)
            self._refuse(sockaddr, request, started, ERR_UNDEFINED, "internal error", f"internal error: {exc!r}")
        return None

    def _transfer_socket(self) -> socket.socket:
        """A fresh socket on the listening address with an ephemeral port: the transfer's TID."""
        assert self._transport is not None
        sockname = self._transport.get_extra_info("sockname")
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((sockname[0], 0, *sockname[2:]))
        except OSError:
            sock.close()
            raise
        return sock

    def _refuse(self, sockaddr: SockAddr, request: Request, started: float, code: int, wire_message: str,
                error: str) -> None:
        peer: Address = (sockaddr[0], sockaddr[1])
        log.info("tftp %s:%d: refused %r: %s", *peer, request.filename, error)
        self._send_error(sockaddr, code, wire_message)
        self._report(Transfer(peer, request.filename, None, 0, time.monotonic() - started,
                              DEFAULT_BLKSIZE, 1, error))

    def _send_error(self, sockaddr: SockAddr, code: int, message: str) -> None:
        # Refusals come from the listening port: no socket is spent on a client we turn away.
        if self._transport is not None and not self._transport.is_closing() and sockaddr[1] != 0:
            self._transport.sendto(error_packet(code, message), sockaddr)

    # session bookkeeping

    def _sweep_interval(self) -> float:
        return min(SWEEP_INTERVAL, self.timeout / 4)  # a deadline fires at most this late

    def _wake_sweep(self) -> None:
        """Make sure a sweep is scheduled while any transfer waits for an ACK."""
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(self._sweep_interval(), self._sweep)

    def _native_ended(self, transfer_id: int, how: Ended) -> None:
        session = self._native.pop(transfer_id, None)
        if session is not None:
            session.ended(how)

    def _sweep(self) -> None:
        self._sweep_timer = None
        now = asyncio.get_running_loop().time()
        for session in list(self._sessions.values()):
            if session.deadline is not None and session.deadline <= now:
                try:
                    session.on_deadline()
                except Exception as exc:  # a bug of ours: end that transfer, keep sweeping the others
                    log.exception("tftp %s:%d: internal error on retransmission", *session.peer)
                    session.finish(f"internal error: {exc!r}")
        if self._sessions:
            self._wake_sweep()

    def _forget(self, session: Session | NativeSession) -> None:
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]
            self._per_host[session.peer[0]] -= 1
            if self._per_host[session.peer[0]] <= 0:
                del self._per_host[session.peer[0]]

    def _report(self, transfer: Transfer) -> None:
        try:
            self._on_done(transfer)
        except Exception:  # the caller's bug must not take the event loop's callback down with it
            log.exception("tftp: on_done raised for %r", transfer.filename)


def session_cap(fd_limit: int, reserved: int = 256, wanted: int = MAX_SESSIONS) -> int:
    """`wanted` transfers, or fewer when the process may not open enough files for that many transfers plus
    `reserved` descriptors for everything else (HTTP sockets, the store): running out of descriptors
    would refuse HTTP connections too, while a full session table only refuses new TFTP transfers."""
    return max(1, min(wanted, (fd_limit - reserved) // FDS_PER_SESSION))
