"""A boot as phases: which part of a machine's boot each event belongs to, and how long each part took.

One boot is the run of events from the firmware's DHCP to an outcome (running, deployed, failed, interrupted):

    dhcp -> tftp (the firmware fetches iPXE) -> script -> kernel (and initrds) -> phone-home -> disk -> install
        -> deploy (and the finishing step) -> reboot (into the installed OS) -> booted (its health checks) -> running

Every view of the operator (the machine page's waterfall, the fleet page, their JSON twins, /metrics and the CLI)
reads boots from here, so that they agree. Derived from the event log alone: nothing here is stored.

A phase starts at its first event and lasts until the next phase starts (the last one: until its last event, or
until now while the boot is under way). Phases only move forward: an event of an earlier phase (the agent's own
DHCP during its kernel phase, a disk boot's DHCP while rebooting) counts in the phase under way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .lifecycle import EventKind
from .store import Event

PHASES = ("dhcp", "tftp", "script", "kernel", "phone-home", "disk", "install", "deploy", "reboot", "booted",
          "running")
LABELS = {"dhcp": "DHCP", "tftp": "TFTP", "script": "script", "kernel": "kernel + initrds", "phone-home": "phone-home",
          "disk": "disk", "install": "OS install", "deploy": "deploy", "reboot": "reboot", "booted": "booted",
          "running": "running"}
_ORDER = {name: i for i, name in enumerate(PHASES)}

# A provisioning step -> its phase: the finishing step (hostname, network, boot loader) is the end of deploy.
_STEPS = {"disk": "disk", "install": "install", "deploy": "deploy", "finish": "deploy"}
_KINDS = {EventKind.DHCP: "dhcp", EventKind.SCRIPT_SERVED: "script", EventKind.NO_BOOT: "script",
          EventKind.WAITING: "script", EventKind.PHONED_HOME: "phone-home", EventKind.INSTALL_PROGRESS: "install",
          EventKind.INSTALLED: "install", EventKind.CERTIFICATE_ISSUED: "deploy", EventKind.DEPLOYED: "deploy",
          EventKind.REBOOTING: "reboot", EventKind.BOOTED: "booted", EventKind.HEALTH_WAITING: "booted",
          EventKind.HEALTH_PASSED: "running", EventKind.RUNNING: "running"}
_FILES = (EventKind.FILE_SERVED, EventKind.FILE_FAILED)
_STEP_KINDS = (EventKind.STEP_STARTED, EventKind.STEP_DONE, EventKind.STEP_FAILED)
# The event that ends a boot -> its outcome. no-boot: the script said there is nothing for it to boot.
OUTCOMES = {EventKind.RUNNING: "running", EventKind.DEPLOYED: "deployed", EventKind.FAILED: "failed",
            EventKind.INTERRUPTED: "interrupted", EventKind.NO_BOOT: "failed"}
FAILED = ("failed", "interrupted")
# The detail keys phases read: the fleet keeps only these of each event (and the last event whole).
DETAIL_KEYS = ("protocol", "bytes", "seconds", "step", "profile", "reason", "error")
LOCAL_DISK = "local-disk"  # the profile a script-served event names when a deployed machine boots its disk


def phase_of(event: Event, reached: str | None) -> str | None:
    """The phase `event` marks, given the phase its boot has `reached`; None: it marks none (a command, a power
    call), and counts in the phase under way."""
    kind, detail = event.kind, event.detail
    if kind in _FILES:
        # Before its script the firmware fetches iPXE (over TFTP, or HTTP for UEFI HTTP boot); after, the kernel.
        return "tftp" if reached is None or _ORDER[reached] < _ORDER["script"] else "kernel"
    if kind in _STEP_KINDS:
        return _STEPS.get(str(detail.get("step")))
    return _KINDS.get(kind)


@dataclass
class Phase:
    name: str
    start: float  # its first event
    end: float  # the next phase's start, else its own last event
    events: int = 0
    bytes: int = 0  # of files served (and of the OS written, while installing)
    transfer_seconds: float = 0.0  # what sending those bytes took
    failure: str | None = None  # why the boot failed here
    done: bool = False  # a later phase started, or the boot is over

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def seconds(self, now: float) -> float:
        """How long it took; while it is under way, how long so far."""
        return max((self.end if self.done else max(now, self.end)) - self.start, 0.0)

    @property
    def rate(self) -> float | None:
        """Bytes a second, where bytes moved."""
        return self.bytes / self.transfer_seconds if self.bytes and self.transfer_seconds > 0 else None

    def to_json(self, now: float) -> dict[str, Any]:
        return {"phase": self.name, "label": self.label, "start": self.start, "seconds": round(self.seconds(now), 3),
                "events": self.events, "bytes": self.bytes or None, "rate": self.rate, "failure": self.failure,
                "done": self.done}


@dataclass
class Boot:
    """One boot of one machine: its events and phases, and how it ended (None: under way)."""

    events: list[Event]
    phases: list[Phase] = field(default_factory=list)
    outcome: str | None = None
    failure: str | None = None  # why it failed (an event's reason or error)

    @property
    def id(self) -> int:
        """Its first event's id: how a page names it."""
        return self.events[0].id

    @property
    def start(self) -> float:
        return self.events[0].time

    @property
    def over(self) -> bool:
        return self.outcome is not None

    @property
    def phase(self) -> Phase | None:
        """The phase it is in (or ended in)."""
        return self.phases[-1] if self.phases else None

    def seconds(self, now: float) -> float:
        """From its first event to its outcome; while under way, until now."""
        end = self.events[-1].time if self.over else max(now, self.events[-1].time)
        return end - self.start

    def to_json(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "mac": self.events[0].mac, "start": self.start, "seconds": round(self.seconds(now), 3),
                "outcome": self.outcome, "failure": self.failure,
                "failed_in": self.phase.name if self.phase and self.outcome in FAILED else None,
                "phases": [p.to_json(now) for p in self.phases]}


