"""A PXE client's first DHCP message, for tests that run it inside a network namespace (`ip netns exec`).

    python tests/support/dhcp_client.py IFACE MAC bios|ipxe [SECONDS]

Broadcasts a DISCOVER from port 68 on IFACE, as firmware does, and prints the first reply to it as one JSON
line (header fields, message type, options as text or hex); prints `null` when nothing came within SECONDS.
The codec is bootserver's own (tests/test_dhcp.py cross-checks it with scapy).
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootserver.dhcp import DISCOVER, DhcpPacket, MalformedPacket  # noqa: E402

BIOS_PXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0", 94: b"\x01\x02\x01"}
KINDS = {"bios": BIOS_PXE, "ipxe": {**BIOS_PXE, 77: b"iPXE", 175: b"\xb1\x05\x01\x10\xec\x81\x39"}}


def discover(interface: str, mac: str, kind: str, seconds: float) -> DhcpPacket | None:
    request = DhcpPacket(op=1, xid=secrets.randbits(32), chaddr=bytes.fromhex(mac.replace(":", "")),
                         flags=0x8000, options={53: bytes([DISCOVER]), **KINDS[kind]})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", 68))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.sendto(request.encode(), ("255.255.255.255", 67))  # again each second, as firmware retries
            sock.settimeout(min(left, 1.0))
            try:
                while True:
                    reply = DhcpPacket.parse(sock.recv(2048))
                    if reply.op == 2 and reply.xid == request.xid:
                        return reply
            except (TimeoutError, MalformedPacket):
                continue
    return None


def as_json(packet: DhcpPacket | None) -> str:
    if packet is None:
        return "null"
    options = {str(code): value.decode() if value.isascii() and value.decode().isprintable() else value.hex()
               for code, value in packet.options.items()}
    return json.dumps({"message_type": packet.message_type, "yiaddr": str(packet.yiaddr),
                       "siaddr": str(packet.siaddr), "giaddr": str(packet.giaddr), "file": packet.file.decode(),
                       "options": options})


if __name__ == "__main__":
    interface, mac, kind = sys.argv[1:4]
    print(as_json(discover(interface, mac, kind, float(sys.argv[4]) if len(sys.argv) > 4 else 5.0)))
