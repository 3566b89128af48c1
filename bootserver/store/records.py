"""What the store returns: machines, events, tokens, leases and jobs as frozen records, made from its rows."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Node:
    """A machine as the store knows it: what it reported and how far it got."""

    mac: str
    state: str
    first_seen: float
    last_seen: float
    facts: dict[str, str] = field(default_factory=dict)
    host_key: str | None = None  # pinned when it phoned home; SSH trusts only this key
    ip: str | None = None  # the address it reported when it phoned home
    reprovision: bool = False  # an operator asked for the whole flow again, disk wipe allowed
    window_until: float | None = None  # until when an operator's approval lets it be provisioned
    held: str | None = None  # why its claims are held (two addresses claimed it): an operator must approve
    os_host_key: str | None = None  # the installed OS's SSH host key, made by the server and pinned at install


@dataclass
class Committed:
    """What group_commit() yields: await it before answering."""

    batches: list[asyncio.Future[None]] = field(default_factory=list)  # empty: nothing to wait for

    def __await__(self) -> Any:
        for batch in self.batches:
            # Shielded: a cancelled request must not cancel the COMMIT every other request waits on.
            yield from asyncio.shield(batch).__await__()


@dataclass(frozen=True)
class Listed:
    """A machine as a sorted list needs it, before the page is cut: what it sorts by."""

    mac: str
    state: str
    ip: str | None
    last_seen: float


@dataclass(frozen=True)
class Member:
    """A machine as a group's member list needs it: where it is, and the facts that pick its group."""

    mac: str
    ip: str | None
    arch: str | None
    platform: str | None


@dataclass(frozen=True)
class Token:
    """A one-time phone-home token: the secret itself is never stored, only its hash."""

    id: str
    hash: str
    mac: str
    issued: float
    expires: float
    used: float | None = None
    ip: str | None = None  # who fetched the script it was issued with; None: not known (any address)
    uuid: str | None = None  # the SMBIOS UUID the firmware reported with that script, if it did
    purpose: str = "boot"  # "boot": rides on an agent's boot script; "report": on an installed OS's disk


@dataclass(frozen=True)
class Lease:
    """An address held by a DHCP client: `offered` until it asks for it, `bound` once acknowledged.

    `declined` addresses (a client found them in use) have no MAC and are held back until `expires`.
    """

    ip: str
    mac: str | None
    state: str
    expires: float


@dataclass(frozen=True)
class Event:
    """One thing that happened to a machine: a script served, a file sent, a report received."""

    id: int
    mac: str
    time: float
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    replica: str | None = None  # the server that recorded it (None: recorded before replicas existed)


@dataclass(frozen=True)
class JobClaim:
    """A provisioning job as one replica holds it: until `lease_until`, renewed while it works."""

    mac: str
    owner: str | None
    attempt: int
    lease_until: float | None
    taken_over_from: str | None = None  # claimed because this replica's lease lapsed (it died)
    state: str = "running"  # queued, running or done


def lease(row: Any) -> Lease:
    return Lease(row["ip"], row["mac"], row["state"], row["expires"])


def node(row: Any) -> Node:
    return Node(row["mac"], row["state"], row["first_seen"], row["last_seen"], json.loads(row["facts"]),
                row["host_key"], row["ip"], bool(row["reprovision"]), row["window_until"], row["held"],
                row["os_host_key"])


def token(row: Any) -> Token:
    return Token(row["id"], row["hash"], row["mac"], row["issued"], row["expires"], row["used"], row["ip"], row["uuid"],
                 row["purpose"])


def event(row: Any) -> Event:
    return Event(row["id"], row["mac"], row["time"], row["kind"], json.loads(row["detail"]), row["replica"])


def job(row: Any) -> JobClaim:
    return JobClaim(row["mac"], row["owner"], row["attempt"], row["lease_until"], state=row["state"])
