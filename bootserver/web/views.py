"""What we say about a machine: its progress, why it boots what it boots, and one line per event.

Shared by the status pages and JSON API (pages.py, api.py, stream.py) and by `bootserver show` (cli.py), so that
the browser, the API and the terminal tell the same story. Nothing here knows about HTTP.
"""

from __future__ import annotations

import datetime
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from ..booter import Booter
from ..fleet import FleetView
from ..lifecycle import BAD_KINDS, GOOD_KINDS, OFF_PATH, PROGRESS, EventKind, State
from ..phases import PHASES, Boot, Phase
from ..power import PowerState
from ..store import Event, Node

SUMMARY_LENGTH = 200


@dataclass(frozen=True)
class Progress:
    """Where a machine is on the happy path: `done` of `total` steps, and how to show it."""

    state: str
    done: int
    total: int
    tone: str  # ok (deployed), busy (on its way), bad (failed, interrupted), idle (not started)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "done": self.done, "total": self.total, "tone": self.tone}


def progress(state: str) -> Progress:
    total = len(PROGRESS)
    if state in PROGRESS:
        done = PROGRESS.index(state) + 1
        return Progress(state, done, total, "ok" if done == total else "busy")
    tone = OFF_PATH.get(state, "idle")
    return Progress(state, total if tone == "ok" else 0, total, tone)


@dataclass(frozen=True)
class MachineView:
    """One machine as the status page, the API and `bootserver show` present it."""

    node: Node
    hostname: str | None
    profile: str | None  # what it boots now under the config; None: nothing matches
    group: str | None
    reason: str  # why that group won (Booter.boot_spec)
    fingerprint: str | None  # of the pinned SSH host key
    progress: Progress
    installing: dict[str, Any] | None = None  # the newest install-progress event's detail, while installing
    has_bmc: bool = False  # configured with [machines."MAC".bmc]: its power can be read and driven
    power: PowerState | None = None  # its last-seen power state (None: no BMC, or not read since the start)
    boot: Boot | None = None  # its latest boot, as far as the fleet has read (fleet.py)
    last_event: dict[str, Any] | None = None  # its newest event: kind, time, summary

    @property
    def since(self) -> float | None:
        return since(self.boot)

    @property
    def place(self) -> str | None:
        """Where its latest boot is: its phase, or how it ended."""
        if self.boot is None or self.boot.phase is None:
            return None
        return self.boot.outcome or self.boot.phase.name

    def to_json(self) -> dict[str, Any]:
        # Fingerprints are enough to check a key by.
        node = {k: v for k, v in vars(self.node).items() if k not in ("host_key", "os_host_key")}
        return {**node, "hostname": self.hostname, "profile": self.profile, "group": self.group,
                "reason": self.reason, "host_key_fingerprint": self.fingerprint,
                "progress": self.progress.to_json(), "installing": self.installing,
                "power": self.power.to_json() if self.power else None, "phase": self.place, "since": self.since,
                "boot_seconds": round(self.boot.seconds(time.time()), 3) if self.boot else None,
                "last_event": self.last_event}


def machine_view(booter: Booter, node: Node) -> MachineView:
    """Its boot and newest event as far as the fleet has read: refresh the fleet once per request, before."""
    spec = booter.spec_of(node)
    power = booter.power_control()
    fleet = booter.fleet()
    last = fleet.last_event(node.mac)
    return MachineView(node, booter.hostname(node.mac), spec.profile.name if spec.profile else None,
                       spec.group, spec.reason, fingerprint(node.host_key), progress(node.state),
                       _installing(booter, node), power.has_bmc(node.mac), booter.power_state(node.mac),
                       fleet.boot(node.mac), None if last is None else {
                           "id": last.id, "kind": last.kind, "time": last.time, "summary": summarize(last)})


def since(boot: Boot | None) -> float | None:
    """When a machine got where it is: its latest boot's outcome, else the start of the phase it is in."""
    if boot is None or boot.phase is None:
        return None
    return boot.events[-1].time if boot.over else boot.phase.start


# -- the waterfall and the fleet's chart: geometry for the templates' SVG ---------------------------------

