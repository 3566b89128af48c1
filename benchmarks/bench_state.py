"""Scale of state: the status pages and API with 10,000 machines of 100 events each in the store.

The store is generated through bootserver.store.Store's own API (record, add_token, phoned_home) on tmpfs,
where fsync is free, then copied to the server's data_dir on the real disk. Each machine has booted 7 times:
DHCP, script, kernel, initrd, overlay, phone-home (a pinned ed25519 host key), deploy and finish steps with
their commands, deployed. Then wrk, one connection (a person's browser; p99 over every request of the run),
and 8 connections for the per-machine pages; and /metrics, which a Prometheus server scrapes every 15-60 s.
The operator's views (the list sorted by boot length, the fleet page, the waterfall's JSON) are measured once the
server has read the event log into its fleet (fleet.py), which it does once at start.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncssh
from common import (
    Ours,
    free_port,
    med,
    parse_args,
    pinning_note,
    py_spy,
    run_label,
    spread,
    summarize_profile,
    table,
    target_lines,
    verdict,
    workdir,
    write_section,
    wrk,
)

from bootserver import tokens
from bootserver.store import Store

BOOT = ["dhcp", "script-served", "file-served:kernel", "file-served:initrd", "file-served:overlay", "phoned-home",
        "step-started:deploy", "command:check", "command:ls", "step-done:deploy", "step-started:finish",
        "command:finish", "step-done:finish", "deployed"]


def mac(i: int) -> str:
    return f"52:54:00:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"


def generate(path: Path, machines: int, events: int) -> float:
    """Fill a store at `path`; the seconds it took."""
    started = time.monotonic()
    store = Store(path)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    try:
        for i in range(machines):
            m = mac(i)
            if i % 1000 == 0:
                host_key = asyncssh.generate_private_key("ssh-ed25519")  # a few distinct keys are enough
            key_line = host_key.export_public_key().decode().strip()
            ip = f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF}"
            for n in range(events):
                step = BOOT[n % len(BOOT)]
                kind, _, what = step.partition(":")
                if kind == "dhcp":
                    store.record(m, "dhcp", {"message": "DISCOVER", "client_arch": 0, "vendor": "PXEClient:Arch:00000",
                                             "bootfile": "undionly.kpxe", "answer": "PXE firmware, architecture 0"})
                elif kind == "script-served":
                    store.record(m, kind, {"profile": "agent", "group": "default", "transport": "http",
                                           "reason": "group default (no selector: matches all)"},
                                 state="script-served", facts={"platform": "pcbios", "arch": "x86_64",
                                                               "uuid": f"00000000-0000-0000-0000-{i:012x}"})
                elif kind == "file-served":
                    size = {"kernel": 8 << 20, "initrd": 40 << 20, "overlay": 1024}[what]
                    store.record(m, kind, {"file": f"agent-{what}", "protocol": "http", "bytes": size, "size": size,
                                           "seconds": 0.42}, state="kernel-served" if what == "kernel" else None)
                elif kind == "phoned-home":
                    token, record = tokens.new_token(m, 30)
                    store.add_token(record)
                    store.phoned_home(record.id, m, ip, key_line,
                                      {"ip": ip, "host_key": key_line, "fingerprint": "SHA256:bench",
                                       "kernel": "6.1.0-bench", "disks": [{"name": "vda", "size_bytes": 8 << 30,
                                                                          "partitions": 0}]})
                elif kind == "step-started":
                    store.record(m, kind, {"step": what}, state={"deploy": "deploy", "finish": "finishing"}[what])
                elif kind == "command":
                    store.record(m, kind, {"step": "deploy", "command": f"TARGET=/ sh -c 'test -x /usr/bin/{what}'",
                                           "exit_status": 0, "seconds": 0.2, "stdout_tail": "ok\n" * 20,
                                           "stderr_tail": ""})
                elif kind == "step-done":
                    store.record(m, kind, {"step": what, "seconds": 0.25})
                else:
                    store.record(m, "deployed", {"profile": "agent"}, state="deployed")
            if i % 1000 == 999:
                print(f"  state: {i + 1} machines generated, {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
    finally:
        store.close()
    return time.monotonic() - started


def fleet_read(url: str, timeout: float = 600) -> float:
    """Wait until the server has read its event log into the fleet (/api/v1/fleet's `behind` is 0); how long."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with urllib.request.urlopen(f"{url}/api/v1/fleet", timeout=60) as response:
            if json.load(response)["behind"] == 0:
                return time.monotonic() - started
        time.sleep(1)
    raise RuntimeError(f"the server had not read its event log after {timeout:.0f} s")


def main() -> None:
    args = parse_args(__doc__)
    machines = 10_000
    events = 10 if args.quick else 100
    seconds = 3 if args.quick else 10
    rounds = args.rounds or (1 if args.quick else 3)
    with workdir("bench-state-") as scratch, tempfile.TemporaryDirectory(prefix="bench-state-", dir="/dev/shm") as shm:
        built = Path(shm) / "bootserver.sqlite3"
        took = generate(built, machines, events)
        data = scratch / "data"
        data.mkdir()
        shutil.copy(built, data / "bootserver.sqlite3")
        size_mb = built.stat().st_size / 1e6
        port = free_port()
        with Ours(scratch, f'[server]\nhttp = "127.0.0.1:{port}"\ntftp = "off"\ndata_dir = "{data}"\n'
                  'new_machines_per_minute = 1000000\n', port) as ours:
            middle = mac(machines // 2)
            read = fleet_read(ours.url)
            print(f"  state: the server read the event log into its fleet in {read:.0f} s", file=sys.stderr, flush=True)
            # (path, connections, whether the issue sets it a target); /metrics sums what the store holds
            pages = [("/api/v1/machines", 1, True), ("/", 1, True), (f"/machines/{middle}", 1, True),
                     (f"/api/v1/machines/{middle}", 1, True), ("/?sort=boot&order=desc", 1, True),
                     ("/fleet", 1, True), ("/api/v1/fleet", 1, True), (f"/api/v1/machines/{middle}/waterfall", 1, True),
                     (f"/machines/{middle}", 8, False), (f"/api/v1/machines/{middle}", 8, False),
                     ("/metrics", 1, False)]
            runs: dict[tuple[str, int], list] = {(path, c): [] for path, c, _ in pages}
            for r in range(rounds):
                for path, connections, _ in pages:
                    result = wrk(f"{ours.url}{path}", connections, seconds, threads=1, timeout=30)
                    runs[(path, connections)].append(result)
                    print(f"  state {path} c={connections} round {r + 1}: p99 {result.p99_ms:.0f} ms",
                          file=sys.stderr, flush=True)
            rows = []
            targets = []
            for path, connections, target in pages:
                got = runs[(path, connections)]
                p99 = med([g.p99_ms for g in got])
                errors = sum(g.errors for g in got)
                ok = p99 < 100 and errors == 0
                size = med([g.bytes / g.requests / 1000 for g in got if g.requests])
                mark = ""
                if target:
                    mark = verdict(ok)
                    targets.append((f"{path} p99 < 100 ms ({spread([g.p99_ms for g in got], '{:.0f}')} ms)", ok))
                rows.append([f"`{path}`", connections, spread([g.requests for g in got], "{:.0f}"),
                             spread([g.rps for g in got]), spread([g.p50_ms for g in got]),
                             spread([g.p99_ms for g in got]), f"{size:.0f} KB", errors, mark])
            profiles = []
            if shutil.which("py-spy"):
                for path in ("/api/v1/machines", "/"):
                    url = f"{ours.url}{path}"
                    result, spent, raw = py_spy(ours.pid, lambda u=url: wrk(u, 1, min(seconds, 5), threads=1,
                                                                              timeout=30))
                    profiles.append(f"\n#### `{path}` ({result.requests} requests under the profiler)\n\n"
                                    + summarize_profile(raw, spent, top=10))
    mode = run_label(rounds, args.quick)
    out = [f"## Scale of state: {machines:,} machines x {events} events ({mode})\n",
           f"Store generated through Store's API in {took:.0f} s on tmpfs ({size_mb:.0f} MB), then served from the "
           f"real disk ({pinning_note(brief=True)}); the server read its event log into its fleet in {read:.0f} s. "
           f"wrk, {seconds} s per line, every line once a round on the same "
           f"server and store; p99 over every request of a run; median (min-max) over rounds, the verdict on the "
           f"median p99 (and no error in any round).\n",
           table(["page", "connections", "requests", "req/s", "p50 ms", "p99 ms", "response", "errors",
                  "target p99 < 100 ms"], rows),
           "\nTargets:\n", target_lines(targets),
           "\n### Profile of the machine list (py-spy, one connection)\n", *profiles]
    write_section("state", "\n".join(out) + "\n")


if __name__ == "__main__":
    main()
