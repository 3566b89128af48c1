"""DHCPv4 for network boot, on asyncio: proxyDHCP beside another server, or a full DHCP server.

Protocols: RFC 2131/2132 (DHCP and its options), RFC 3396 (long options split over several), RFC 4578
(options 93/94/97 of PXE clients), the PXE 2.1 specification (proxyDHCP, port 4011, option 43), and
iPXE's own markers (option 175, user class "iPXE").

    proxy  Another server hands out addresses. We answer only PXE clients' DISCOVERs, with an OFFER
           that has no address (yiaddr 0.0.0.0), only the boot file, next-server and "PXEClient";
           clients that then ask us on port 4011 (PXE boot-server discovery) get an ACK with the same.
    full   We are the segment's DHCP server: addresses from the pool or a [machines] reservation,
           leases kept in the store, and the boot file for PXE clients in the same answer.

Layout, top to bottom: the wire codec (`DhcpPacket`), what a client is (`Client`), the leases of full
mode (`Leases`), the answers (`Responder`: packets in, packets out, no sockets), and the sockets
(`DhcpServer`). What a machine boots, and whether it may, is the Booter's decision (`dhcp_boot`).

No library: dhcppython, pydhcplib and dhcplib on PyPI are unmaintained, scapy is GPL and heavy (the
tests use it as an independent cross-check of this codec).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, cast

from .booter import Booter, DhcpBoot, Urls
from .config import DhcpConfig
from .errors import BootserverError, StoreUnavailable
from .mac import canonical_mac

log = logging.getLogger(__name__)

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

# PXE option 43, sub-option 6 (discovery control) = 8: boot the file named in this offer; no menu,
# no boot-server discovery (UEFI firmware would otherwise go on to ask port 4011).
PXE_SKIP_DISCOVERY = bytes([6, 1, 8, END])
DECLINED_SECONDS = 600  # an address a client found in use is held back this long
OFFER_SECONDS = 60  # an offered address is held for the client this long before it must ask for it


class MalformedPacket(ValueError):
    """A datagram that is not a well-formed DHCP request: logged and dropped."""


# --------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------


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
        if len(options.get(OVERLOAD, b"\0")) != 1:  # RFC 2132 9.3: exactly one octet (found by fuzz/run)
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


# --------------------------------------------------------------------------------------------
# What the client is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """What a request tells us about the machine that sent it."""

    mac: str
    arch: int | None  # option 93 (the first listed); None: not a PXE client
    ipxe: bool  # iPXE sends option 175 and user class "iPXE"
    http: bool  # UEFI HTTP boot: vendor class "HTTPClient..."
    vendor_class: str

    @property
    def netboots(self) -> bool:
        return self.arch is not None or self.ipxe

    @classmethod
    def of(cls, packet: DhcpPacket) -> Client:
        vendor = packet.options.get(VENDOR_CLASS, b"").decode("latin-1")
        user_class = packet.options.get(USER_CLASS, b"")
        ipxe = IPXE_ENCAPSULATED in packet.options or b"iPXE" in user_class
        http = vendor.startswith("HTTPClient")
        arch: int | None = None
        if CLIENT_ARCH in packet.options:
            arch = int.from_bytes(packet.options[CLIENT_ARCH][:2], "big")
        elif vendor.startswith(("PXEClient", "HTTPClient")):
            arch = _arch_from_vendor_class(vendor)
        return cls(packet.mac, arch, ipxe, http, vendor)


def _arch_from_vendor_class(vendor: str) -> int:
    """`PXEClient:Arch:00007:UNDI:003016` -> 7; a PXE client that names no architecture is a PC BIOS."""
    parts = vendor.split(":")
    if len(parts) > 2 and parts[1] == "Arch" and parts[2].isascii() and parts[2].isdigit() and len(parts[2]) <= 5:
        return int(parts[2])
    return 0


def describe(packet: DhcpPacket) -> dict[str, Any]:
    """The client's options that matter for booting, decoded for the event log."""
    options = packet.options
    detail: dict[str, Any] = {"message": MESSAGE_NAMES.get(packet.message_type or 0, str(packet.message_type))}
    if VENDOR_CLASS in options:
        detail["vendor_class"] = _printable(options[VENDOR_CLASS])
    if USER_CLASS in options:
        detail["user_class"] = _printable(options[USER_CLASS])
    if CLIENT_ARCH in options:
        raw = options[CLIENT_ARCH]
        detail["client_arch"] = [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]
    if CLIENT_NDI in options:
        kind, major, minor = options[CLIENT_NDI]
        detail["client_ndi"] = f"{'UNDI' if kind == 1 else kind} {major}.{minor}"
    if CLIENT_GUID in options:
        detail["client_guid"] = str(uuid.UUID(bytes=options[CLIENT_GUID][1:]))
    if IPXE_ENCAPSULATED in options:
        detail["ipxe"] = True
    return detail