@dataclass(frozen=True)
class Bar:
    """One phase of a boot on the waterfall: where its bar starts and how wide it is, in % of the boot."""

    phase: Phase
    x: float
    width: float
    seconds: float


def waterfall(boot: Boot, now: float) -> list[Bar]:
    span = max(boot.seconds(now), 1e-9)
    bars = []
    for phase in boot.phases:
        seconds = phase.seconds(now)
        x = min((phase.start - boot.start) / span * 100, 99.5)
        bars.append(Bar(phase, round(x, 2), round(max(min(seconds / span * 100, 100 - x), 0.5), 2), seconds))
    return bars


@dataclass(frozen=True)
class Column:
    """One point of the fleet chart: its x, and its stacked blocks (place, y, height), in the chart's units."""

    time: float
    x: float
    blocks: list[tuple[str, float, float]]
    total: int


CHART_POINTS = 120  # columns at most: a day of minutes would be thousands of rectangles
CHART_HEIGHT = 100.0
PLACES = (*PHASES, "deployed", "failed", "interrupted")  # the chart's stack, bottom up


def chart(fleet: FleetView) -> list[Column]:
    series = fleet.series
    if not series:
        return []
    step = max(len(series) // CHART_POINTS + (len(series) % CHART_POINTS > 0), 1)
    points = series[step - 1::step] if len(series) > step else series[-1:]
    if points[-1] is not series[-1]:
        points.append(series[-1])
    most = max(sum(counts.values()) for _, counts in points) or 1
    width = 1000 / len(points)
    columns = []
    for i, (when, counts) in enumerate(points):
        y, blocks = CHART_HEIGHT, []
        for place in sorted(counts, key=lambda p: PLACES.index(p) if p in PLACES else len(PLACES)):
            height = counts[place] / most * CHART_HEIGHT
            y -= height
            blocks.append((place, round(y, 2), round(height, 2)))
        columns.append(Column(when, round(i * width, 2), blocks, sum(counts.values())))
    return columns


def duration(seconds: object) -> str:
    """Seconds as a person reads them: 850 ms, 4.2 s, 3 min 5 s, 2 h 10 min."""
    if not isinstance(seconds, int | float):
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _installing(booter: Booter, node: Node) -> dict[str, Any] | None:
    """How far the OS install has got: bytes, total and rate (only while installing: a look at its events)."""
    if node.state != State.INSTALL:
        return None
    written = [e for e in booter.history().recent_events(node.mac, 20) if e.kind == EventKind.INSTALL_PROGRESS]
    if not written:
        return None
    detail = dict(written[-1].detail)
    detail["summary"] = _install_progress(detail)
    return detail


@functools.lru_cache(maxsize=16384)  # parsing a key is slow, and every list page shows hundreds of them
def fingerprint(host_key: str | None) -> str | None:
    if not host_key:
        return None
    try:
        return asyncssh.import_public_key(host_key).get_fingerprint("sha256")
    except (asyncssh.KeyImportError, ValueError):
        return "(unreadable key)"


def event_tone(event: Event) -> str:
    if event.kind in BAD_KINDS or (event.kind == "command" and event.detail.get("exit_status") != 0):
        return "bad"
    return "ok" if event.kind in GOOD_KINDS else "info"


# Event details never shown: a pinned host key would let a caller steer our SSH at the machine that owns it
# (events recorded before the key was left out of them still hold it).
HIDDEN_DETAIL = ("host_key",)


def event_json(event: Event) -> dict[str, Any]:
    detail = {k: v for k, v in event.detail.items() if k not in HIDDEN_DETAIL}
    return {"id": event.id, "mac": event.mac, "time": event.time, "kind": event.kind, "detail": detail,
            "summary": summarize(event), "tone": event_tone(event), "replica": event.replica}


def clock(when: float) -> str:
    """A timestamp in the server's local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def summarize(event: Event) -> str:
    """One line about an event, for the terminal and the timeline's headline."""
    d = event.detail
    summary = _SUMMARIES.get(event.kind, _generic)(d)
    summary = " ".join(summary.split())  # output tails and reasons may hold newlines
    # ...and terminal escape sequences: `bootserver show` prints this line as it is.
    summary = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in summary)
    return summary if len(summary) <= SUMMARY_LENGTH else summary[:SUMMARY_LENGTH - 1] + "…"


