"""TFTP file names onto the Booter: the only module of the package that knows the core."""

from __future__ import annotations

import re
import socket
from urllib.parse import parse_qs

from ..booter import GRUB, Booter, Urls
from ..firmware import IPXE_BINARIES, SECURE_BOOT_BINARIES
from ..overlay import OVERLAY_NAME
from ..payload import Payload
from .session import Transfer
from .wire import Address

_MACHINE_SCRIPT = re.compile(r"boot/([^/]+)\.ipxe")
_MACHINE_SCRIPT_WITH_FACTS = re.compile(r"boot/([^/]+)/([^/]*)/([^/]*)\.ipxe")  # mac/platform/arch
_INSTALLER_FILE = re.compile(r"boot/([^/]+)/files/([^/]+)")
_BOOT_FILE = re.compile(r"boot/([^/]+)/([^/]+)")
_OVERLAY = re.compile(r"boot/([^/]+)/([^/]+)/" + re.escape(OVERLAY_NAME))  # mac/token
_GRUB_CONFIG = re.compile(r"grub/([^/]+)\.cfg")  # a Secure Boot machine's own, by the MAC GRUB knows it by


class Routes:
    """The same boot paths HTTP serves, for firmware that speaks only TFTP, then the TFTP root.

        boot.ipxe, boot/{mac}.ipxe, boot/{mac}/{platform}/{arch}.ipxe, boot/{mac}/{asset},
        boot/{mac}/files/{name} (an installer file: before the scripts, whose {platform} is never "files"),
        boot/{mac}/{token}/bootserver.cpio,
        iPXE binaries by name; the Secure Boot chain: shimx64.efi, grubx64.efi, grub/grub.cfg, grub/{mac}.cfg;
        then files under data_dir/tftp

    iPXE drops the query string of tftp:// URIs, so the bootstrap puts the facts in the path.
    """

    def __init__(self, booter: Booter, public_address: str | None, http_port: int) -> None:
        self.booter = booter
        self.public_address = public_address
        self.http_port = http_port
        self.tftp_port = 69  # set once the server is bound: scripts point back at the real port

    def resolve(self, filename: str, peer: Address) -> Payload:
        path, _, query = filename.lstrip("/").partition("?")
        if path == "boot.ipxe":
            return self.booter.bootstrap(self._urls(peer))
        if match := _INSTALLER_FILE.fullmatch(path):
            return self.booter.installer_file(match[1], match[2], self._urls(peer), "tftp", client_ip=peer[0])
        if match := _MACHINE_SCRIPT.fullmatch(path):
            facts = {k: v[-1] for k, v in parse_qs(query).items()}
            return self.booter.machine_script(match[1], facts, self._urls(peer), "tftp", client_ip=peer[0])
        if match := _MACHINE_SCRIPT_WITH_FACTS.fullmatch(path):
            facts = {"platform": match[2], "arch": match[3]}
            return self.booter.machine_script(match[1], facts, self._urls(peer), "tftp", client_ip=peer[0])
        if match := _BOOT_FILE.fullmatch(path):
            return self.booter.boot_file(match[1], match[2])
        if match := _OVERLAY.fullmatch(path):
            return self.booter.overlay(match[1], match[2], self._urls(peer))
        if path in IPXE_BINARIES:
            return self.booter.ipxe_binary(path, client_ip=peer[0])
        if path in SECURE_BOOT_BINARIES:
            return self.booter.secure_boot_binary(path, client_ip=peer[0])
        if path == "grub/grub.cfg":
            return self.booter.grub_bootstrap()
        if match := _GRUB_CONFIG.fullmatch(path):
            return self.booter.machine_script(match[1], {"platform": "efi"}, self._urls(peer), "tftp",
                                              client_ip=peer[0], loader=GRUB)
        return self.booter.tftp_file(path)

    def record(self, transfer: Transfer) -> None:
        if transfer.payload is not None:
            self.booter.file_sent(transfer.payload, "tftp", transfer.bytes_sent, transfer.seconds, transfer.error)

    def _urls(self, peer: Address) -> Urls:
        host = self.public_address or local_address_towards(peer[0])
        host = f"[{host}]" if ":" in host else host
        return Urls(files=f"tftp://{host}:{self.tftp_port}", api=f"http://{host}:{self.http_port}")


def local_address_towards(peer_host: str) -> str:
    """Our address on the route to `peer_host`: connecting a UDP socket picks it and sends nothing."""
    family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_host, 9))
        return probe.getsockname()[0]