def _printable(value: bytes) -> str:
    text = value.decode("latin-1")
    return "".join(c if c.isprintable() else "." for c in text)[:128]


# --------------------------------------------------------------------------------------------
# Leases (full mode)
# --------------------------------------------------------------------------------------------


class Leases:
    """Which address each client gets: its [machines] reservation, else one from the pool.

    Reserved addresses are never handed to anyone else, even when they lie inside the pool. The
    store does each allocation in one transaction, so an address is never handed out twice.
    """

    def __init__(self, booter: Booter, config: DhcpConfig) -> None:
        self.store = booter.store
        self.config = config
        self.reserved = {m.mac: m.ip for m in booter.config.machines.values() if m.ip is not None}
        assert config.pool is not None
        first, last = (int(a) for a in config.pool)
        taken = set(self.reserved.values())
        self.pool = [str(IPv4Address(n)) for n in range(first, last + 1) if IPv4Address(n) not in taken]

    def candidates(self, mac: str) -> list[str]:
        reserved = self.reserved.get(mac)
        return [str(reserved)] if reserved is not None else self.pool

    def offer(self, mac: str) -> IPv4Address | None:
        lease = self.store.offer_lease(mac, self.candidates(mac), time.time() + OFFER_SECONDS)
        return IPv4Address(lease.ip) if lease else None

    def bind(self, mac: str, ip: IPv4Address) -> bool:
        if str(ip) not in self.candidates(mac):
            return False
        return self.store.bind_lease(mac, str(ip), time.time() + self.config.lease_seconds)

    def release(self, mac: str, ip: IPv4Address | None = None) -> bool:
        return self.store.release_lease(mac, str(ip) if ip is not None else None)

    def decline(self, mac: str, ip: IPv4Address) -> bool:
        return self.store.decline_lease(mac, str(ip), time.time() + DECLINED_SECONDS)


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    packet: DhcpPacket
    to: Address


