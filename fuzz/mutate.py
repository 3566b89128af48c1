"""Mutation-based inputs: valid packets of each protocol (seeds), then a few random byte-level or
structural changes to each. Deterministic for a given seed, so a finding can be replayed."""

from __future__ import annotations

import json
import random
import struct
from ipaddress import IPv4Address

from bootserver.dhcp import DhcpPacket

# Values that break parsers: empty, huge, signed, off by one around every limit the code has.
NUMBERS = ["0", "1", "7", "8", "512", "1468", "65464", "65465", "65535", "65536", "-1", "+8", " 8", "1_000",
           "99999999999", "", "abc", "8\x00", "٣",
           "²", "9" * 20, "9223372036854775807", "9223372036854775808", "9" * 5000]  # isdigit() yet not int()
STRINGS = ["", ".", "..", "../../etc/passwd", "%2e%2e", "a" * 300, "\x00", "\xff", "ü", "\\", "/", "//",
           "${mac}", "{{ 7*7 }}", "'", '"', "<script>", "\r\n", "\t", "%00", "%", "?", "#", ";", "*"]
MACS = ["52-54-00-00-00-01", "52:54:00:00:00:02", "525400000003", "aa-bb-cc-dd-ee-ff", "ff-ff-ff-ff-ff-ff",
        "00-00-00-00-00-00", "52-54-00-00-40-01"]


class Mutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, items):  # noqa: ANN001, ANN201 - any sequence
        return self.rng.choice(items)

    def text(self) -> str:
        """A string a parser might choke on: a known-bad one, or random bytes decoded leniently."""
        if self.rng.random() < 0.6:
            return self.choice(STRINGS + NUMBERS + MACS)
        return self.rng.randbytes(self.rng.randint(0, 40)).decode("latin-1")

    def bytes(self, data: bytes, rounds: int | None = None) -> bytes:
        """`data` with 1-4 random byte-level changes."""
        buf = bytearray(data)
        for _ in range(rounds or self.rng.randint(1, 4)):
            self._once(buf)
        return bytes(buf)

    def _once(self, buf: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(9)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # an interesting byte
            buf[rng.randrange(len(buf))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0x2F, 0x2E, 0x25, 0x0A])
        elif op == 2:  # insert random bytes
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:  # delete a range
            del buf[at:at + rng.randint(1, 16)]
        elif op == 4 and buf:  # duplicate a range
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start:start + rng.randint(1, 64)]
        elif op == 5:  # truncate
            del buf[at:]
        elif op == 6:  # append junk, sometimes a lot
            buf += rng.randbytes(rng.choice([1, 8, 100, 600, 2000]))
        elif op == 7:  # insert a known-bad string
            buf[at:at] = self.text().encode("utf-8", "surrogateescape")
        elif buf:  # a 16-bit field set to an edge value
            i = rng.randrange(len(buf))
            buf[i:i + 2] = struct.pack("!H", rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 0xFFFF, 0x8000]))


# -- TFTP ------------------------------------------------------------------------------------------

TFTP_NAMES = ["boot.ipxe", "boot/52-54-00-00-00-01.ipxe", "boot/52-54-00-00-00-01.ipxe?platform=efi&arch=x86_64",
              "boot/52-54-00-00-00-02/efi/x86_64.ipxe", "boot/52-54-00-00-00-01/kernel",
              "boot/52-54-00-00-00-01/initrd", "boot/52-54-00-00-00-01/tok.en/bootserver.cpio", "undionly.kpxe",
              "ipxe.efi", "pxelinux.0", "small.txt", "sub/dir/file", "../bootserver.sqlite3", "/etc/passwd",
              "boot/../../keys/ssh_key", "nope"]
TFTP_OPTIONS = ["blksize", "tsize", "timeout", "windowsize", "BLKSIZE", "multicast", "x"]


