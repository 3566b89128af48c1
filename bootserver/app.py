"""The app object: config, store and core, plus the protocol servers that feed the core.

No global state: everything a request needs hangs off one App, built by App.open(config).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from aiohttp import web

from . import dhcp, http, tftp
from .booter import Booter
from .config import Config
from .jobs import Provisioner
from .pki import ServerKeys
from .store import Store
from .templates import Templates

log = logging.getLogger(__name__)

# Idle keep-alive sockets are closed after this many seconds, so they cannot pile up.
KEEPALIVE_TIMEOUT = 15.0


@dataclass
class App:
    config: Config
    store: Store
    booter: Booter
    provisioner: Provisioner
    _runner: web.AppRunner | None = field(default=None, repr=False)
    _tftp: tftp.TftpServer | None = field(default=None, repr=False)
    _dhcp: dhcp.DhcpServer | None = field(default=None, repr=False)

    @classmethod
    def open(cls, config: Config) -> App:
        config.server.data_dir.mkdir(parents=True, exist_ok=True)
        config.server.tftp_root.mkdir(exist_ok=True)
        store = Store(config.server.database)
        keys = ServerKeys.load_or_create(config.server.data_dir / "keys")
        booter = Booter(config, store, Templates(config.server.templates_dir), keys)
        provisioner = Provisioner(booter)
        booter.on_phoned_home = provisioner.schedule
        return cls(config, store, booter, provisioner)

    async def start(self) -> None:
        server = self.config.server
        self.provisioner.start()
        self._runner = web.AppRunner(http.create_app(self.booter, server.public_address),
                                     keepalive_timeout=KEEPALIVE_TIMEOUT, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, server.http.host, server.http.port).start()
        if server.tftp is not None:
            routes = tftp.Routes(self.booter, server.public_address, self.http_port)
            self._tftp = tftp.TftpServer(routes.resolve, routes.record)
            await self._tftp.start(server.tftp.host, server.tftp.port)
            routes.tftp_port = self._tftp.address[1]
        if self.config.dhcp.mode != "off":
            self._dhcp = dhcp.DhcpServer(self.booter, self.config.dhcp, self.http_port)
            await self._dhcp.start()
        log.info("serving HTTP on %s, TFTP on %s, data in %s", self.http_address,
                 self._tftp.address if self._tftp else "(off)", server.data_dir)

    @property
    def http_address(self) -> tuple[str, int]:
        assert self._runner is not None, "App.start() first"
        return self._runner.addresses[0][:2]

    @property
    def http_port(self) -> int:
        """The HTTP port machines are told about: the bound one once started, else the configured one."""
        return self.http_address[1] if self._runner else self.config.server.http.port

    @property
    def tftp_address(self) -> tuple[str, int]:
        assert self._tftp is not None, "TFTP is off or App.start() was not called"
        return self._tftp.address

    @property
    def dhcp_addresses(self) -> list[tuple[str, int]]:
        """The DHCP port, then the PXE port (4011); empty when [dhcp] mode is off."""
        return self._dhcp.addresses if self._dhcp else []

    async def stop(self) -> None:
        await self.provisioner.stop()
        if self._dhcp is not None:
            await self._dhcp.close()
        if self._tftp is not None:
            await self._tftp.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.store.close()

    async def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
