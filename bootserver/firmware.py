"""What a firmware gets: the iPXE binary for its architecture, named in a DHCP answer or fetched by name.

Pure decisions on what a client said (DHCP option 93, its vendor and user class); the core records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import NotFound
from .payload import Payload

# The iPXE binary a firmware gets, by DHCP option 93 client architecture (RFC 4578, IANA registry).
# 7 and 9 are both x86-64 UEFI in practice (RFC 4578 had them swapped).
FIRMWARE_BINARIES = {
    0: "undionly.kpxe",  # BIOS: uses the NIC's own UNDI driver
    7: "ipxe.efi",
    9: "ipxe.efi",
    11: "snponly-arm64.efi",  # arm64: the all-drivers build does not work there
    16: "ipxe.efi",  # x86-64 UEFI HTTP boot
}

# UEFI HTTP-boot architectures (option 93) -> the PXE architecture whose iPXE binary they get.
HTTP_BOOT_ARCHES = {15: 6, 16: 7, 19: 11}

# Every iPXE binary we hand out by name, over TFTP or HTTP, from server.ipxe_dir.
IPXE_BINARIES = frozenset(FIRMWARE_BINARIES.values()) | {"snponly.efi", "undionly.kkpxe", "ipxe.pxe"}

# The signed chain for Secure Boot machines, whose firmware refuses Debian's unsigned iPXE: Debian's shim
# (shim-signed, signed by Microsoft's UEFI CA), which loads "grubx64.efi" from the directory it came from: Debian's
# signed network GRUB (grub-efi-amd64-signed's grubnetx64.efi) under that name. From server.secure_boot_files.
SHIM = "shimx64.efi"
SECURE_BOOT_BINARIES = frozenset({SHIM, "grubx64.efi"})
SECURE_BOOT_ARCHES = frozenset({7, 9, 16})  # x86-64 UEFI, PXE and HTTP boot: what Debian's shim and GRUB run on


@dataclass(frozen=True)
class DhcpBoot:
    """What DHCP tells one machine to boot: a TFTP file name, an http:// URL, or nothing (an address only)."""

    bootfile: str | None
    http: bool = False  # a UEFI HTTP-boot client: the reply must say option 60 "HTTPClient"
    reason: str = ""


def firmware_binary(client_arch: int) -> str:
    """The iPXE binary to chainload for a PXE firmware of this option-93 architecture."""
    try:
        return FIRMWARE_BINARIES[client_arch]
    except KeyError:
        raise NotFound(f"no iPXE binary for client architecture {client_arch}") from None


def dhcp_answer(client_arch: int | None, is_ipxe: bool, http_client: bool, api_url: str,
                secure_boot: bool = False) -> DhcpBoot:
    """What a DHCP client we answer is told to boot: firmware gets an iPXE binary by name over TFTP, a UEFI
    HTTP-boot client gets it as a URL, iPXE itself gets the bootstrap script (or it would chainload itself
    forever). `client_arch` None: not a PXE client (an OS's own DHCP client), which gets an address only.
    `secure_boot`: an x86-64 UEFI firmware gets the signed shim instead of iPXE (others have no such chain)."""
    if is_ipxe:
        return DhcpBoot(f"{api_url}/boot.ipxe", reason="iPXE: the bootstrap script")
    if client_arch is None:
        return DhcpBoot(None, reason="not a PXE client: an address only")
    http = http_client or client_arch in HTTP_BOOT_ARCHES
    if secure_boot and client_arch in SECURE_BOOT_ARCHES:
        if http:
            return DhcpBoot(f"{api_url}/secureboot/{SHIM}", http=True,
                            reason=f"UEFI HTTP boot, Secure Boot: {SHIM} (signed) over HTTP")
        return DhcpBoot(SHIM, reason=f"PXE firmware, architecture {client_arch}, Secure Boot: {SHIM} (signed) "
                                     "over TFTP")
    try:
        name = firmware_binary(HTTP_BOOT_ARCHES.get(client_arch, client_arch))
    except NotFound as exc:
        return DhcpBoot(None, reason=f"no boot file: {exc}")
    if http:
        return DhcpBoot(f"{api_url}/ipxe/{name}", http=True, reason=f"UEFI HTTP boot: {name} over HTTP")
    return DhcpBoot(name, reason=f"PXE firmware, architecture {client_arch}: {name} over TFTP")


def ipxe_binary(name: str, ipxe_dir: Path) -> Payload:
    """An iPXE binary for chainloading, from the configured iPXE directory."""
    return _firmware_file(name, ipxe_dir, IPXE_BINARIES, "an iPXE binary bootserver serves",
                          "install Debian's ipxe package or set server.ipxe_dir")


def secure_boot_binary(name: str, directory: Path) -> Payload:
    """The signed shim or GRUB, from the Secure Boot directory."""
    return _firmware_file(name, directory, SECURE_BOOT_BINARIES, "a file of the Secure Boot chain",
                          "run `bootserver image secureboot` (Debian's signed shim and GRUB)")


def _firmware_file(name: str, directory: Path, names: frozenset[str], what: str, remedy: str) -> Payload:
    """One of `names` from `directory`; any other name is not ours, whatever the directory holds."""
    if name not in names:
        raise NotFound(f"{name!r} is not {what}")
    path = directory / name
    if not path.is_file():
        raise NotFound(f"{path} is missing: {remedy}")
    return Payload(name, path=path)