def tftp_request(m: Mutator) -> bytes:
    """An RRQ (sometimes WRQ) with a plausible name, mode and options."""
    rng = m.rng
    opcode = 1 if rng.random() < 0.9 else 2
    name = m.choice(TFTP_NAMES) if rng.random() < 0.8 else m.text()
    mode = rng.choice(["octet"] * 8 + ["netascii", "OCTET", "mail", ""])
    packet = struct.pack("!H", opcode) + name.encode("utf-8", "surrogateescape") + b"\0" + mode.encode() + b"\0"
    for _ in range(rng.randint(0, 4)):
        value = m.choice(NUMBERS) if rng.random() < 0.8 else m.text()
        packet += f"{m.choice(TFTP_OPTIONS)}\0{value}\0".encode("utf-8", "surrogateescape")
    return packet


def tftp_other(m: Mutator) -> bytes:
    """What a client sends during a transfer, or what no client should send at all."""
    rng = m.rng
    kind = rng.randrange(5)
    if kind == 0:
        return struct.pack("!HH", 4, rng.choice([0, 1, 2, 65535, rng.randrange(65536)]))  # ACK
    if kind == 1:
        return struct.pack("!HH", 5, rng.randrange(9)) + m.text().encode("utf-8", "surrogateescape") + b"\0"  # ERROR
    if kind == 2:
        return struct.pack("!HH", 3, rng.randrange(65536)) + rng.randbytes(rng.choice([0, 10, 512]))  # DATA
    if kind == 3:
        return struct.pack("!H", 6) + b"blksize\0" + m.choice(NUMBERS).encode("utf-8", "surrogateescape") + b"\0"
    return rng.randbytes(rng.randint(0, 600))


def tftp_datagram(m: Mutator) -> bytes:
    seed = tftp_request(m) if m.rng.random() < 0.7 else tftp_other(m)
    return m.bytes(seed) if m.rng.random() < 0.6 else seed


# -- DHCP ------------------------------------------------------------------------------------------

PXE_BIOS = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0", 94: b"\x01\x02\x01", 97: b"\0" + bytes(16)}
PXE_UEFI = {60: b"PXEClient:Arch:00007:UNDI:003000", 93: b"\0\x07", 94: b"\x01\x03\x00", 97: b"\0" + bytes(16)}
IPXE = {**PXE_BIOS, 77: b"iPXE", 175: b"\xb1\x05\x01\x10\xec\x81\x39"}
HTTP_BOOT = {60: b"HTTPClient:Arch:00016:UNDI:003001", 93: b"\0\x10"}
PLAIN = {55: bytes([1, 3, 6, 12, 15])}
DHCP_KINDS = [1, 3, 3, 4, 7, 8, 1, 2, 5, 6]  # DISCOVER REQUEST REQUEST DECLINE RELEASE INFORM ... and replies


def dhcp_packet(m: Mutator, macs: list[str]) -> bytes:
    rng = m.rng
    options = dict(rng.choice([PXE_BIOS, PXE_UEFI, IPXE, HTTP_BOOT, PLAIN]))
    options[53] = bytes([rng.choice(DHCP_KINDS)])
    if rng.random() < 0.3:
        options[50] = IPv4Address(rng.choice(["127.0.0.100", "127.0.0.150", "127.0.0.250", "10.0.0.1"])).packed
    if rng.random() < 0.2:
        options[54] = IPv4Address("127.0.0.1").packed
    for _ in range(rng.choice([0, 0, 1, 3])):  # random options, some longer than 255 (split, RFC 3396)
        options[rng.randint(1, 254)] = rng.randbytes(rng.choice([0, 1, 2, 4, 16, 300]))
    if rng.random() < 0.05:
        options[52] = bytes([rng.randint(0, 4)])  # overload into file/sname
    packet = DhcpPacket(op=1, xid=rng.getrandbits(32), chaddr=bytes.fromhex(rng.choice(macs).replace(":", "")),
                        options=options, secs=rng.randrange(65536), flags=rng.choice([0, 0x8000]),
                        ciaddr=IPv4Address(rng.choice(["0.0.0.0", "0.0.0.0", "127.0.0.120"])),
                        giaddr=IPv4Address("0.0.0.0"))
    wire = packet.encode()
    return m.bytes(wire) if rng.random() < 0.5 else wire


