"""Read-only TFTP server on asyncio.

Protocols: RFC 1350 (TFTP), RFC 2347 (option negotiation), RFC 2348 (blksize), RFC 2349 (timeout,
tsize) and RFC 7440 (windowsize). Only reading: a WRQ gets ERROR 2 and nothing is written.

Only octet mode is served. A netascii request is refused with ERROR 4: converting line endings is
never what a boot loader wants, and answering a netascii client with raw bytes would let it mangle
every CR byte of a binary file without anyone noticing.

Layout: one `_Listener` protocol on the well-known port decodes requests and refuses or admits
them; every admitted transfer gets a `_Session` on its own ephemeral socket (a new TID, as RFC 1350
asks), read and written straight from the event loop. Everything runs on the event loop; no threads.

The transfer socket is deliberately *not* connected to the peer. A connected UDP socket never sees
datagrams from other (host, port) pairs (the kernel drops them), so RFC 1350's "ERROR 5 unknown
transfer ID" could never be sent. The path MTU, which needs a connected socket, is read from a
short-lived probe socket connected to the peer instead. The cost: ICMP errors are not reported on
an unconnected socket, so a vanished client is noticed by the retransmission timer, not at once.

tftpy is used to decode requests (wrapped: it raises many exception types on bad input) and to
encode OACK. ERROR and DATA are encoded here: see `error_packet` and `_DATA_HEADER` for why.

The boot network is not trusted: anything on it can send requests from many source addresses, and
can forge the source address of a request. Two rules follow.

Admission keeps room for sources that hold no transfer. A source (IP address) may hold at most
`max_sessions_per_client` transfers; the table holds at most `max_sessions`; and a source that already
holds a transfer may not start another once the table holds `max_sessions - new_source_reserve` or
more. The last `new_source_reserve` places (a quarter of the table by default) are thus only ever
taken by a source's *first* transfer. Without it, 63 addresses x 16 transfers fill 1,000 places and
every real machine is told "too many sessions"; with it, filling the table takes at least 47 addresses
for the 750 shared places plus 250 more, one place each, and until then a booting machine, which
fetches one file at a time and so holds nothing when it asks, still finds a place.

A transfer whose peer has never been heard from gets one retransmission of its first packet (OACK
or DATA 1), then is dropped without an ERROR. A forged RRQ sends its answers to the forged address:
every answer to a peer that never replied is traffic reflected at a victim, so a 22-byte request
buys at most two datagrams of at most 516 bytes (OACKs are smaller), instead of `retries + 1` of
them and an ERROR. A peer is heard from once any datagram from its (host, port) reaches the
transfer's socket: only a host that received our first packet knows that socket's port. From then
on the usual `retries` apply, and a transfer that times out tells the client why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketOACK

from .booter import IPXE_BINARIES, OVERLAY_NAME, Booter, Urls
from .errors import BadRequest, Forbidden, NotFound, StoreUnavailable, TooManyRequests
from .payload import Payload, resolve_under

log = logging.getLogger(__name__)

Address = tuple[str, int]
SockAddr = tuple[Any, ...]  # what the socket layer hands us: (host, port) or (host, port, flow, scope)

# Opcodes (RFC 1350, RFC 2347).
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# Error codes (RFC 1350, RFC 2347).
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL, ERR_UNKNOWN_TID = 0, 1, 2, 4, 5

DEFAULT_BLKSIZE = 512
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
MAX_WINDOWSIZE = 65535  # RFC 7440
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349
# Larger timeout options are ignored (RFC 2349 lets a server ignore, not change, the value): a transfer
# whose client stops ACKing holds its socket and file timeout * (retries + 1) seconds, which 255 would
# make 25 minutes (found by fuzz/run). Boot ROMs ask 1-4 s, when they ask at all.
MAX_ACCEPTED_TIMEOUT = 5
MAX_REQUEST = 512  # RFC 2347: a request, options included, fits in 512 octets
# Bytes of headers around a TFTP data block: IP + UDP + 4 bytes of TFTP header.
IPV4_OVERHEAD = 20 + 8 + 4
IPV6_OVERHEAD = 40 + 8 + 4
# Linux values; older Pythons do not export the names.
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
# Blocks sent per event-loop turn, so that one big window does not stall every other transfer.
SEND_BURST = 64
# Bytes read per datagram on a transfer socket: an ACK is 4, an ERROR at most a few hundred; longer
# datagrams are cut, which costs nothing since nothing past the opcode and number matters there.
RECV_SIZE = 1024
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
# Retransmissions of the first packet to a peer never heard from (see the module docstring).
UNANSWERED_RETRIES = 1
LISTEN_BUFFER = 1 << 20  # bytes of receive buffer asked for the listening socket
# File descriptors a transfer holds: its socket, and the open file unless the payload is in memory.
FDS_PER_SESSION = 2

# Struct instead of tftpy's TftpPacketDAT on the hot path: measured 0.14 us vs 0.94 us per packet,
# and TftpPacketDAT cannot take the memoryview slices of in-memory payloads.
_DATA_HEADER = struct.Struct("!HH")
_FACTORY = TftpPacketFactory()


@dataclass(frozen=True)
class Transfer:
    """Handed to on_done when a transfer ends, successfully or not."""

    peer: Address
    filename: str
    payload: Payload | None  # None when the request was refused
    bytes_sent: int  # payload bytes acknowledged by the client
    seconds: float
    blksize: int
    windowsize: int
    error: str | None  # None on success, else a human message


# --------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------


class MalformedPacket(ValueError):
    """A datagram that is not a well-formed TFTP request."""


@dataclass(frozen=True)
class Request:
    opcode: int  # RRQ or WRQ
    filename: str
    mode: str  # lower case
    options: dict[str, str]  # names lower case (RFC 2347: case-insensitive)


def parse_request(data: bytes) -> Request:
    """Decode an RRQ or WRQ, raising MalformedPacket for anything else."""
    if len(data) < 4:
        raise MalformedPacket(f"{len(data)}-byte datagram")
    opcode = int.from_bytes(data[:2], "big")
    if opcode not in (RRQ, WRQ):
        raise MalformedPacket(f"opcode {opcode} is not a request")
    # Some PXE ROMs pad requests with NULs; tftpy would read the padding as empty options. A missing
    # final NUL stays missing: such a request is malformed.
    trimmed = data.rstrip(b"\0") + b"\0" if data.endswith(b"\0") else data
    if len(trimmed) > MAX_REQUEST:
        raise MalformedPacket(f"{len(trimmed)}-byte request, more than {MAX_REQUEST}")
    try:
        packet = _FACTORY.parse(trimmed)
    except Exception as exc:  # tftpy raises TftpException, struct.error, UnicodeDecodeError, ...
        raise MalformedPacket(f"{type(exc).__name__}: {exc}") from None
    options = {name.lower(): value for name, value in packet.options.items()}
    return Request(opcode, packet.filename, packet.mode, options)


def error_packet(code: int, message: str) -> bytes:
    """An ERROR packet. Not tftpy's TftpPacketERR: it drops the message and cannot encode code 0."""
    text = message.encode("ascii", "replace")
    return _DATA_HEADER.pack(ERROR, code) + text + b"\0"


