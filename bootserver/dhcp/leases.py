"""The leases of full mode: which address each client gets, kept by the core."""

from __future__ import annotations

import time
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from ..config import DhcpConfig

if TYPE_CHECKING:
    from ..booter import Booter

DECLINED_SECONDS = 600  # an address a client found in use is held back this long
OFFER_SECONDS = 60  # an offered address is held for the client this long before it must ask for it


class Leases:
    """Which address each client gets: its [machines] reservation, else one from the pool.

    Reserved addresses are never handed to anyone else, even when they lie inside the pool. The
    store does each allocation in one transaction, so an address is never handed out twice.
    """

    def __init__(self, booter: Booter, config: DhcpConfig) -> None:
        self.booter = booter
        self.config = config
        self.reserved = booter.reserved_addresses()
        assert config.pool is not None
        first, last = (int(a) for a in config.pool)
        taken = set(self.reserved.values())
        self.pool = [str(IPv4Address(n)) for n in range(first, last + 1) if str(IPv4Address(n)) not in taken]

    def candidates(self, mac: str) -> list[str]:
        reserved = self.reserved.get(mac)
        return [str(reserved)] if reserved is not None else self.pool

    def offer(self, mac: str) -> IPv4Address | None:
        ip = self.booter.offer_lease(mac, self.candidates(mac), time.time() + OFFER_SECONDS)
        return IPv4Address(ip) if ip else None

    def bind(self, mac: str, ip: IPv4Address) -> bool:
        if str(ip) not in self.candidates(mac):
            return False
        return self.booter.bind_lease(mac, str(ip), time.time() + self.config.lease_seconds)

    def release(self, mac: str, ip: IPv4Address | None = None) -> bool:
        return self.booter.release_lease(mac, str(ip) if ip is not None else None)

    def decline(self, mac: str, ip: IPv4Address) -> bool:
        return self.booter.decline_lease(mac, str(ip), time.time() + DECLINED_SECONDS)
