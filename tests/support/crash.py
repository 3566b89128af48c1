"""What a server acknowledged to machines booting over and over, and the proof in its store that it kept each
one: shared by the kill -9 trials (tests/test_crash.py) and the power cut (tests/test_vm_powercut.py)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

IN_PROGRESS = ("phoned-home", "disk", "deploy", "finishing")  # the states a cut can catch a machine in


@dataclass
class Acked:
    """What the server acknowledged, each request by what proves it was kept: each script's token id, each spent
    token's id, and for every other request (a script without a token, a reprovision) its machine, the event kind
    it records and the window of wall-clock time from sending it to having its answer. The server stamps an event
    with time.time() between reading the request and answering it, and one machine's driver sends one request
    at a time, so each acknowledged request is matched to an event of its own (see unmatched): a lost acknowledged
    event cannot hide behind an unacknowledged one that happened to commit, as it could when events were only
    counted.

    When the server runs on another clock (in a VM), the offset between the clocks is read off the scripts: each
    one's event is known by its token, so its stamp bounds the offset by its sending and answering times."""

    scripts: dict[str, tuple[float, float]] = field(default_factory=dict)  # token id of a script -> (sent, answered)
    phone_homes: set[str] = field(default_factory=set)  # token ids of phone-homes answered 202
    others: list[tuple[str, str, float, float]] = field(default_factory=list)  # (mac, kind, sent, answered)

    def __len__(self) -> int:
        return len(self.scripts) + len(self.phone_homes) + len(self.others)


