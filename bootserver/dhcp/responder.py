"""What to answer: one request in, zero or one reply out, no sockets.

    proxy  answer PXE clients' DISCOVERs (and their requests on port 4011) with the boot file only
    full   also hand out addresses from the pool or a [machines] reservation (`Leases`)

What a machine boots, and whether it may, is the Booter's decision (`Booter.dhcp_boot`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address

from ..booter import Booter, DhcpBoot, Urls
from ..config import DhcpConfig
from .client import Client, describe
from .leases import DECLINED_SECONDS, Leases
from .packet import (
    ACK,
    BOOTFILE_NAME,
    BOOTREPLY,
    BOOTREQUEST,
    CLIENT_GUID,
    CLIENT_PORT,
    DECLINE,
    DISCOVER,
    DNS_SERVERS,
    DOMAIN_NAME,
    END,
    HOSTNAME,
    INFORM,
    LEASE_TIME,
    MESSAGE_TYPE,
    NAK,
    OFFER,
    REBINDING_TIME,
    RELEASE,
    RENEWAL_TIME,
    REQUEST,
    REQUESTED_IP,
    ROUTER,
    SERVER_ID,
    SUBNET_MASK,
    VENDOR_CLASS,
    VENDOR_OPTIONS,
    Address,
    DhcpPacket,
)

log = logging.getLogger(__package__)  # one logger for the package: "bootserver.dhcp"

# PXE option 43, sub-option 6 (discovery control) = 8: boot the file named in this offer; no menu,
# no boot-server discovery (UEFI firmware would otherwise go on to ask port 4011).
PXE_SKIP_DISCOVERY = bytes([6, 1, 8, END])


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
        hostname = self.booter.configured_hostname(mac)
        if hostname:
            reply.options[HOSTNAME] = hostname.encode()  # the [machines] name, so the OS takes it

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
