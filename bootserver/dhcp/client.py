"""What a request tells about the machine that sent it: `Client.of`, and `describe` for the event log."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from .packet import (
    CLIENT_ARCH,
    CLIENT_GUID,
    CLIENT_NDI,
    IPXE_ENCAPSULATED,
    MESSAGE_NAMES,
    USER_CLASS,
    VENDOR_CLASS,
    DhcpPacket,
)


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