def oack_packet(options: dict[str, str]) -> bytes:
    packet = TftpPacketOACK()
    packet.options = options
    return packet.encode().buffer


# --------------------------------------------------------------------------------------------
# Option negotiation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float | None = None  # None: the server's default
    oack: dict[str, str] = field(default_factory=dict)  # empty: send no OACK, start with DATA 1


def _number(value: str) -> int | None:
    """A plain decimal number; int() alone would also take '+8', ' 8' and '1_000'."""
    if value.isascii() and value.isdigit() and len(value) <= 10:
        return int(value)
    return None


def clamp_blksize(requested: int, mtu: int | None, ipv6: bool) -> int:
    """The block size to use: the RFC 2348 maximum, lowered so one block fits the path MTU."""
    limit = MAX_BLKSIZE
    if mtu is not None:
        limit = min(limit, mtu - (IPV6_OVERHEAD if ipv6 else IPV4_OVERHEAD))
    return max(MIN_BLKSIZE, min(requested, limit))


def negotiate(options: dict[str, str], *, size: int, mtu: int | None, ipv6: bool) -> Negotiated:
    """Accept the options we understand with valid values; ignore the rest (RFC 2347 allows it)."""
    oack: dict[str, str] = {}
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    if (value := _number(options.get("blksize", ""))) is not None and value >= MIN_BLKSIZE:
        blksize = clamp_blksize(value, mtu, ipv6)
        oack["blksize"] = str(blksize)
    if (value := _number(options.get("timeout", ""))) is not None and MIN_TIMEOUT <= value <= MAX_ACCEPTED_TIMEOUT:
        # RFC 2349: the server may not change the timeout, only accept or ignore it.
        timeout = float(value)
        oack["timeout"] = str(value)
    if _number(options.get("tsize", "")) is not None:
        oack["tsize"] = str(size)
    if (value := _number(options.get("windowsize", ""))) is not None and value >= 1:
        windowsize = min(value, MAX_WINDOWSIZE)
        oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack)