class Responder:
    """Turns one request into zero or one reply. No sockets: DhcpServer does the sending."""

    def __init__(self, booter: Booter, config: DhcpConfig, http_port: int) -> None:
        if config.mode not in ("proxy", "full") or config.server_address is None:
            raise ValueError("a Responder needs [dhcp] mode proxy or full and a server_address")
        self.booter = booter
        self.config = config
        self.server_address: IPv4Address = config.server_address
        self.http_port = http_port
        self.leases = Leases(booter, config) if config.mode == "full" else None

    @property
    def urls(self) -> Urls:
        return Urls(files=f"tftp://{self.server_address}", api=f"http://{self.server_address}:{self.http_port}")

    def handle(self, data: bytes, source: Address, pxe_port: bool) -> Reply | None:
        """Answer one datagram, received on the DHCP port or (pxe_port) on port 4011.

        Raises MalformedPacket for a datagram that is not a DHCP request.
        """
        packet = DhcpPacket.parse(data)
        if packet.op != BOOTREQUEST:
            return None  # another server's reply, seen because it was broadcast
        kind = packet.message_type
        if pxe_port:
            return self._pxe_request(packet, source) if kind in (REQUEST, INFORM) else None
        if self.config.mode == "proxy":
            return self._proxy_discover(packet, source) if kind == DISCOVER else None
        if packet.giaddr != IPv4Address(0) and packet.giaddr not in (self.config.network or ()):
            # RFC 2131 4.3.1: a relayed request wants an address of the relay's subnet; our pool is of ours.
            log.warning("dhcp %s: relayed from %s, outside %s, the only network we lease on: ignored (give the "
                        "client's segment its own DHCP server, or run bootserver in proxy mode there)",
                        packet.chaddr.hex(":"), packet.giaddr, self.config.network)
            return None
        handlers = {DISCOVER: self._discover, REQUEST: self._request, RELEASE: self._release, DECLINE: self._decline,
                    INFORM: self._inform}
        handler = handlers.get(kind or 0)
        if handler is None:
            log.debug("dhcp %s: ignored message type %s", source[0], kind)
            return None
        return handler(packet, source)

    # proxyDHCP

    def _proxy_discover(self, packet: DhcpPacket, source: Address) -> Reply | None:
        client = Client.of(packet)
        if not client.netboots:
            return None  # not a PXE client: the segment's own DHCP server answers it
        boot = self._boot(client, packet)
        if boot is None or boot.bootfile is None:
            return None
        reply = self._reply(packet, OFFER, client, boot)
        return Reply(reply, self._destination(packet, source))

    def _pxe_request(self, packet: DhcpPacket, source: Address) -> Reply | None:
        """PXE boot-server discovery on port 4011: the client has its address and asks us for the file."""
        client = Client.of(packet)
        boot = self._boot(client, packet) if client.netboots else None
        if boot is None or boot.bootfile is None:
            return None
        reply = self._reply(packet, ACK, client, boot)
        reply.ciaddr = packet.ciaddr
        return Reply(reply, source)  # PXE: always to the port the client sent from

    # full mode

    def _discover(self, packet: DhcpPacket, source: Address) -> Reply | None:
        assert self.leases is not None
        client = Client.of(packet)
        boot = self._boot(client, packet)
        if boot is None:
            return None
        ip = self.leases.offer(client.mac)
        if ip is None:
            log.warning("dhcp %s: no address to offer: every address of the pool %s-%s is leased%s", client.mac,
                        *self.config.pool or ("?", "?"),
                        f" (or its reservation {self.leases.reserved[client.mac]} is held by another client)"
                        if client.mac in self.leases.reserved else "")
            return None
        reply = self._reply(packet, OFFER, client, boot)
        self._add_lease_options(reply, ip)
        return Reply(reply, self._destination(packet, source))

    def _request(self, packet: DhcpPacket, source: Address) -> Reply | None:
        assert self.leases is not None
        client = Client.of(packet)
        server_id = packet.ip_option(SERVER_ID)
        if server_id is not None and server_id != self.server_address:
            self.leases.release(client.mac)  # it took another server's offer: drop ours
            return None
        wanted = packet.ip_option(REQUESTED_IP) or (packet.ciaddr if packet.ciaddr != IPv4Address(0) else None)
        boot = self._boot(client, packet)
        if boot is None or wanted is None:
            return None
        if not self.leases.bind(client.mac, wanted):
            log.info("dhcp %s: NAK for %s: not its address here", client.mac, wanted)
            return Reply(self._nak(packet), self._destination(packet, source))
        reply = self._reply(packet, ACK, client, boot)
        self._add_lease_options(reply, wanted)
        reply.ciaddr = packet.ciaddr
        return Reply(reply, self._destination(packet, source))

    def _inform(self, packet: DhcpPacket, source: Address) -> Reply | None:
        """RFC 2131 3.4: a client with an address configured by other means asks for the rest.

        The ACK carries the segment's options (and the boot file for a PXE client) but no address and no
        lease: yiaddr stays 0, and nothing is written to the leases.
        """
        client = Client.of(packet)
        if packet.ciaddr == IPv4Address(0):
            log.info("dhcp %s: INFORM without ciaddr ignored (RFC 2131 4.4.3: it must say its address)", client.mac)
            return None
        boot = self._boot(client, packet)
        if boot is None:
            return None
        reply = self._reply(packet, ACK, client, boot)
        self._add_segment_options(reply, client.mac)
        reply.ciaddr = packet.ciaddr
        # 4.3.5: to ciaddr (the relay's when relayed), never broadcast: the client has its address.
        to = (str(packet.giaddr), 67) if packet.giaddr != IPv4Address(0) else (str(packet.ciaddr), source[1])
        return Reply(reply, to)

    def _release(self, packet: DhcpPacket, source: Address) -> None:
        assert self.leases is not None
        if self.leases.release(packet.mac, packet.ciaddr):
            log.info("dhcp %s: released %s", packet.mac, packet.ciaddr)

    def _decline(self, packet: DhcpPacket, source: Address) -> None:
        assert self.leases is not None
        ip = packet.ip_option(REQUESTED_IP)
        if ip is not None and self.leases.decline(packet.mac, ip):
            log.warning("dhcp %s: declined %s (in use by something else?): held back for %d s", packet.mac, ip,
                        DECLINED_SECONDS)

    # building replies

    def _boot(self, client: Client, packet: DhcpPacket) -> DhcpBoot | None:
        return self.booter.dhcp_boot(client.mac, client.arch, client.ipxe, client.http, self.urls,
                                     detail={**describe(packet), "mode": self.config.mode})

    def _reply(self, request: DhcpPacket, kind: int, client: Client, boot: DhcpBoot) -> DhcpPacket:
        options = {MESSAGE_TYPE: bytes([kind]), SERVER_ID: self.server_address.packed}
        reply = DhcpPacket(op=BOOTREPLY, xid=request.xid, chaddr=request.chaddr, options=options,
                           htype=request.htype, flags=request.flags, giaddr=request.giaddr)
        if boot.bootfile is None:
            return reply
        name = boot.bootfile.encode()
        reply.siaddr = self.server_address  # next-server: where the TFTP file is
        if len(name) <= 128:
            reply.file = name
        options[BOOTFILE_NAME] = name
        # Clients only treat an offer as a boot offer if it names the vendor class they sent.
        options[VENDOR_CLASS] = b"HTTPClient" if boot.http else b"PXEClient"
        if CLIENT_GUID in request.options:
            options[CLIENT_GUID] = request.options[CLIENT_GUID]  # PXE: mirror the GUID back
        if not client.ipxe and not boot.http:
            options[VENDOR_OPTIONS] = PXE_SKIP_DISCOVERY
        return reply

    def _add_lease_options(self, reply: DhcpPacket, ip: IPv4Address) -> None:
        reply.yiaddr = ip
        seconds = self.config.lease_seconds
        reply.options[LEASE_TIME] = seconds.to_bytes(4, "big")
        reply.options[RENEWAL_TIME] = (seconds // 2).to_bytes(4, "big")
        reply.options[REBINDING_TIME] = (seconds * 7 // 8).to_bytes(4, "big")
        self._add_segment_options(reply, reply.mac)

    def _add_segment_options(self, reply: DhcpPacket, mac: str) -> None:
        """What every configured client of the segment is told: mask, router, DNS, domain, its own name."""
        config = self.config
        assert config.netmask is not None
        reply.options[SUBNET_MASK] = config.netmask.packed
        if config.router is not None:
            reply.options[ROUTER] = config.router.packed
        if config.dns:
            reply.options[DNS_SERVERS] = b"".join(a.packed for a in config.dns)
        if config.domain:
            reply.options[DOMAIN_NAME] = config.domain.encode()
        machine = self.booter.config.machines.get(mac)
        if machine is not None and machine.hostname:
            reply.options[HOSTNAME] = machine.hostname.encode()  # the [machines] name, so the OS takes it

    def _nak(self, request: DhcpPacket) -> DhcpPacket:
        options = {MESSAGE_TYPE: bytes([NAK]), SERVER_ID: self.server_address.packed}
        return DhcpPacket(op=BOOTREPLY, xid=request.xid, chaddr=request.chaddr, options=options,
                          htype=request.htype, flags=request.flags, giaddr=request.giaddr)

    @staticmethod
    def _destination(request: DhcpPacket, source: Address) -> Address:
        """RFC 2131 4.1, simplified: via the relay; to a client that has an address; else broadcast.

        A client with no address yet cannot be sent unicast without an ARP entry for it, so it gets a
        broadcast, as the broadcast flag asks anyway. A client that sent from an address is answered
        at that address and port (renewals; and tests, whose clients are not on port 68).
        """
        if request.giaddr != IPv4Address(0):
            return (str(request.giaddr), 67)
        if source[0] != "0.0.0.0":
            return source
        return ("255.255.255.255", CLIENT_PORT)


# --------------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------------


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: DhcpServer, pxe_port: bool) -> None:
        self.server = server
        self.pxe_port = pxe_port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source: Address = (addr[0], addr[1])
        try:
            reply = self.server.responder.handle(data, source, self.pxe_port)
        except StoreUnavailable:
            return  # not answered: an answer we cannot record would break "every answer is an event"
        except (MalformedPacket, BootserverError) as exc:
            # Info, not warning: a busy segment's broken clients must not flood the log.
            log.info("dhcp %s:%d: dropped malformed datagram: %s", *source, exc)
            return
        except Exception:  # a bug of ours; the port must keep serving everybody else
            log.exception("dhcp %s:%d: internal error handling a datagram", *source)
            return
        if reply is not None and self.transport is not None:
            kind = MESSAGE_NAMES.get(reply.packet.message_type or 0, "?")
            log.info("dhcp %s: %s %s file %r to %s:%d", reply.packet.mac, kind, reply.packet.yiaddr,
                     reply.packet.options.get(BOOTFILE_NAME, b"").decode(), *reply.to)
            self.transport.sendto(reply.packet.encode(), reply.to)

    def error_received(self, exc: Exception) -> None:
        log.debug("dhcp: socket error: %s", exc)


class DhcpServer:
    """Listens on the DHCP port and the PXE port (4011) and answers with a Responder."""

    def __init__(self, booter: Booter, config: DhcpConfig, http_port: int) -> None:
        self.config = config
        self.responder = Responder(booter, config, http_port)
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port, pxe_port in ((self.config.port, False), (self.config.proxy_port, True)):
            sock = self._socket(port)
            transport, _ = await loop.create_datagram_endpoint(lambda p=pxe_port: _Endpoint(self, p), sock=sock)
            self._transports.append(transport)
        log.info("dhcp (%s mode): listening on ports %d and %d%s, answering as %s", self.config.mode,
                 *(a[1] for a in self.addresses), f" of {self.config.interface}" if self.config.interface else "",
                 self.config.server_address)

    def _socket(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)  # answers to clients without an address
            # Room for a rack powering on at once (the default holds ~50 full-size DHCP packets and drops
            # the rest); the kernel caps it at net.core.rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if self.config.interface:
                # Only this segment's broadcasts, and our broadcasts leave through it (needs CAP_NET_RAW).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.config.interface.encode())
            sock.bind(("0.0.0.0", port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise DhcpStartError(self._why(port, exc)) from None
        return sock

    def _why(self, port: int, exc: OSError) -> str:
        hint = ""
        if isinstance(exc, PermissionError):
            hint = (": run as root, or give bootserver CAP_NET_BIND_SERVICE (ports below 1024) and CAP_NET_RAW "
                    "(binding to an interface)")
        elif exc.errno == 19:  # ENODEV
            hint = f": no interface named {self.config.interface!r} ([dhcp] interface)"
        elif exc.errno == 98:  # EADDRINUSE
            hint = ": another DHCP server (dnsmasq? dhcpd?) holds it; use [dhcp] mode = \"proxy\" beside it " \
                   "on another machine, or stop it"
        return f"cannot listen for DHCP on port {port}: {exc.strerror or exc}{hint}"

    @property
    def addresses(self) -> list[Address]:
        """(host, port) of the DHCP port, then the PXE port, once started."""
        return [cast(Address, t.get_extra_info("sockname")[:2]) for t in self._transports]

    async def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        await asyncio.sleep(0)


class DhcpStartError(BootserverError):
    """The DHCP ports could not be opened; the message says what to change."""
