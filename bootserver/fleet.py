"""The fleet: every machine's latest boot, kept up to date from the event log, for the operator's views.

Reading every event each time someone opens the fleet page would take seconds on a big site (10^6 events), so
the fleet reads the log once, by event id, and then only what is new (events of every replica and of the CLI
alike: they are all in the log). It keeps, per machine, the events of its latest boot (only the details phases
read), and across machines how many were in each phase minute by minute, and every finished phase's duration
for /metrics. Nothing of it is stored: a restart reads the log again.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from .history import History
from .phases import FAILED, PHASES, Boot, boots, slim
from .store import Event

BATCH = 5000  # events read per query
SLOWEST = 5  # machines named per phase
NAMED = 20  # machines named per failure reason (10,000 may share one: a server that stopped mid-deploy)
STUCK_FACTOR = 3  # stuck: in a phase longer than its p90 across the fleet x this
SERIES_MINUTES = 24 * 60  # the chart of machines by phase: the last day, a point a minute
# Phase durations for /metrics, in seconds: DHCP takes a second, an OS install many minutes.
BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, math.inf)


@dataclass
class Tracked:
    """What the fleet keeps of one machine."""

    last: Event  # its newest event, whole (the list shows its summary)
    kept: list[Event] = field(default_factory=list)  # its latest boot's events onward, slimmed
    boot: Boot | None = None
    counted: tuple[int, int] = (0, 0)  # (boot id, how many of its phases are in the histogram already)

    @property
    def where(self) -> str | None:
        """Its place on the chart: the phase of its latest boot, or how that boot ended."""
        if self.boot is None or self.boot.phase is None:
            return None
        return self.boot.outcome or self.boot.phase.name


@dataclass(frozen=True)
class Spread:
    """One phase across the fleet: how long it took each machine that finished it (their latest boots)."""

    phase: str
    count: int
    median: float
    p90: float
    max: float
    slowest: list[tuple[str, float]]  # (MAC, seconds), the slowest first

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "count": self.count, "median": self.median, "p90": self.p90, "max": self.max,
                "slowest": [{"mac": mac, "seconds": round(s, 3)} for mac, s in self.slowest]}


@dataclass(frozen=True)
class Stuck:
    """A machine in a phase for longer than `limit` (the phase's p90 x STUCK_FACTOR)."""

    mac: str
    phase: str
    seconds: float
    limit: float

    def to_json(self) -> dict[str, Any]:
        return {"mac": self.mac, "phase": self.phase, "seconds": round(self.seconds, 3),
                "limit": round(self.limit, 3)}


@dataclass(frozen=True)
class Failure:
    """Latest boots that failed for one reason."""

    reason: str
    macs: list[str]
    phases: dict[str, int]  # how many failed in each phase

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "count": len(self.macs), "macs": self.macs[:NAMED], "phases": self.phases}


@dataclass(frozen=True)
class FleetView:
    """The fleet page's figures, over the machines asked for."""

    machines: int  # with a boot
    spreads: list[Spread]
    stuck: list[Stuck]
    failures: list[Failure]
    series: list[tuple[float, dict[str, int]]]  # (minute's start, machines by phase or outcome), every machine
    behind: int  # events not read yet (0: up to date)

    def to_json(self) -> dict[str, Any]:
        return {"machines": self.machines, "phases": [s.to_json() for s in self.spreads],
                "stuck": [s.to_json() for s in self.stuck], "failures": [f.to_json() for f in self.failures],
                "series": [{"time": t, "counts": c} for t, c in self.series], "behind": self.behind,
                "stuck_factor": STUCK_FACTOR}