def path_mtu(family: int, sockaddr: SockAddr) -> int | None:
    """The kernel's path MTU towards `sockaddr`, or None where it cannot be read (not Linux)."""
    level, option = (socket.IPPROTO_IPV6, IPV6_MTU) if family == socket.AF_INET6 else (socket.IPPROTO_IP, IP_MTU)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)  # the MTU is only known once the route is chosen
            return probe.getsockopt(level, option)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Reading the payload
# --------------------------------------------------------------------------------------------


class _Blocks:
    """Random access to a payload: pread on an open file (kernels are tens of MB), or slices of bytes."""

    def __init__(self, payload: Payload) -> None:
        self._view: memoryview | None = None
        self._fd: int | None = None
        if payload.data is not None:
            self._view = memoryview(payload.data)
            self.size = len(payload.data)
        else:
            assert payload.path is not None
            self._fd = os.open(payload.path, os.O_RDONLY)
            # The size at open time, so tsize and the block count agree for the whole transfer.
            self.size = os.fstat(self._fd).st_size

    def read_into(self, target: memoryview, offset: int) -> None:
        """Fill `target` with the bytes at `offset`."""
        if self._view is not None:
            target[:] = self._view[offset : offset + len(target)]
            return
        assert self._fd is not None
        # Blocking, but a block from the page cache costs microseconds; not worth a thread hop.
        if os.preadv(self._fd, [target], offset) != len(target):
            raise OSError(f"file shrank during the transfer (short read at offset {offset})")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# One transfer
# --------------------------------------------------------------------------------------------