def size(count: object) -> str:
    if not isinstance(count, int | float):
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _script(d: dict[str, Any]) -> str:
    return f"profile {d.get('profile')} over {d.get('transport', '?')}: {d.get('reason', '')}"


def _file(d: dict[str, Any]) -> str:
    seconds = d.get("seconds") or 0
    rate = f", {size(d.get('bytes', 0) / seconds)}/s" if seconds and isinstance(d.get("bytes"), int) else ""
    whole = "" if d.get("bytes") == d.get("size") else f" of {size(d.get('size'))}"
    failed = f" — {d['error']}" if d.get("error") else ""
    to = f" to {d['from']}" if d.get("from") else ""  # installer files: only to the address that booted
    return f"{d.get('file')}: {size(d.get('bytes'))}{whole} over {d.get('protocol')}{to} in {seconds} s{rate}{failed}"


def _phoned_home(d: dict[str, Any]) -> str:
    disks = ", ".join(f"{x.get('name')} {size(x.get('size_bytes'))}" for x in d.get("disks", [])) or "no disks"
    secure = {True: ", Secure Boot on", False: ", Secure Boot off"}.get(d.get("secure_boot"), "")
    return f"from {d.get('ip')}, host key {d.get('fingerprint')}, kernel {d.get('kernel') or '?'}, {disks}{secure}"


def _command(d: dict[str, Any]) -> str:
    status = d.get("exit_status")
    outcome = "no exit status" if status is None else f"exit {status}"
    tail = (d.get("stderr_tail") or d.get("stdout_tail") or "").strip().splitlines()
    last = f" — {tail[-1]}" if tail else ""
    return f"[{d.get('step')}] {d.get('command')} → {outcome} in {d.get('seconds')} s{last}"


def _step_failed(d: dict[str, Any]) -> str:
    return f"step {d.get('step')} failed: {d.get('error')}"


def _certificate(d: dict[str, Any]) -> str:
    sans = d.get("sans")
    names = ", ".join(str(n) for n in sans) if isinstance(sans, list) and sans else "none"
    return f"TLS certificate issued: serial {d.get('serial')}, SANs {names}, expires {expiry(d.get('not_after'))}"


def expiry(value: object) -> str:
    """A certificate's not_after (ISO 8601, as recorded) in UTC to the minute; anything else as it is."""
    if not isinstance(value, str):
        return "?"
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _install_progress(d: dict[str, Any]) -> str:
    seconds = d.get("seconds") or 0
    rate = f", {size(d.get('bytes', 0) / seconds)}/s" if seconds and isinstance(d.get("bytes"), int) else ""
    return f"installing {d.get('source')}: {size(d.get('bytes'))} of {size(d.get('total'))}{rate}"


def _installed(d: dict[str, Any]) -> str:
    loaders = " and ".join(str(x) for x in d.get("boot_loaders") or []) or "no"
    return (f"installed {d.get('source')} in {d.get('seconds')} s: kernel {d.get('kernel')}, {loaders} boot loader, "
            f"SSH host key {d.get('fingerprint')} pinned")


def _booted(d: dict[str, Any]) -> str:
    failed = d.get("failed_units") or []
    units = f", failed units: {', '.join(str(u) for u in failed)}" if failed else ", no failed units"
    return f"the installed OS reported from {d.get('ip')}: kernel {d.get('kernel')}, {d.get('system_state')}{units}"


def _health(d: dict[str, Any]) -> str:
    failing = d.get("failing")
    if isinstance(failing, dict):
        return "health checks failing: " + "; ".join(f"{k}: {v}" for k, v in failing.items())
    return f"health checks passed: {', '.join(str(c) for c in d.get('checks') or [])}"


def _power(d: dict[str, Any]) -> str:
    """A BMC call: what was asked, of which BMC, how it went and in how long."""
    outcome = d.get("error") or (f"power is {d.get('result')}" if d.get("action") == "status" else "sent")
    return f"BMC {d.get('action')} ({d.get('bmc')}): {outcome} in {d.get('seconds')} s"


