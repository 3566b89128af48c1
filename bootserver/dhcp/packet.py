"""The DHCP wire format: BOOTP/DHCP messages and their options (`DhcpPacket`).

No library: dhcppython, pydhcplib and dhcplib on PyPI are unmaintained, scapy is GPL and heavy (the
tests use it as an independent cross-check of this codec).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from ..mac import canonical_mac

Address = tuple[str, int]

BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE", ACK: "ACK",
                 NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM"}

# Option codes used here (RFC 2132 unless noted).
PAD, END = 0, 255
SUBNET_MASK, ROUTER, DNS_SERVERS, HOSTNAME, DOMAIN_NAME = 1, 3, 6, 12, 15
VENDOR_OPTIONS = 43  # PXE: encapsulated vendor options
REQUESTED_IP, LEASE_TIME, OVERLOAD, MESSAGE_TYPE, SERVER_ID = 50, 51, 52, 53, 54
RENEWAL_TIME, REBINDING_TIME, VENDOR_CLASS, BOOTFILE_NAME = 58, 59, 60, 67
USER_CLASS = 77  # RFC 3004; iPXE sends the bare string "iPXE"
CLIENT_ARCH, CLIENT_NDI, CLIENT_GUID = 93, 94, 97  # RFC 4578
IPXE_ENCAPSULATED = 175  # present only in requests from iPXE

MAGIC_COOKIE = b"\x63\x82\x53\x63"
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # the 236 fixed bytes of BOOTP
MIN_PACKET = _HEADER.size + len(MAGIC_COOKIE)
BOOTP_MIN_SIZE = 300  # old BOOTP clients drop shorter replies; pad up to it
BROADCAST_FLAG = 0x8000
CLIENT_PORT = 68

# Options whose length is fixed or constrained; a client sending another length is malformed.
_LENGTHS: dict[int, tuple[int, ...]] = {MESSAGE_TYPE: (1,), REQUESTED_IP: (4,), SERVER_ID: (4,),
                                        LEASE_TIME: (4,), OVERLOAD: (1,), CLIENT_NDI: (3,), CLIENT_GUID: (17,)}


class MalformedPacket(ValueError):
    """A datagram that is not a well-formed DHCP request: logged and dropped."""


@dataclass
class DhcpPacket:
    """One BOOTP/DHCP message. `options` maps code -> raw value (repeated options already joined)."""

    op: int
    xid: int
    chaddr: bytes  # the client hardware address, hlen bytes
    options: dict[int, bytes] = field(default_factory=dict)
    htype: int = 1  # Ethernet
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = IPv4Address(0)
    yiaddr: IPv4Address = IPv4Address(0)
    siaddr: IPv4Address = IPv4Address(0)
    giaddr: IPv4Address = IPv4Address(0)
    sname: bytes = b""
    file: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> DhcpPacket:
        if len(data) < MIN_PACKET:
            raise MalformedPacket(f"truncated: {len(data)} bytes, a DHCP message has at least {MIN_PACKET}")
        (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
         file) = _HEADER.unpack_from(data)
        if op not in (BOOTREQUEST, BOOTREPLY):
            raise MalformedPacket(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
        if not 1 <= hlen <= 16:
            raise MalformedPacket(f"hardware address length {hlen}, expected 1-16")
        if data[_HEADER.size:MIN_PACKET] != MAGIC_COOKIE:
            raise MalformedPacket("no DHCP magic cookie (a plain BOOTP request?)")
        options = _parse_options(data[MIN_PACKET:], "options")
        if len(options.get(OVERLOAD, b"\0")) != 1:  # RFC 2132 9.3: exactly one octet
            raise MalformedPacket(f"option 52 (overload) has {len(options[OVERLOAD])} octets, expected 1")
        overload = options.get(OVERLOAD, b"\0")[0]
        if overload & 1:  # RFC 2132 9.3: more options in the file field, then in sname
            _merge(options, _parse_options(file, "file field"))
        if overload & 2:
            _merge(options, _parse_options(sname, "sname field"))
        _check_lengths(options)
        return cls(op=op, xid=xid, chaddr=chaddr[:hlen], options=options, htype=htype, hops=hops, secs=secs,
                   flags=flags, ciaddr=IPv4Address(ciaddr), yiaddr=IPv4Address(yiaddr), siaddr=IPv4Address(siaddr),
                   giaddr=IPv4Address(giaddr), sname=b"" if overload & 2 else sname.rstrip(b"\0"),
                   file=b"" if overload & 1 else file.rstrip(b"\0"))

    def encode(self) -> bytes:
        if len(self.sname) > 64 or len(self.file) > 128:
            raise ValueError(f"sname ({len(self.sname)} bytes) or file ({len(self.file)} bytes) too long: "
                             f"at most 64 and 128")
        header = _HEADER.pack(self.op, self.htype, len(self.chaddr), self.hops, self.xid, self.secs, self.flags,
                              self.ciaddr.packed, self.yiaddr.packed, self.siaddr.packed, self.giaddr.packed,
                              self.chaddr, self.sname, self.file)  # struct pads the strings with NULs
        body = header + MAGIC_COOKIE + b"".join(_encode_options(self.options)) + bytes([END])
        return body.ljust(BOOTP_MIN_SIZE, b"\0")

    @property
    def message_type(self) -> int | None:
        value = self.options.get(MESSAGE_TYPE)
        return value[0] if value else None

    @property
    def mac(self) -> str:
        if self.htype != 1 or len(self.chaddr) != 6:
            raise MalformedPacket(f"hardware type {self.htype}, length {len(self.chaddr)}: not an Ethernet MAC")
        return canonical_mac(self.chaddr.hex())

    def ip_option(self, code: int) -> IPv4Address | None:
        value = self.options.get(code)
        return IPv4Address(value) if value else None


def _parse_options(data: bytes, where: str) -> dict[int, bytes]:
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == END:
            break
        if code == PAD:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise MalformedPacket(f"option {code} in the {where} runs past the end of the packet")
        length = data[i + 1]
        # RFC 3396: an option that appears more than once is one value, split.
        options[code] = options.get(code, b"") + data[i + 2:i + 2 + length]
        i += 2 + length
    return options


def _merge(options: dict[int, bytes], more: dict[int, bytes]) -> None:
    for code, value in more.items():
        options[code] = options.get(code, b"") + value


def _check_lengths(options: dict[int, bytes]) -> None:
    for code, lengths in _LENGTHS.items():
        if code in options and len(options[code]) not in lengths:
            raise MalformedPacket(f"option {code} is {len(options[code])} bytes, expected {lengths[0]}")
    arch = options.get(CLIENT_ARCH)
    if arch is not None and (not arch or len(arch) % 2):
        raise MalformedPacket(f"option 93 (client architecture) is {len(arch)} bytes, expected pairs of bytes")


def _encode_options(options: dict[int, bytes]) -> Iterator[bytes]:
    # The message type first: some PXE ROMs look for it there.
    for code in sorted(options, key=lambda c: c != MESSAGE_TYPE):
        value = options[code]
        if not 0 < code < END:
            raise ValueError(f"option code {code} cannot be encoded")
        for start in range(0, max(len(value), 1), 255):  # RFC 3396: longer values are split
            chunk = value[start:start + 255]
            yield bytes([code, len(chunk)]) + chunk
