"""Prometheus metrics, read from the core's history at scrape time.

The event log already holds almost every number we report, so there are no counters to keep in memory:
a collector queries the history when Prometheus scrapes. That also counts what another process
(the CLI) recorded, and survives restarts. The exceptions are about the store itself: its durability
settings, read from the live connection at each scrape, and its group commits since this process started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..fleet import BUCKETS, Fleet
from ..history import History
from ..lifecycle import State

# Reported even at zero, so that dashboards and alerts see every state from the first scrape.
KNOWN_STATES = tuple(State)


POWER_STATES = ("on", "off", "unknown")


class PowerCollector(Collector):
    """Machines with a BMC by their last-seen power state (polled every [server] power_poll_seconds); the
    exception to "read from the history": the server keeps these in memory, so they start empty."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        power = GaugeMetricFamily("bootserver_machines_power", "Machines with a BMC by their last-seen power state "
                                  "(unknown: its last BMC call failed)", labels=["state"])
        counts = self._counts()
        for state in sorted(set(POWER_STATES) | set(counts)):
            power.add_metric([state], counts.get(state, 0))
        yield power


class HistoryCollector(Collector):
    def __init__(self, history: History) -> None:
        self._history = history

    def collect(self) -> Iterator[Metric]:
        machines = GaugeMetricFamily("bootserver_machines", "Machines by state", labels=["state"])
        counts = self._history.counts()
        for state in sorted(set(KNOWN_STATES) | set(counts)):
            machines.add_metric([state], counts.get(state, 0))
        yield machines

        served = CounterMetricFamily("bootserver_served_bytes", "Bytes of files served to machines, by protocol",
                                     labels=["protocol"])
        for protocol, total in self._history.bytes_served().items():
            served.add_metric([protocol], total)
        yield served

        yield CounterMetricFamily("bootserver_claim_conflicts", "Times two addresses claimed one MAC while a "
                                  "token of it was live (refused, or both claims held)",
                                  value=self._history.claim_conflicts())
        yield GaugeMetricFamily("bootserver_machines_held", "Machines whose claims are held until an operator "
                                "approves one", value=self._history.held_count())

        steps = SummaryMetricFamily("bootserver_provision_step_seconds",
                                    "Durations of finished provisioning steps, by step", labels=["step"])
        for step, (count, seconds) in self._history.step_durations().items():
            steps.add_metric([step], count_value=count, sum_value=seconds)
        yield steps

        yield InfoMetricFamily("bootserver_store", "The store's backend and the settings a commit's durability rests "
                               "on, read from the server's live connection (SQLite: journal_mode, synchronous; "
                               "PostgreSQL: fsync, synchronous_commit)", value=self._history.store_settings())
        batches, requests, largest = self._history.group_commits()
        yield CounterMetricFamily("bootserver_store_group_commits", "Group commits (boot scripts and phone-homes of "
                                  "one event-loop turn sharing one COMMIT) since the server started", value=batches)
        yield CounterMetricFamily("bootserver_store_group_committed_requests", "Requests those group commits held",
                                  value=requests)
        yield GaugeMetricFamily("bootserver_store_largest_group_commit", "The most requests one group commit held "
                                "since the server started", value=largest)
        flushes, written, most, waited, queued = self._history.written_behind()
        yield CounterMetricFamily("bootserver_store_behind_flushes", "Writes of the records kept in memory behind "
                                  "boot scripts (each at most 100 ms after its first record) since the server started",
                                  value=flushes)
        yield CounterMetricFamily("bootserver_store_written_behind", "Records those writes held", value=written)
        yield GaugeMetricFamily("bootserver_store_largest_behind", "The most records one such write held since the "
                                "server started", value=most)
        yield CounterMetricFamily("bootserver_store_behind_waits", "Boot scripts that found the write-behind queue "
                                  "full and waited for a synchronous write (none is ever dropped)", value=waited)
        yield GaugeMetricFamily("bootserver_store_queued_behind", "Records kept in memory now, not yet written",
                                value=queued)


class PhaseCollector(Collector):
    """How long each phase of a boot took (phases.py), over every boot the fleet has read since the server started:
    it reads the whole event log at start, so after a restart the counts start again from what the log holds."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        self._fleet.refresh()
        phases = HistogramMetricFamily("bootserver_boot_phase_seconds", "Durations of finished boot phases (dhcp, "
                                       "tftp, script, kernel, phone-home, disk, install, deploy, reboot, booted, "
                                       "running), by phase", labels=["phase"])
        for phase, (counts, total) in sorted(self._fleet.histogram().items()):
            cumulative, buckets = 0, []
            for bound, count in zip(BUCKETS, counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # "60.0", "+Inf": as the client library writes
            phases.add_metric([phase], buckets, sum_value=total)
        yield phases


def registry(history: History, power_counts: Callable[[], dict[str, int]] = dict,
             fleet: Fleet | None = None) -> CollectorRegistry:
    """A registry of our own (not the process-wide default), so that several apps can live in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HistoryCollector(history))
    registry.register(PowerCollector(power_counts))
    registry.register(PhaseCollector(fleet or Fleet(history)))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
