"""The DHCP sockets: the DHCP port and the PXE port (4011), answered by a `Responder`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from ..config import DhcpConfig
from ..errors import BootserverError, StoreUnavailable
from .packet import BOOTFILE_NAME, MESSAGE_NAMES, Address, MalformedPacket
from .responder import Responder

if TYPE_CHECKING:
    from ..booter import Booter

log = logging.getLogger(__package__)  # one logger for the package: "bootserver.dhcp"


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