def _boot_override(d: dict[str, Any]) -> str:
    read = d.get("read_back") or {}
    asked = d.get("asked") or {}
    outcome = d.get("error") or "kept"
    return (f"next boot from the network ({asked.get('mode')}, once): {outcome}; read back: {read.get('device')}"
            f"{' uefi' if read.get('uefi') else ''}{' persistent' if read.get('persistent') else ''}")


def _generic(d: dict[str, Any]) -> str:
    """Scalar details as key=value: enough for kinds we do not know yet (dhcp, from another module)."""
    return ", ".join(f"{k}={v}" for k, v in d.items() if isinstance(v, str | int | float | bool) or v is None)


_SUMMARIES: dict[str, Callable[[dict[str, Any]], str]] = {
    **dict.fromkeys((EventKind.POWER_STATUS, EventKind.POWER_ON, EventKind.POWER_OFF, EventKind.POWER_SOFT_OFF,
                     EventKind.POWER_CYCLE, EventKind.POWER_FAILED), _power),
    EventKind.BOOT_OVERRIDE_SET: _boot_override,
    EventKind.BOOT_OVERRIDE_LOST: _boot_override,
    EventKind.BMC_INVENTORY: lambda d: ", ".join(f"{k} {v}" for k, v in (d.get("result") or {}).items()),
    EventKind.SCRIPT_SERVED: _script,
    EventKind.FILE_SERVED: _file,
    EventKind.FILE_FAILED: _file,
    EventKind.PHONED_HOME: _phoned_home,
    EventKind.COMMAND: _command,
    EventKind.STEP_STARTED: lambda d: f"step {d.get('step')} started",
    EventKind.STEP_DONE: lambda d: f"step {d.get('step')} done in {d.get('seconds')} s",
    EventKind.STEP_FAILED: _step_failed,
    EventKind.REFUSED: lambda d: f"{d.get('what')} refused: {d.get('reason')}",
    EventKind.NO_BOOT: lambda d: f"nothing to boot over {d.get('transport', '?')}: {d.get('reason')}",
    EventKind.FAILED: lambda d: str(d.get("reason", "")),
    EventKind.INTERRUPTED: lambda d: str(d.get("reason", "")),
    EventKind.DEPLOYED: lambda d: f"deployed with profile {d.get('profile')}",
    EventKind.INSTALL_PROGRESS: _install_progress,
    EventKind.INSTALLED: _installed,
    EventKind.REBOOTING: lambda d: f"rebooting into the installed OS; it must report within {d.get('minutes')} minutes",
    EventKind.BOOTED: _booted,
    EventKind.HEALTH_WAITING: _health,
    EventKind.HEALTH_PASSED: _health,
    EventKind.REBOOT_SENT: lambda d: f"rebooted over SSH ({d.get('host')}) into the provisioning flow",
    EventKind.REBOOT_FAILED: lambda d: f"could not reboot it over SSH: {d.get('reason')}; reboot it by hand",
    EventKind.RUNNING: lambda d: f"running with profile {d.get('profile')}",
    EventKind.REPROVISION_REQUESTED: lambda d: "re-provisioning requested: the next boot runs the whole flow",
    EventKind.BOOT_FROM_DISK_REQUESTED: lambda d: "boot from disk requested: the next boot boots the local disk",
    EventKind.NOTHING_TO_PROVISION: lambda d: f"profile {d.get('profile')} has no disk or deploy section",
    EventKind.CERTIFICATE_ISSUED: _certificate,
    EventKind.CONNECT_FAILED: lambda d: f"SSH to {d.get('host')}:{d.get('port')} failed: {d.get('error')}",
    EventKind.HOST_KEY_MISMATCH: lambda d: f"SSH host key of {d.get('host')}:{d.get('port')} is not the pinned one: "
                                   f"{d.get('error')}",
    EventKind.WAITING: lambda d: f"no provisioning window over {d.get('transport', '?')}: {d.get('reason')}",
    EventKind.APPROVED: lambda d: f"approved: may be provisioned for {d.get('window_minutes')} minutes",
    EventKind.CLAIM_CONFLICT: lambda d: f"conflict: {d.get('reason')}",
    EventKind.RESUMED: lambda d: f"taken over from replica {d.get('from')} during {d.get('state')} "
                                 f"(attempt {d.get('attempt')})",
    EventKind.DHCP: _generic,  # the client's options and our answer, as they are
}