# -- HTTP ------------------------------------------------------------------------------------------

PATHS = ["/", "/boot.ipxe", "/boot/{mac}.ipxe", "/boot/{mac}.ipxe?platform=efi&arch=x86_64&uuid={x}",
         "/boot/{mac}/kernel", "/boot/{mac}/initrd", "/boot/{mac}/{x}", "/boot/{mac}/{token}/config.json",
         "/boot/{mac}/{token}/bootserver.cpio", "/ipxe/undionly.kpxe", "/ipxe/{x}", "/healthz", "/metrics",
         "/machines/{mac}", "/?state={x}", "/api/v1/machines", "/api/v1/machines?state={x}",
         "/api/v1/machines/{mac}", "/api/v1/machines/{mac}/events?after={n}", "/api/v1/openapi.json",
         "/api/v1/machines/{mac}/events?after={n}&limit={n}", "/api/v1/machines?limit={n}&after={x}",
         "/stream?after={n}", "/machines/{mac}/stream?after={n}", "/{x}"]
POSTS = ["/boot/{mac}/phone-home", "/api/v1/machines/{mac}/reprovision", "/api/v1/machines/{mac}/boot-from-disk",
         "/machines/{mac}/reprovision"]
HEADERS = ["Range: bytes={n}-", "Range: bytes=-{n}", "Range: bytes={n}-{n}", "Accept: text/event-stream",
           "Authorization: Bearer {x}", "Origin: http://{x}", "Sec-Fetch-Site: cross-site", "Cookie: {x}",
           "Transfer-Encoding: chunked", "Content-Type: application/json", "Expect: 100-continue",
           "X-{x}: {x}", "Host: {x}", "If-Modified-Since: {x}", "Content-Length: {n}", "Last-Event-ID: {n}",
           "Origin: http://127.0.0.1", "Sec-Fetch-Site: same-origin"]
# Bodies whose nesting is deeper than json.loads can recurse (a RecursionError was a 500).
DEEP_BODIES = [b"[" * 60_000, b'{"a":' * 30_000, b"[" * 1000 + b"]" * 1000]


def fill(m: Mutator, template: str, token: str) -> str:
    rng = m.rng
    return (template.replace("{mac}", m.choice(MACS) if rng.random() < 0.8 else m.text())
            .replace("{token}", token if rng.random() < 0.5 else m.text())
            .replace("{n}", m.choice(NUMBERS)).replace("{x}", m.text()))


def phone_home_body(m: Mutator, token: str) -> bytes:
    rng = m.rng
    body: dict[str, object] = {"token": token, "ip": rng.choice(["127.0.0.1", "10.0.2.15", "::1", "x"]),
                               "host_key": rng.choice(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGj0", "x", ""]),
                               "disks": [{"name": "vda", "size_bytes": 1 << 30, "partitions": 0}]}
    for key in rng.sample(sorted(body), rng.randint(0, 2)):
        body[key] = rng.choice([None, 0, -1, [], {}, m.text(), [m.text()] * 50])
    if rng.random() < 0.05:
        return m.choice(DEEP_BODIES)
    data = json.dumps(body).encode()
    return m.bytes(data) if rng.random() < 0.3 else data


def http_request(m: Mutator, token: str) -> bytes:
    """One request as bytes: built from a route template with hostile pieces, sometimes mangled whole."""
    rng = m.rng
    post = rng.random() < 0.25
    method = "POST" if post else rng.choice(["GET"] * 8 + ["HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "GE T"])
    path = fill(m, m.choice(POSTS if post else PATHS), token)
    lines = [f"{method} {path} HTTP/1.{rng.choice([1, 1, 1, 0])}", "Host: 127.0.0.1"]
    lines += [fill(m, m.choice(HEADERS), token) for _ in range(rng.choice([0, 0, 1, 2, 5]))]
    body = phone_home_body(m, token) if post else b""
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in lines):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    return m.bytes(data) if rng.random() < 0.3 else data
