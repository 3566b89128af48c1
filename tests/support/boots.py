"""Boots written as events, for the waterfall, the fleet and their views: a whole provisioning boot (or one that
fails on the way), at the times a test chooses."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bootserver.lifecycle import STEP_STATES
from bootserver.store import Event, Store

# (seconds after the boot's start, kind, detail) of a boot that installs an OS and reaches running.
FULL_BOOT: list[tuple[float, str, dict[str, Any]]] = [
    (0, "dhcp", {"message": "DISCOVER", "answer": "PXE firmware"}),
    (1, "file-served", {"file": "undionly.kpxe", "protocol": "tftp", "bytes": 70_000, "size": 70_000, "seconds": 0.5}),
    (3, "script-served", {"profile": "debian", "group": "default", "transport": "http", "reason": "default"}),
    (4, "file-served", {"file": "vmlinuz", "protocol": "http", "bytes": 8 << 20, "size": 8 << 20, "seconds": 2.0}),
    (6, "file-served", {"file": "initrd", "protocol": "http", "bytes": 32 << 20, "size": 32 << 20, "seconds": 4.0}),
    (10, "dhcp", {"message": "DISCOVER", "answer": "the agent"}),
    (15, "phoned-home", {"ip": "10.0.0.7", "fingerprint": "SHA256:x"}),
    (16, "step-started", {"step": "disk"}),
    (20, "command", {"step": "disk", "command": "sgdisk", "exit_status": 0, "seconds": 3.5}),
    (21, "step-done", {"step": "disk", "seconds": 5}),
    (22, "step-started", {"step": "install"}),
    (50, "install-progress", {"source": "debian", "bytes": 400 << 20, "total": 800 << 20, "seconds": 28}),
    (80, "installed", {"source": "debian", "seconds": 58}),
    (81, "step-done", {"step": "install", "seconds": 59}),
    (82, "step-started", {"step": "deploy"}),
    (90, "step-done", {"step": "deploy", "seconds": 8}),
    (91, "step-started", {"step": "finish"}),
    (95, "rebooting", {"profile": "debian", "minutes": 10}),
    (120, "dhcp", {"message": "DISCOVER", "answer": "disk boot"}),
    (125, "script-served", {"profile": "local-disk", "transport": "http", "reason": "deployed"}),
    (160, "booted", {"ip": "10.0.0.7", "kernel": "6.1"}),
    (170, "health-passed", {"checks": ["ssh"]}),
    (171, "running", {"profile": "debian"}),
]
# Its phases and their seconds, as the events above make them.
FULL_PHASES = [("dhcp", 1), ("tftp", 2), ("script", 1), ("kernel", 11), ("phone-home", 1), ("disk", 6),
               ("install", 60), ("deploy", 13), ("reboot", 65), ("booted", 10), ("running", 1)]


def events(mac: str, start: float, steps: list[tuple[float, str, dict[str, Any]]], first_id: int = 1) -> list[Event]:
    return [Event(first_id + i, mac, start + at, kind, detail) for i, (at, kind, detail) in enumerate(steps)]


def failing_boot(reason: str, *, at: int = 7) -> list[tuple[float, str, dict[str, Any]]]:
    """A boot that gets as far as FULL_BOOT's step `at` (exclusive) and then fails for `reason`."""
    last = FULL_BOOT[at - 1][0]
    return [*FULL_BOOT[:at], (last + 5, "failed", {"reason": reason})]


# The state an event's kind moves a machine to, as the core records them (a local-disk script moves none).
STATES = {"script-served": "script-served", "phoned-home": "phoned-home", "rebooting": "rebooting",
          "booted": "booted", "running": "running", "failed": "failed"}


def record(store: Store, mac: str, steps: list[tuple[float, str, dict[str, Any]]], start: float) -> None:
    """`steps` recorded through the store as if at `start` + their seconds (the clock set for each write), each
    moving the machine to the state the core would."""
    for at, kind, detail in steps:
        state = STATES.get(kind) if detail.get("profile") != "local-disk" else None
        if kind == "step-started":
            state = STEP_STATES[detail["step"]]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(time, "time", lambda at=at: start + at)
            store.record(mac, kind, detail, state=state)


# The machines fill_fleet() writes, by what the views should say of them.
SLOW = "52:54:00:00:01:09"  # the slowest OS install
STUCK = "52:54:00:00:02:01"  # in its OS install ever since
TWICE = "52:54:00:00:00:01"  # node1 in the tests' config (group raft): running, then a boot that failed


def fill_fleet(store: Store, start: float, hostile: str = "<script>alert('owned')</script>") -> None:
    """Ten machines that reached running (each install 10 s longer than the one before: the last is the slowest),
    one stuck in its OS install, three that failed after rebooting, one that failed in its disk step for a reason
    full of markup (`hostile`), and TWICE, whose second boot failed."""
    for i in range(10):
        steps = [(at + (i * 10 if at >= 81 else 0), kind, detail) for at, kind, detail in FULL_BOOT]
        record(store, f"52:54:00:00:01:{i:02x}", steps, start)
    record(store, STUCK, FULL_BOOT[:11], start)
    for n in range(3):
        record(store, f"52:54:00:00:03:{n:02x}", failing_boot("no first-boot report within 10 minutes", at=19), start)
    record(store, "52:54:00:00:03:09", failing_boot(f"step disk failed: {hostile}", at=9), start)
    record(store, TWICE, FULL_BOOT, start)
    record(store, TWICE, failing_boot("did not phone home", at=6), start + 1000)
