"""A boot in phases (bootserver/phases.py) and the fleet built from them (bootserver/fleet.py)."""

import pytest
from support.boots import FULL_BOOT, FULL_PHASES, events, failing_boot, record

from bootserver.fleet import BUCKETS, Fleet
from bootserver.history import History
from bootserver.phases import PHASES, boots, latest

MAC = "52:54:00:00:00:01"
T0 = 1_700_000_000.0


def test_a_full_boot_has_every_phase_in_order_with_its_duration():
    boot = latest(events(MAC, T0, FULL_BOOT))
    assert [(p.name, p.seconds(T0 + 1000)) for p in boot.phases] == FULL_PHASES
    assert [p.name for p in boot.phases] == list(PHASES)
    assert boot.outcome == "running" and boot.failure is None and boot.seconds(T0 + 1000) == 171
    assert all(p.done for p in boot.phases)
    kernel = boot.phases[3]
    assert kernel.bytes == 40 << 20 and kernel.rate == (40 << 20) / 6.0  # the agent's DHCP counts in it
    install = boot.phases[6]
    assert install.bytes == 400 << 20 and install.rate == (400 << 20) / 28  # bytes written so far, not summed


def test_a_boot_under_way_lasts_until_now():
    boot = latest(events(MAC, T0, FULL_BOOT[:8]))  # the disk step started at 16
    assert boot.outcome is None and boot.phase.name == "disk" and not boot.phase.done
    assert boot.phase.seconds(T0 + 100) == 84 and boot.seconds(T0 + 100) == 100


def test_a_failure_is_marked_on_its_phase_and_the_next_boot_takes_its_dhcp():
    first = failing_boot("did not phone home within 10 minutes", at=6)
    again = [(at + 100, kind, detail) for at, kind, detail in FULL_BOOT]
    found, pending = boots(events(MAC, T0, first + again))
    assert len(found) == 2 and not pending
    assert found[0].outcome == "failed" and found[0].phase.name == "kernel"
    assert found[0].phase.failure == found[0].failure == "did not phone home within 10 minutes"
    assert found[1].events[0].kind == "dhcp" and found[1].start == T0 + 100  # its DHCP, not the failed boot's
    assert [p.name for p in found[1].phases] == list(PHASES)


def test_a_machine_reset_mid_flow_starts_a_new_boot_at_its_next_dhcp():
    reset = [(at + 30, kind, detail) for at, kind, detail in FULL_BOOT]
    found, _ = boots(events(MAC, T0, FULL_BOOT[:8] + reset))  # in its disk step, then DHCP, TFTP, script again
    assert [b.start for b in found] == [T0, T0 + 30] and found[0].outcome is None
    assert found[0].phase.name == "disk" and found[0].events[-1].kind == "step-started"


def test_a_deployed_machine_booting_its_disk_starts_no_boot():
    disk_boot = [(300, "dhcp", {}), (301, "file-served", {"protocol": "tftp", "bytes": 1, "seconds": 0.1}),
                 (302, "script-served", {"profile": "local-disk"}), (303, "power-status", {"result": "on"})]
    found, pending = boots(events(MAC, T0, FULL_BOOT + disk_boot))
    assert len(found) == 1 and found[0].outcome == "running" and not pending
    _, pending = boots(events(MAC, T0, FULL_BOOT + disk_boot[:2]))
    assert [e.kind for e in pending] == ["dhcp", "file-served"]  # whose, its script will tell


def test_nothing_to_boot_is_a_failed_boot_and_operator_events_alone_are_none():
    found, _ = boots(events(MAC, T0, [(0, "approved", {}), (1, "no-boot", {"reason": "no profile matches"})]))
    assert len(found) == 1 and found[0].outcome == "failed" and found[0].failure == "no profile matches"
    assert boots(events(MAC, T0, [(0, "approved", {}), (1, "reprovision-requested", {})])) == ([], [])


@pytest.fixture
def fleet(store):
    return Fleet(History(store))


def test_the_fleet_names_the_slowest_finds_the_stuck_and_groups_failures(store, fleet):
    for i in range(10):
        # Each machine's install takes i seconds longer; the last one's is the slowest.
        steps = [(at + (i if at >= 81 else 0), kind, detail) for at, kind, detail in FULL_BOOT]
        record(store, f"52:54:00:00:01:{i:02x}", steps, T0)
    record(store, "52:54:00:00:02:01", FULL_BOOT[:11], T0)  # in its install since T0 + 22
    for n in range(3):
        record(store, f"52:54:00:00:03:{n:02x}", failing_boot("no first-boot report within 10 minutes", at=19), T0)
    record(store, "52:54:00:00:03:09", failing_boot("step disk failed: sgdisk: exit 1", at=9), T0)
    assert fleet.refresh(limit=None) == 0
    view = fleet.view(T0 + 10_000)
    spread = {s.phase: s for s in view.spreads}
    install = spread["install"]
    assert install.count == 13 and install.max == 69 and install.median == 63  # 60 x 4, 61 ... 69
    assert install.slowest[0] == ("52:54:00:00:01:09", 69.0)
    assert spread["booted"].count == 10  # the failed ones never got there
    assert [(s.mac, s.phase) for s in view.stuck] == [("52:54:00:00:02:01", "install")]
    assert view.stuck[0].limit == install.p90 * 3
    assert [(f.reason, len(f.macs), f.phases) for f in view.failures] == [
        ("no first-boot report within 10 minutes", 3, {"reboot": 3}),
        ("step disk failed: sgdisk: exit 1", 1, {"disk": 1})]
    assert fleet.view(T0 + 10_000, macs=["52:54:00:00:03:09"]).machines == 1
    # Every finished phase was counted once, into its bucket.
    buckets, total = fleet.histogram()["install"]
    assert buckets[BUCKETS.index(60.0)] == 4 and buckets[BUCKETS.index(120.0)] == 9
    assert total == sum(60 + i for i in range(10)) + 180


def test_the_fleet_reads_only_what_is_new_and_counts_each_phase_once(store, fleet):
    record(store, MAC, FULL_BOOT[:8], T0)
    fleet.refresh()
    assert fleet.boot(MAC).phase.name == "disk" and fleet.last_event(MAC).kind == "step-started"
    assert "disk" not in fleet.histogram()
    record(store, MAC, FULL_BOOT[8:], T0)
    assert fleet.refresh() == 0
    boot = fleet.boot(MAC)
    assert [(p.name, p.seconds(0)) for p in boot.phases] == FULL_PHASES
    assert all(sum(buckets) == 1 for buckets, _ in fleet.histogram().values())
    assert len(fleet.histogram()) == len(PHASES)
    series = fleet.view(T0).series
    # Where the machine was at the end of each minute.
    assert series[-1][1] == {"running": 1} and {"reboot": 1} in [counts for _, counts in series]
