"""DHCPv4 for network boot, on asyncio: proxyDHCP beside another server, or a full DHCP server.

Protocols: RFC 2131/2132 (DHCP and its options), RFC 3396 (long options split over several), RFC 4578
(options 93/94/97 of PXE clients), the PXE 2.1 specification (proxyDHCP, port 4011, option 43), and
iPXE's own markers (option 175, user class "iPXE").

    proxy  Another server hands out addresses. We answer only PXE clients' DISCOVERs, with an OFFER
           that has no address (yiaddr 0.0.0.0), only the boot file, next-server and "PXEClient";
           clients that then ask us on port 4011 (PXE boot-server discovery) get an ACK with the same.
    full   We are the segment's DHCP server: addresses from the pool or a [machines] reservation,
           leases kept in the store, and the boot file for PXE clients in the same answer.

Layout, bottom to top:

    packet.py     the wire codec (`DhcpPacket`, option codes)
    client.py     what a client is (`Client.of`) and what it said (`describe`, for the event log)
    leases.py     the leases of full mode (`Leases`), kept in the store
    responder.py  the answers (`Responder`: packets in, packets out, no sockets)
    server.py     the sockets (`DhcpServer`)

What a machine boots, and whether it may, is the Booter's decision (`dhcp_boot`), asked by the responder.
"""

from .client import Client, describe
from .leases import Leases
from .packet import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    DECLINE,
    DISCOVER,
    INFORM,
    MESSAGE_NAMES,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    DhcpPacket,
    MalformedPacket,
)
from .responder import Reply, Responder
from .server import DhcpServer, DhcpStartError

__all__ = [
    "ACK",
    "BOOTREPLY",
    "BOOTREQUEST",
    "DECLINE",
    "DISCOVER",
    "INFORM",
    "MESSAGE_NAMES",
    "NAK",
    "OFFER",
    "RELEASE",
    "REQUEST",
    "Client",
    "DhcpPacket",
    "DhcpServer",
    "DhcpStartError",
    "Leases",
    "MalformedPacket",
    "Reply",
    "Responder",
    "describe",
]