def boots(events: Iterable[Event]) -> tuple[list[Boot], list[Event]]:
    """The boots in a machine's events (oldest first), and the DHCP and loader events after the last one that no
    boot has claimed yet: the start of its next boot, or of a disk boot (a deployed machine's reboot)."""
    found: list[Boot] = []
    pending: list[Event] = []  # a run of DHCP and loader files, whose boot is not known yet
    for event in events:
        boot = found[-1] if found else None
        under_way = boot is not None and not boot.over
        reached = boot.phase.name if boot is not None and boot.phase is not None else None
        at = _ORDER[reached] if under_way and reached else -1
        phase = phase_of(event, reached if under_way else None)
        if pending and under_way and event.kind in _FILES:
            phase = "tftp"  # a file right after a DHCP of a later phase: the firmware's loader, the machine reset
        if phase in ("dhcp", "tftp") and at < _ORDER["reboot"]:
            if boot is None or (under_way and at <= _ORDER["tftp"]):
                _add(boot or _begin(found), event, phase)  # the first boot, or this one's own DHCP and loader
            else:
                pending.append(event)
            continue
        if phase == "script" and _starts_boot(event, boot, at):
            new = _begin(found)
            for one in [*pending, event]:
                _add(new, one, phase_of(one, new.phase.name if new.phase else None))
            pending = []
            continue
        if not under_way:
            if phase == "script":
                pending = []  # a disk boot's DHCP and script: no boot of ours
            continue
        assert boot is not None
        for held in pending:
            _add(boot, held, None)  # a DHCP of the boot under way (the agent's, the installer's)
        pending = []
        _add(boot, event, phase)
    return found, pending


def _starts_boot(event: Event, boot: Boot | None, at: int) -> bool:
    """A script served (or refused) starts a boot, unless its boot is still fetching it or reboots into its disk."""
    if event.detail.get("profile") == LOCAL_DISK:
        return boot is None
    return boot is None or boot.over or _ORDER["kernel"] <= at < _ORDER["reboot"]


def _begin(found: list[Boot]) -> Boot:
    boot = Boot([])
    found.append(boot)
    return boot


def _add(boot: Boot, event: Event, phase: str | None) -> None:
    """`event` into `boot`: a later phase starts with it, else it counts in the phase under way."""
    boot.events.append(event)
    current = boot.phase
    if phase is not None and (current is None or _ORDER[phase] > _ORDER[current.name]):
        if current is not None:
            current.end, current.done = event.time, True
        current = Phase(phase, event.time, event.time)
        boot.phases.append(current)
    if current is None:  # nothing but operator events so far: no phase yet
        return
    _count(current, event)
    outcome = OUTCOMES.get(event.kind)
    if outcome is not None:
        boot.outcome, current.done = outcome, True
        if outcome in FAILED:
            boot.failure = current.failure = reason(event)
    elif event.kind == EventKind.STEP_FAILED and current.failure is None:
        current.failure = reason(event)


def _count(phase: Phase, event: Event) -> None:
    detail = event.detail
    phase.events += 1
    phase.end = max(phase.end, event.time)
    amount, seconds = detail.get("bytes"), detail.get("seconds")
    if not isinstance(amount, int) or isinstance(amount, bool):
        return
    took = float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) else 0.0
    if event.kind in _FILES:
        phase.bytes += amount
        phase.transfer_seconds += took
    elif event.kind == EventKind.INSTALL_PROGRESS:  # bytes written so far, not more bytes
        phase.bytes, phase.transfer_seconds = max(phase.bytes, amount), took


def reason(event: Event) -> str:
    """Why a boot failed, in one line: what failure groups are keyed by."""
    detail = event.detail
    text = " ".join(str(detail.get("reason") or detail.get("error") or event.kind).split())
    # Printable only: `bootserver show` prints it to a terminal as it is.
    return "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)[:200]


def slim(event: Event) -> Event:
    """The event with only the details phases read: what the fleet keeps of each (thousands of machines)."""
    return Event(event.id, event.mac, event.time, event.kind,
                 {k: event.detail[k] for k in DETAIL_KEYS if k in event.detail}, event.replica)


def latest(events: Iterable[Event]) -> Boot | None:
    found, _ = boots(events)
    return found[-1] if found else None