class _Session:
    """Sends one payload to one peer from its own socket.

    Blocks are numbered from 1 without limit here; only the wire number wraps at 65536. `_acked`
    is the highest block the client acknowledged (0 for the OACK, -1 before that); `_sent` is the
    highest block handed to the socket. Only an ACK that moves `_acked` forward sends anything:
    duplicates are ignored (Sorcerer's Apprentice) and retransmission is the deadline's job alone.

    The socket is read and written directly from an event-loop reader, not through an asyncio
    transport: the transport receives every datagram into a fresh 256 KiB buffer, which cost more
    than the rest of the ACK's handling together (measured 28 us vs 6 us per ACK and DATA on
    loopback). A lock-step transfer is one ACK in and one DATA out per block, so this is the hot path.
    """

    def __init__(self, server: TftpServer, sock: socket.socket, sockaddr: SockAddr, filename: str,
                 payload: Payload, blocks: _Blocks, negotiated: Negotiated, started: float) -> None:
        self._server = server
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self.sockaddr = sockaddr
        self.peer: Address = (sockaddr[0], sockaddr[1])
        self.filename = filename
        self._payload = payload
        self._blocks = blocks
        self._opts = negotiated
        self._started = started
        self._timeout = negotiated.timeout or server.timeout
        self._last_block = blocks.size // negotiated.blksize + 1  # the last block is short, maybe empty
        self._acked = -1 if negotiated.oack else 0
        self._sent = 0
        self._next = 1  # next block of the current window to send
        self._window_end = 0
        self._attempts = 0  # timeouts since the last progress
        self._heard = False  # a datagram came from the peer's TID: it is not a forged source
        self.deadline: float | None = None  # loop time at which to retransmit; the server's sweep checks it
        self._blocked = False  # the socket's send buffer is full: wait until it is writable
        self._pump_pending = False
        self._done = False

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        if self._opts.oack:
            self._send_oack()
        else:
            self._start_window(1)

    # the socket

    def _on_readable(self) -> None:
        # One datagram per call: in lock-step there is only ever one waiting, and draining until
        # EAGAIN would cost a second system call per ACK. The selector calls again if more wait.
        try:
            data, addr = self._sock.recvfrom(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. an ICMP error queued on the socket
            log.debug("tftp %s:%d: socket error: %s", *self.peer, exc)
            return
        try:
            self._on_datagram(data, addr)
        except Exception as exc:  # a bug of ours: end this transfer, keep the server
            log.exception("tftp %s:%d: internal error", *self.peer)
            self._fail(ERR_UNDEFINED, "internal error", f"internal error: {exc!r}")

    def _send(self, packet: bytes | memoryview, sockaddr: SockAddr) -> bool:
        """Send one datagram; False when the send buffer is full (the caller decides what to retry)."""
        try:
            self._sock.sendto(packet, sockaddr)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # unreachable, message too long, ...: the retransmission deadline decides
            log.debug("tftp %s:%d: send failed: %s", *self.peer, exc)
            return True

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        self._blocked = False
        self._pump()

    # the transfer

    def _on_datagram(self, data: bytes, addr: SockAddr) -> None:
        if (addr[0], addr[1]) != self.peer:
            self._stray(data, addr)
            return
        self._heard = True
        if len(data) < 4:
            log.debug("tftp %s:%d: ignored %d-byte datagram", *self.peer, len(data))
        else:
            opcode, number = _DATA_HEADER.unpack_from(data)
            if opcode == ACK:
                self._on_ack(number)
            elif opcode == ERROR:
                message = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
                # Quietly: PXE ROMs routinely abort after reading tsize from the OACK.
                log.debug("tftp %s:%d: client aborted %r: ERROR %d %r", *self.peer, self.filename, number,
                          message)
                self.finish(f"client sent ERROR {number}: {message}")
            else:
                log.debug("tftp %s:%d: ignored opcode %d during transfer", *self.peer, opcode)

    def _stray(self, data: bytes, addr: SockAddr) -> None:
        """RFC 1350: a packet from another TID gets ERROR 5, and the transfer goes on."""
        log.debug("tftp %s:%d: datagram from unknown TID %s:%d", *self.peer, addr[0], addr[1])
        if data[:2] != b"\0\5":  # never answer an ERROR with an ERROR
            self._send(error_packet(ERR_UNKNOWN_TID, "unknown transfer ID"), addr)

    def _send_oack(self) -> None:
        self._send(oack_packet(self._opts.oack), self.sockaddr)  # if the buffer is full, the deadline resends
        self._arm_timer()

    def _start_window(self, first: int) -> None:
        self._next = first
        self._window_end = min(first - 1 + self._opts.windowsize, self._last_block)
        self._pump()

    def _pump(self) -> None:
        """Send the rest of the current window, SEND_BURST blocks per event-loop turn."""
        self._pump_pending = False
        if self._done or self._blocked:
            return
        try:
            for _ in range(SEND_BURST):
                if self._next > self._window_end:
                    break
                if not self._send_block(self._next):
                    self._blocked = True
                    self._loop.add_writer(self._sock.fileno(), self._on_writable)
                    return
                self._next += 1
        except OSError as exc:
            self._fail(ERR_UNDEFINED, "read error", f"cannot read {self.filename!r}: {exc}")
            return
        if self._next <= self._window_end:
            if not self._pump_pending:
                self._pump_pending = True
                self._loop.call_soon(self._pump)
        else:
            self._arm_timer()  # the window is out; now wait for its ACK

    def _send_block(self, block: int) -> bool:
        blksize = self._opts.blksize
        offset = (block - 1) * blksize
        length = min(blksize, self._blocks.size - offset)
        # One buffer for the whole server, filled in place: sendto copies it before returning, and
        # everything runs on one thread, so no block is ever built twice or allocated per packet.
        packet = self._server.scratch[: 4 + length]
        _DATA_HEADER.pack_into(packet, 0, DATA, block & 0xFFFF)
        self._blocks.read_into(packet[4:], offset)
        if not self._send(packet, self.sockaddr):
            return False
        self._sent = max(self._sent, block)
        return True

    def _on_ack(self, wire: int) -> None:
        if self._done:
            return
        # The one block in (_sent - 65536, _sent] whose number is `wire`; windows are < 65536 blocks.
        block = self._sent - ((self._sent - wire) & 0xFFFF)
        if block <= self._acked:
            return  # duplicate or stale: resending here is the Sorcerer's Apprentice bug
        self._acked = block
        self._attempts = 0
        self.deadline = None
        if block >= self._last_block:
            self.finish(None)
        else:
            # RFC 7440: an ACK inside the window restarts the window right after that block.
            self._start_window(block + 1)

    def _arm_timer(self) -> None:
        # A deadline, not a timer per ACK: call_later and cancel for every block cost more than the
        # server's periodic sweep of all sessions (see TftpServer._sweep).
        self.deadline = self._loop.time() + self._timeout
        self._server._wake_sweep()

    def on_deadline(self) -> None:
        self.deadline = None
        self._attempts += 1
        retries = self._server.retries if self._heard else min(self._server.retries, UNANSWERED_RETRIES)
        if self._attempts > retries and not self._heard:
            # Maybe a forged source: an ERROR would be one more datagram at someone who never asked.
            log.info("tftp %s:%d: %r never answered, dropped after %d retries", *self.peer, self.filename, retries)
            self.finish(f"never answered: dropped after {retries} retries")
        elif self._attempts > retries:
            log.info("tftp %s:%d: %r timed out after %d retries", *self.peer, self.filename, retries)
            self._fail(ERR_UNDEFINED, "timed out", f"timed out after {retries} retries")
        elif self._acked < 0:
            self._send_oack()
        else:
            self._start_window(self._acked + 1)

    def _fail(self, code: int, wire_message: str, error: str) -> None:
        """End the transfer with an error, telling the client too."""
        if not self._done:
            self._send(error_packet(code, wire_message), self.sockaddr)
        self.finish(error)

    def finish(self, error: str | None) -> None:
        """Free everything and report; safe to call more than once."""
        if self._done:
            return
        self._done = True
        self.deadline = None
        self._loop.remove_reader(self._sock.fileno())
        if self._blocked:
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._blocks.close()
        bytes_sent = min(max(self._acked, 0) * self._opts.blksize, self._blocks.size)
        if error is None:
            log.debug("tftp %s:%d: sent %r, %d bytes", *self.peer, self.filename, bytes_sent)
        self._server._forget(self)
        self._server._report(Transfer(self.peer, self.filename, self._payload, bytes_sent,
                                      time.monotonic() - self._started, self._opts.blksize,
                                      self._opts.windowsize, error))


# --------------------------------------------------------------------------------------------
# The listening port
# --------------------------------------------------------------------------------------------


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
                 new_source_reserve: int | None = None) -> None:
        """`new_source_reserve`: places of the table only a source holding no transfer may take (see the
        module docstring); None for a quarter of `max_sessions`."""
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
        self._sessions: dict[Address, _Session] = {}
        self._per_host: Counter[str] = Counter()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.scratch = memoryview(bytearray(4 + MAX_BLKSIZE))  # every DATA packet is built here, see _send_block

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), local_addr=(host, port))
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._family = sock.family
        # Room for a rack's worth of RRQs arriving at once (the default holds ~300 small datagrams and
        # drops the rest); the kernel caps it at net.core.rmem_max.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_BUFFER)
        log.info("tftp: listening on %s:%d", *self.address)

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
            blocks = _Blocks(payload)
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
        session = _Session(self, sock, sockaddr, request.filename, payload, blocks, negotiated, started)
        self._sessions[peer] = session
        self._per_host[peer[0]] += 1
        log.debug("tftp %s:%d: sending %r, options %s", *peer, request.filename, negotiated.oack)
        session.start()

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

    def _wake_sweep(self) -> None:
        """Make sure a sweep is scheduled while any transfer waits for an ACK."""
        if self._sweep_timer is None:
            interval = min(SWEEP_INTERVAL, self.timeout / 4)  # a deadline fires at most this late
            self._sweep_timer = asyncio.get_running_loop().call_later(interval, self._sweep)

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

    def _forget(self, session: _Session) -> None:
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