async def drive(url: str, host_key: str, mac: str, acked: Acked, api_token: Path) -> None:
    """Boot one machine over and over as its firmware and agent would; note what the server acknowledged.
    One driver per machine, all at once: a group-commit batch then holds several requests when the kill lands."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            path = mac.replace(":", "-")
            try:
                sent = time.time()
                async with session.get(f"{url}/boot/{path}.ipxe") as response:
                    script = await response.text()
                    if response.status != 200:
                        continue
                answered = time.time()
                if "bootserver.token=" not in script:  # being provisioned (or deployed): no token for a new boot
                    acked.others.append((mac, "no-boot" if "falling through" in script else "script-served",
                                         sent, answered))
                    if "falling through" not in script:  # deployed: the operator asks for it again
                        headers = {"Authorization": f"Bearer {api_token.read_text().strip()}"}
                        sent = time.time()
                        async with session.post(f"{url}/api/v1/machines/{path}/reprovision", headers=headers) as r:
                            if r.status == 200:
                                acked.others.append((mac, "reprovision-requested", sent, time.time()))
                    await asyncio.sleep(0.05)
                    continue
                token = re.search(r"bootserver\.token=(\S+)", script)[1]
                acked.scripts[token.split(".")[0]] = (sent, answered)
                async with session.get(f"{url}/boot/{path}/kernel") as response:
                    await response.read()
                body = {"token": token, "ip": "127.0.0.1", "host_key": host_key, "disks": []}
                async with session.post(f"{url}/boot/{path}/phone-home", json=body) as response:
                    if response.status == 202:
                        acked.phone_homes.add(token.split(".")[0])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the server is dead or dying: keep trying until the test stops us


def check_database(data: Path, acked: Acked) -> None:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        issued = dict(db.execute("SELECT json_extract(detail, '$.token_issued'), time FROM events "
                                 "WHERE kind = 'script-served'").fetchall())
        lost = acked.scripts.keys() - issued.keys()
        assert not lost, f"scripts acknowledged with tokens {sorted(lost)} have no script-served event"
        assert not acked.scripts.keys() - {row[0] for row in db.execute("SELECT id FROM tokens")}, \
            "an acked token is gone"
        spent = {row[0] for row in db.execute("SELECT id FROM tokens WHERE used IS NOT NULL")}
        lost = acked.phone_homes - spent
        assert not lost, f"phone-homes acknowledged with tokens {sorted(lost)} were not kept"
        phoned = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'phoned-home'").fetchone()[0]
        assert phoned >= len(acked.phone_homes)
        low, high = clock_offset(acked, issued)
        for (mac, kind), requests in _by_machine(acked.others).items():
            stamps = [row[0] for row in db.execute("SELECT time FROM events WHERE mac = ? AND kind = ? ORDER BY time",
                                                   (mac, kind))]
            left = unmatched(requests, stamps, low, high)
            assert not left, f"{mac} {kind}: {len(left)} acknowledged requests have no event of their own (the " \
                             f"first sent {left[0][0]:.6f}, answered {left[0][1]:.6f}; the server's clock {low:+.6f} " \
                             f"to {high:+.6f} s off ours)"
    finally:
        db.close()


def _by_machine(others: list[tuple[str, str, float, float]]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    grouped: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for mac, kind, sent, answered in others:
        grouped.setdefault((mac, kind), []).append((sent, answered))
    return grouped


def unmatched(requests: list[tuple[float, float]], stamps: list[float], low: float,
               high: float) -> list[tuple[float, float]]:
    """The requests left without an event of their own when each takes one stamp in its window, none shared.

    A window is [sent + low, answered + high]: wider than the truth by the offset's uncertainty, which can exceed
    the pause between one machine's requests, so a window may also hold its neighbour's stamp. Counting stamps per
    window then fails on a correct store; a matching does not, and a lost event still shows: its request is left
    without a stamp (one driver's requests come one at a time, so their windows are in order and taking the earliest
    free stamp for each, in order, finds a matching whenever one exists)."""
    free = sorted(stamps)
    left = []
    for sent, answered in sorted(requests, key=lambda r: r[1]):
        fits = next((i for i, t in enumerate(free) if sent + low <= t <= answered + high), None)
        if fits is None:
            left.append((sent, answered))
        else:
            del free[fits]
    return left


def clock_offset(acked: Acked, stamps: dict[str, float]) -> tuple[float, float]:
    """The bounds of (the server's clock - ours): each script's event was stamped between its sending and its
    answer (no scripts: one clock). Bounds that contradict each other mean the clocks drifted apart (or a stamp
    is not what we think)."""
    low = max((stamps[token] - answered for token, (_, answered) in acked.scripts.items()), default=0.0)
    high = min((stamps[token] - sent for token, (sent, _) in acked.scripts.items()), default=0.0)
    assert low <= high, f"no one offset between the clocks fits every script: {low:+.6f} > {high:+.6f} s"
    return low, high


async def store_figures(url: str) -> tuple[int, int, int]:
    """The running server's /metrics about its store: asserts that its live connection commits with
    synchronous=FULL in WAL mode, and returns (group commits, requests they held, the most one held) so far.

    A kill -9 cannot tell FULL from OFF: after a process crash the operating system still writes out what SQLite
    handed it, so both keep every acknowledged event; only a power cut loses them under OFF (tests/test_vm_powercut.py
    cuts one). So the kill trials read the setting off the server's own connection instead of trusting it."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(await response.text()) for s in family.samples}
    assert samples[("bootserver_store_info", (("backend", "sqlite"), ("journal_mode", "wal"),
                                              ("synchronous", "full")))] == 1, samples
    return (int(samples[("bootserver_store_group_commits_total", ())]),
            int(samples[("bootserver_store_group_committed_requests_total", ())]),
            int(samples[("bootserver_store_largest_group_commit", ())]))


def states(data: Path, macs: list[str]) -> dict[str, str]:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        marks = ",".join("?" * len(macs))
        return dict(db.execute(f"SELECT mac, state FROM machines WHERE mac IN ({marks})", macs).fetchall())
    finally:
        db.close()


def in_progress(data: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        marks = ",".join("?" * len(IN_PROGRESS))
        return db.execute(f"SELECT mac, state FROM machines WHERE state IN ({marks})", IN_PROGRESS).fetchall()
    finally:
        db.close()
