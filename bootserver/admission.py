"""Who may be provisioned, and what from the boot network we believe: the core's trust decisions.

The boot network is hostile ground: anything on it can claim any MAC and send any report. So:
- a boot gets a phone-home token only while its machine's provisioning window is open (`[server] enroll`);
- an address that enters from outside is parsed strictly (no scope ids, one canonical spelling);
- what the firmware reported (its SMBIOS UUID) must be what the booted agent reports;
- one source address may introduce only so many new machines a minute (each is a row in the store).
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from .config import Config
from .errors import BadRequest
from .lifecycle import EXPECTS_BOOT
from .store import Node

# UUIDs that firmware reports when it has none: the same on every such machine, so they identify nothing.
NO_UUIDS = frozenset({str(uuid.UUID(int=0)), str(uuid.UUID(int=(1 << 128) - 1))})


def strict_ip(value: object, what: str = "ip") -> str:
    """An IPv4 or IPv6 address in its one canonical spelling; BadRequest for anything else (scope ids too:
    they may hold any character, and end up in other machines' config files)."""
    text = str(value) if isinstance(value, str) else ""
    try:
        if "%" in text:
            raise ValueError
        address = ipaddress.ip_address(text)
    except ValueError:
        raise BadRequest(f"{what} is not an IP address (IPv4, or IPv6 without a scope): {text[:64]!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's IPv4 client
    return str(address)


def canonical_uuid(value: object) -> str | None:
    """A reported SMBIOS UUID in lower-case canonical form; None when absent or one of the "no UUID" values."""
    if not isinstance(value, str) or not value:
        return None
    try:
        text = str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"uuid is not a UUID: {value[:64]!r}") from None
    return None if text in NO_UUIDS else text


def same_uuid(a: str, b: str) -> bool:
    """One machine's UUID as two readers print it. SMBIOS 2.6 made the first three fields little-endian;
    readers that predate it print them byte-swapped, so both orders of those fields name one machine."""
    first, second = uuid.UUID(a), uuid.UUID(b)
    return first == second or first.bytes_le == second.bytes


@dataclass(frozen=True)
class Window:
    """Whether a boot of a machine may receive a token now, and if not, why (in words for its console)."""

    open: bool
    reason: str = ""


def window(config: Config, mac: str, node: Node | None, now: float | None = None) -> Window:
    """The machine's provisioning window under `[server] enroll`.

    open: any machine a group matches, while its state expects a boot. known: only [machines]. approve: only
    while an operator's approval lasts (closed by the first accepted phone-home). Never while its claims are
    held (two addresses claimed it), and never for a deployed machine that nobody asked to reprovision.
    """
    now = now or time.time()
    if node is not None and node.held:
        return Window(False, f"held: {node.held}; an operator must approve it (bootserver approve {mac})")
    if node is not None and node.state not in EXPECTS_BOOT and not node.reprovision:
        return Window(False, f"{node.state}: no new boot of it is expected (bootserver reprovision {mac})")
    mode = config.server.enroll
    if mode == "known" and mac not in config.machines:
        return Window(False, "not in [machines] and [server] enroll is \"known\"")
    if mode == "approve" and (node is None or node.window_until is None or node.window_until <= now):
        return Window(False, f"waiting for approval ([server] enroll is \"approve\": bootserver approve {mac})")
    return Window(True)


@dataclass
class _Window:
    """One key's events in the window, oldest first, and the items they counted (each once)."""

    times: deque[tuple[float, str | None]] = field(default_factory=deque)
    items: set[str] = field(default_factory=set)


class RateLimit:
    """At most `limit` events per key in any `seconds`: a sliding window of timestamps per key. An event may name
    what it counts (`item`): one already counted in the window is allowed again without counting twice."""

    def __init__(self, limit: int, seconds: float = 60.0, max_keys: int = 65536) -> None:
        self.limit = limit
        self.seconds = seconds
        self._max_keys = max_keys
        self._seen: dict[str, _Window] = {}

    def allow(self, key: str, now: float | None = None, item: str | None = None) -> bool:
        now = now or time.monotonic()
        window = self._seen.get(key)
        if window is None:
            if len(self._seen) >= self._max_keys:
                self._forget_idle(now)
            window = self._seen[key] = _Window()
        times = window.times
        while times and times[0][0] <= now - self.seconds:
            _, counted = times.popleft()
            if counted is not None:
                window.items.discard(counted)
        if item is not None and item in window.items:
            return True
        if len(times) >= self.limit:
            return False
        times.append((now, item))
        if item is not None:
            window.items.add(item)
        return True

    def _forget_idle(self, now: float) -> None:
        """Bound the memory a flood of source addresses can take: keys with nothing in the window go."""
        for key in [k for k, w in self._seen.items() if not w.times or w.times[-1][0] <= now - self.seconds]:
            del self._seen[key]
        if len(self._seen) >= self._max_keys:  # all busy: a flood from that many addresses; start over
            self._seen.clear()
