"""What a server acknowledged to machines booting over and over, and the proof in its store that it kept each
one: shared by the kill -9 trials (tests/test_crash.py) and the power cut (tests/test_vm_powercut.py)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterable
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

    A script with a token is the exception: its record is written behind (see behind_lost).

    When the server runs on another clock (in a VM), the offset between the clocks is read off the scripts: each
    one's event is known by its token, so its stamp bounds the offset by its sending and answering times."""

    scripts: dict[str, tuple[float, float]] = field(default_factory=dict)  # token id of a script -> (sent, answered)
    lost_behind: set[str] = field(default_factory=set)  # scripts whose records a kill took (see behind_lost)
    phone_homes: set[str] = field(default_factory=set)  # token ids of phone-homes answered 202
    others: list[tuple[str, str, float, float]] = field(default_factory=list)  # (mac, kind, sent, answered)

    def __len__(self) -> int:
        return len(self.scripts) + len(self.lost_behind) + len(self.phone_homes) + len(self.others)


async def drive(url: str, host_key: str, mac: str, acked: Acked, api_token: Path, agent: bool = True) -> None:
    """Boot one machine over and over as its firmware and agent would; note what the server acknowledged.
    One driver per machine, all at once: a group-commit batch then holds several requests when the kill lands.
    `agent` False: a machine that only asks for its script, again and again (its firmware never boots what it
    gets): nothing follows a script's record written behind, so a kill finds some of them still in memory."""
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
                if not agent:
                    await asyncio.sleep(0.01)
                    continue
                async with session.get(f"{url}/boot/{path}/kernel") as response:
                    await response.read()
                body = {"token": token, "ip": "127.0.0.1", "host_key": host_key, "disks": []}
                async with session.post(f"{url}/boot/{path}/phone-home", json=body) as response:
                    if response.status == 202:
                        acked.phone_homes.add(token.split(".")[0])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the server is dead or dying: keep trying until the test stops us


def check_database(data: Path, acked: Acked) -> int:
    """Asserts that the store kept what `acked` says was acknowledged; how many scripts' records it may have lost
    with the server (the last write-behind interval's, see behind_lost)."""
    db = sqlite3.connect(data / "bootserver.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        issued = dict(db.execute("SELECT json_extract(detail, '$.token_issued'), time FROM events "
                                 "WHERE kind = 'script-served'").fetchall())
        behind = behind_lost(acked, issued.keys())
        for token in behind:  # lost with that server, as it may: the next check must not count them again
            del acked.scripts[token]
        acked.lost_behind |= behind
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
        return len(behind)
    finally:
        db.close()


def behind_lost(acked: Acked, stored: Iterable[str]) -> set[str]:
    """The acknowledged scripts whose records are not in the store, if the server may have lost them with itself.

    A script with a token is answered before its record is written (Store.record_behind, within 100 ms): a killed
    server may lose the records of the scripts it answered last. Only those: records are written in the order they
    were made, each write taking all that wait, so a script answered before a stored one was even sent was stored
    too; and all are written before a phone-home is answered. Anything else missing fails here."""
    lost = acked.scripts.keys() - set(stored)
    kept = acked.scripts.keys() - lost
    newest_sent = max((acked.scripts[token][0] for token in kept), default=float("-inf"))
    early = sorted(token for token in lost if acked.scripts[token][1] < newest_sent)
    assert not early, f"scripts acknowledged with tokens {early} (sent, answered: " \
                      f"{[acked.scripts[t] for t in early]}) have no script-served event, though a script sent " \
                      f"after they were answered ({newest_sent:.6f}) has one: more than the last write-behind " \
                      f"interval was lost"
    assert not lost & acked.phone_homes, f"scripts of acknowledged phone-homes {sorted(lost & acked.phone_homes)} " \
                                         f"have no script-served event"
    return lost


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
    known = [(stamps[token], sent, answered) for token, (sent, answered) in acked.scripts.items() if token in stamps]
    low = max((stamp - answered for stamp, _, answered in known), default=0.0)
    high = min((stamp - sent for stamp, sent, _ in known), default=0.0)
    assert low <= high, f"no one offset between the clocks fits every script: {low:+.6f} > {high:+.6f} s"
    return low, high


async def store_figures(url: str) -> tuple[int, int, int]:
    """The running server's /metrics about its store: asserts that its live connection commits with
    synchronous=FULL in WAL mode, and returns the writes that may hold several requests' records (group commits and
    write-behind flushes) so far: (writes, records they held, the most one held).

    A kill -9 cannot tell FULL from OFF: after a process crash the operating system still writes out what SQLite
    handed it, so both keep every acknowledged event; only a power cut loses them under OFF (tests/test_vm_powercut.py
    cuts one). So the kill trials read the setting off the server's own connection instead of trusting it."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(await response.text()) for s in family.samples}
    assert samples[("bootserver_store_info", (("backend", "sqlite"), ("journal_mode", "wal"),
                                              ("synchronous", "full")))] == 1, samples
    def figure(name: str) -> int:
        return int(samples[(f"bootserver_store_{name}", ())])

    return (figure("group_commits_total") + figure("behind_flushes_total"),
            figure("group_committed_requests_total") + figure("written_behind_total"),
            max(figure("largest_group_commit"), figure("largest_behind")))


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