def session_cap(fd_limit: int, reserved: int = 256) -> int:
    """MAX_SESSIONS, or fewer when the process may not open enough files for that many transfers plus
    `reserved` descriptors for everything else (HTTP sockets, the store): running out of descriptors
    would refuse HTTP connections too, while a full session table only refuses new TFTP transfers."""
    return max(1, min(MAX_SESSIONS, (fd_limit - reserved) // FDS_PER_SESSION))


# -- Routes: TFTP filenames onto the Booter ---------------------------------------------------------

_MACHINE_SCRIPT = re.compile(r"boot/([^/]+)\.ipxe")
_MACHINE_SCRIPT_WITH_FACTS = re.compile(r"boot/([^/]+)/([^/]*)/([^/]*)\.ipxe")  # mac/platform/arch
_BOOT_FILE = re.compile(r"boot/([^/]+)/([^/]+)")
_OVERLAY = re.compile(r"boot/([^/]+)/([^/]+)/" + re.escape(OVERLAY_NAME))  # mac/token


class Routes:
    """The same boot paths HTTP serves, for firmware that speaks only TFTP, then the TFTP root.

        boot.ipxe, boot/{mac}.ipxe, boot/{mac}/{platform}/{arch}.ipxe, boot/{mac}/{asset},
        boot/{mac}/{token}/bootserver.cpio,
        iPXE binaries by name, then files under data_dir/tftp

    iPXE drops the query string of tftp:// URIs, so the bootstrap puts the facts in the path.
    """

    def __init__(self, booter: Booter, public_address: str | None, http_port: int) -> None:
        self.booter = booter
        self.public_address = public_address
        self.http_port = http_port
        self.tftp_port = 69  # set once the server is bound: scripts point back at the real port

    def resolve(self, filename: str, peer: Address) -> Payload:
        path, _, query = filename.lstrip("/").partition("?")
        if path == "boot.ipxe":
            return self.booter.bootstrap(self._urls(peer))
        if match := _MACHINE_SCRIPT.fullmatch(path):
            facts = {k: v[-1] for k, v in parse_qs(query).items()}
            return self.booter.machine_script(match[1], facts, self._urls(peer), "tftp", client_ip=peer[0])
        if match := _MACHINE_SCRIPT_WITH_FACTS.fullmatch(path):
            facts = {"platform": match[2], "arch": match[3]}
            return self.booter.machine_script(match[1], facts, self._urls(peer), "tftp", client_ip=peer[0])
        if match := _BOOT_FILE.fullmatch(path):
            return self.booter.boot_file(match[1], match[2])
        if match := _OVERLAY.fullmatch(path):
            return self.booter.overlay(match[1], match[2], self._urls(peer))
        if path in IPXE_BINARIES:
            return self.booter.ipxe_binary(path)
        return Payload(path, path=resolve_under(self.booter.config.server.tftp_root, path))

    def record(self, transfer: Transfer) -> None:
        if transfer.payload is not None:
            self.booter.file_sent(transfer.payload, "tftp", transfer.bytes_sent, transfer.seconds, transfer.error)

    def _urls(self, peer: Address) -> Urls:
        host = self.public_address or local_address_towards(peer[0])
        host = f"[{host}]" if ":" in host else host
        return Urls(files=f"tftp://{host}:{self.tftp_port}", api=f"http://{host}:{self.http_port}")


def local_address_towards(peer_host: str) -> str:
    """Our address on the route to `peer_host`: connecting a UDP socket picks it and sends nothing."""
    family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_host, 9))
        return probe.getsockname()[0]