class Fleet:
    def __init__(self, history: History) -> None:
        self._history = history
        self._after = 0  # the last event read
        self._machines: dict[str, Tracked] = {}
        self._places: Counter[str] = Counter()  # machines by Tracked.where
        self._series: dict[int, dict[str, int]] = {}  # minute -> machines by where, at its end
        # Every finished phase read, for /metrics: phase -> (count per bucket, sum of seconds)
        self._histogram: dict[str, tuple[list[int], float]] = {}
        # view()'s spreads and failures by its key, computed after reading up to event `_cached_at`
        self._cached_at = -1
        self._cached: dict[Hashable, tuple[list[Spread], list[Failure]]] = {}

    # -- reading the log ------------------------------------------------------------------------------

    def refresh(self, limit: int | None = BATCH) -> int:
        """Read up to `limit` new events (None: all there are); how many are left to read."""
        read = 0
        while limit is None or read < limit:
            events = self._history.events_after(self._after, BATCH if limit is None else min(BATCH, limit - read))
            if not events:
                return 0
            read += len(events)
            self._after = events[-1].id
            # Minute by minute, so that the chart shows where every machine was at the end of each.
            for minute, group in groupby(events, key=lambda e: int(e.time // 60)):
                self._apply(list(group))
                self._series[minute] = dict(self._places)
            while len(self._series) > SERIES_MINUTES:
                del self._series[min(self._series)]
        return self.behind()

    def behind(self) -> int:
        """Events recorded that the fleet has not read yet (a bound: ids may have gaps)."""
        return max(self._history.last_event_id() - self._after, 0)

    def _apply(self, events: list[Event]) -> None:
        by_mac: dict[str, list[Event]] = {}
        for event in events:
            by_mac.setdefault(event.mac, []).append(event)
        for mac, new in by_mac.items():
            tracked = self._machines.get(mac)
            if tracked is None:
                tracked = self._machines[mac] = Tracked(new[-1])
            tracked.last = new[-1]
            before = tracked.where
            found, pending = boots([*tracked.kept, *(slim(e) for e in new)])
            self._count(tracked, found)
            if found:
                tracked.boot = found[-1]
                tracked.kept = [*found[-1].events, *pending]
            else:
                tracked.kept = pending
            after = tracked.where
            if before != after:
                if before is not None:
                    self._places[before] -= 1
                    if not self._places[before]:
                        del self._places[before]
                if after is not None:
                    self._places[after] += 1

    def _count(self, tracked: Tracked, found: list[Boot]) -> None:
        """Phases that finished since the last look go into the histogram, each once."""
        for boot in found:
            finished = [p for p in boot.phases if p.done]
            already = tracked.counted[1] if boot.id == tracked.counted[0] else 0
            for phase in finished[already:]:
                buckets, total = self._histogram.get(phase.name, ([0] * len(BUCKETS), 0.0))
                seconds = phase.seconds(phase.end)
                buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
                self._histogram[phase.name] = (buckets, total + seconds)
            tracked.counted = (boot.id, len(finished))

    # -- what the views read ---------------------------------------------------------------------------

    def boot(self, mac: str) -> Boot | None:
        """The machine's latest boot, as far as the fleet has read."""
        tracked = self._machines.get(mac)
        return tracked.boot if tracked else None

    def last_event(self, mac: str) -> Event | None:
        tracked = self._machines.get(mac)
        return tracked.last if tracked else None

    def macs(self) -> list[str]:
        return list(self._machines)

    def histogram(self) -> dict[str, tuple[list[int], float]]:
        """Finished phases read since the start, by phase: (count per BUCKETS bucket, sum of seconds)."""
        return {name: (list(buckets), total) for name, (buckets, total) in self._histogram.items()}

    def view(self, now: float, macs: Iterable[str] | None = None, key: Hashable = None) -> FleetView:
        """The fleet's figures over `macs` (None: every machine): each phase's spread across their latest boots,
        those stuck, the failures by reason; the chart is of every machine. `key` names `macs` (a filter): the
        spreads and failures of a key are computed once per new event read, not once per page view."""
        chosen = [t for t in (self._machines.values() if macs is None else
                              (self._machines[m] for m in macs if m in self._machines)) if t.boot is not None]
        if self._cached_at != self._after:
            self._cached_at, self._cached = self._after, {}
        if key not in self._cached:
            self._cached[key] = (_spreads(chosen), _failures(chosen))
        spreads, failures = self._cached[key]
        limits = {s.phase: s.p90 * STUCK_FACTOR for s in spreads if s.p90 > 0}
        return FleetView(len(chosen), spreads, _stuck(chosen, limits, now), failures,
                         [(minute * 60.0, counts) for minute, counts in sorted(self._series.items())], self.behind())

    def stuck(self, now: float) -> list[Stuck]:
        return self.view(now).stuck


def _spreads(chosen: list[Tracked]) -> list[Spread]:
    took: dict[str, list[tuple[float, str]]] = {name: [] for name in PHASES}
    for tracked in chosen:
        assert tracked.boot is not None
        for phase in tracked.boot.phases:
            if phase.done:
                took[phase.name].append((phase.seconds(phase.end), tracked.last.mac))
    spreads = []
    for name, durations in took.items():
        if not durations:
            continue
        durations.sort()
        seconds = [s for s, _ in durations]
        slowest = [(mac, s) for s, mac in reversed(durations[-SLOWEST:])]
        spreads.append(Spread(name, len(seconds), _rank(seconds, 0.5), _rank(seconds, 0.9), seconds[-1], slowest))
    return spreads


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank quantile of a sorted list."""
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _stuck(chosen: list[Tracked], limits: dict[str, float], now: float) -> list[Stuck]:
    found = []
    for tracked in chosen:
        boot = tracked.boot
        if boot is None or boot.over or boot.phase is None or boot.phase.name not in limits:
            continue
        seconds = boot.phase.seconds(now)
        if seconds > limits[boot.phase.name]:
            found.append(Stuck(tracked.last.mac, boot.phase.name, seconds, limits[boot.phase.name]))
    return sorted(found, key=lambda s: s.seconds / s.limit, reverse=True)


def _failures(chosen: list[Tracked]) -> list[Failure]:
    groups: dict[str, tuple[list[str], Counter[str]]] = {}
    for tracked in chosen:
        boot = tracked.boot
        if boot is None or boot.outcome not in FAILED or boot.phase is None:
            continue
        macs, phases = groups.setdefault(boot.failure or boot.outcome or "?", ([], Counter()))
        macs.append(tracked.last.mac)
        phases[boot.phase.name] += 1
    return sorted((Failure(reason, sorted(macs), dict(phases)) for reason, (macs, phases) in groups.items()),
                  key=lambda f: (-len(f.macs), f.reason))
