"""The TFTP wire format: requests, ERROR, OACK, option negotiation and the path MTU.

tftpy is used to decode requests (wrapped: it raises many exception types on bad input) and to
encode OACK. ERROR and DATA are encoded here: see `error_packet` and `DATA_HEADER` for why.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketOACK

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
# make 25 minutes. Boot ROMs ask 1-4 s, when they ask at all.
MAX_ACCEPTED_TIMEOUT = 5
MAX_REQUEST = 512  # RFC 2347: a request, options included, fits in 512 octets
# Bytes of headers around a TFTP data block: IP + UDP + 4 bytes of TFTP header.
IPV4_OVERHEAD = 20 + 8 + 4
IPV6_OVERHEAD = 40 + 8 + 4
# Linux values; older Pythons do not export the names.
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)

# Struct instead of tftpy's TftpPacketDAT on the hot path: a fraction of its cost per packet, and
# TftpPacketDAT cannot take the memoryview slices of in-memory payloads.
DATA_HEADER = struct.Struct("!HH")
_FACTORY = TftpPacketFactory()


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
    return DATA_HEADER.pack(ERROR, code) + text + b"\0"


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

