"""Router advertisements for the lab's switch (runs inside its namespace): `python -m bootserver.tools.advertise TAP`.

iPXE configures IPv6 beside DHCPv4 and, on a segment without a router, waits about 16 s for one before it
fetches anything. An RA with router lifetime 0 and no prefix ends that wait and configures nothing.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time

ROUTER_SOLICITATION, ROUTER_ADVERTISEMENT = 133, 134
ICMP6_FILTER = 1  # <netinet/icmp6.h>; Python does not export it
# Type 134, code 0, checksum (the kernel fills it in), hop limit 64, no M/O flags, router lifetime 0
# (not a default router), reachable time and retransmit timer unspecified; no prefix: nothing to configure.
ADVERTISEMENT = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 64, 0, 0, 0, 0)


def advertise(interface: str, every: float = 3.0, until: float | None = None) -> None:
    """Send an RA now, every `every` seconds, and in answer to each router solicitation."""
    index = socket.if_nametoindex(interface)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # RFC 4861: else it is dropped
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _pass_only(ROUTER_SOLICITATION))
        sent = 0.0
        while until is None or time.monotonic() < until:
            solicited = select.select([sock], [], [], 1.0)[0] and sock.recv(1500)[:1] == bytes([ROUTER_SOLICITATION])
            if solicited or time.monotonic() - sent >= every:
                try:
                    sock.sendto(ADVERTISEMENT, ("ff02::1", 0, 0, index))
                    sent = time.monotonic()
                except OSError as exc:  # no link-local address yet (the interface just came up): next time
                    print(f"router advertisement not sent: {exc}", file=sys.stderr, flush=True)


def _pass_only(icmp_type: int) -> bytes:
    """An ICMP6_FILTER: 256 bits, a set bit blocks that type; everything blocked but `icmp_type`."""
    words = [0xFFFFFFFF] * 8
    words[icmp_type >> 5] &= ~(1 << (icmp_type & 31))
    return struct.pack("=8I", *words)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bootserver.tools.advertise INTERFACE  (run by `bootserver lab up`)")
    advertise(sys.argv[1])
