"""What the servers around the core may read of the configuration: one small, read-only view for each.

The core hands these out (Booter.web_settings, Booter.provision_settings) and makes them again on a reload, so
that the web app and the provisioner see a reloaded value from their next request or round on, and neither
reads the config itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from .config import Config, Listen


@dataclass(frozen=True)
class WebSettings:
    """Who may read and write through the pages and the API, and how much of the server a client may hold."""

    api_token: str | None  # None: the token made in data_dir/api_token
    data_dir: Path
    pages: str  # "public" | "token"
    origins: tuple[str, ...]  # (): this server's own names, below
    http: Listen
    public_address: str | None
    dhcp_address: str | None  # ours on the DHCP segment: another name browsers may reach us by
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    streams_per_client: int
    streams_total: int

    @classmethod
    def of(cls, config: Config) -> WebSettings:
        server = config.server
        dhcp_address = str(config.dhcp.server_address) if config.dhcp.server_address else None
        return cls(server.api_token, server.data_dir, server.pages, server.origins, server.http,
                   server.public_address, dhcp_address, server.trusted_proxies, server.streams_per_client,
                   server.streams_total)


@dataclass(frozen=True)
class ProvisionSettings:
    """How many jobs run at once and for how long, and what the sweep deletes."""

    concurrency: int  # [server] provision_concurrency
    per_source: int  # [server] provision_per_source
    job_seconds: float  # [server] job_minutes
    lease_seconds: float  # [server] job_lease_seconds
    phone_home_minutes: int
    event_days: int | None

    @classmethod
    def of(cls, config: Config) -> ProvisionSettings:
        server = config.server
        return cls(server.provision_concurrency, server.provision_per_source, server.job_minutes * 60,
                   server.job_lease_seconds, server.phone_home_minutes, server.event_days)
