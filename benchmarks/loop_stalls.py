"""Where the event loops stall under the per-machine script load: a diagnosis, not a section of benchmarks/run.

`bootserver serve` (nothing pinned, `--workers` processes, the workers section's site) under wrk at 50
connections, `--rounds` runs of `--seconds`; every asyncio callback of every server process that runs longer than
STALL_MS is timed and named (a `sitecustomize` on the server's PYTHONPATH wraps `asyncio.Handle._run`: two clock
reads per callback). Prints each run's req/s and p99, the stalls by what ran, and the write-behind figures of
/metrics (`behind_waits`: scripts that found the queue full and wrote it themselves, on the event loop).
`--tree DIR`: run another checkout's bootserver (a `git worktree` of an older commit) for a before/after.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench_workers import MAC_PATH, site
from common import MIB, ROOT, all_cpus, free_port, random_file, stop, table, wait_http, workdir, wrk

STALL_MS = 30

HOOK = f'''
import asyncio, os, sys, time
_run = asyncio.Handle._run
def _timed(handle):
    started = time.perf_counter()
    _run(handle)
    ms = (time.perf_counter() - started) * 1000
    if ms > {STALL_MS}:
        task = getattr(handle._callback, "__self__", None)
        what = task.get_coro().__qualname__ if isinstance(task, asyncio.Task) else repr(handle._callback)
        sys.stderr.write(f"STALL {{os.getpid()}} {{ms:.1f}} {{what}}\\n")
asyncio.Handle._run = _timed
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=len(all_cpus()))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose bootserver runs")
    args = parser.parse_args()
    os.sched_setaffinity(0, all_cpus())  # nothing pinned, as in the workers section
    with workdir("loop-stalls-") as scratch:
        random_file(scratch / "data" / "images" / "vmlinuz", MIB)
        (scratch / "hook").mkdir()
        (scratch / "hook" / "sitecustomize.py").write_text(HOOK)
        port = free_port()
        (scratch / "site.toml").write_text(site(scratch / "data", port, args.workers))
        env = {**os.environ, "PYTHONPATH": f"{args.tree.resolve()}{os.pathsep}{scratch / 'hook'}"}
        log = scratch / "server.log"
        with log.open("wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "bootserver", "--config", str(scratch / "site.toml"),
                                       "--log-level", "warning", "serve"], env=env, cwd=scratch, stdout=out,
                                      stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz", 30, server)
            time.sleep(2)  # every worker up, and the start's own stalls (the fleet read) over
            runs = []
            for _ in range(args.rounds):
                result = wrk(f"{base}/boot/{MAC_PATH}.ipxe", 50, args.seconds, threads=2, timeout=10)
                runs.append([f"{result.rps:,.0f}", f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}", result.errors])
            time.sleep(2)  # each process publishes its figures once a second
            with urllib.request.urlopen(f"{base}/metrics") as response:
                metrics = response.read().decode()
        finally:
            stop(server, 30)
        report(args, runs, log.read_text(), metrics)


def report(args: argparse.Namespace, runs: list, log: str, metrics: str) -> None:
    stalls: dict[str, list[float]] = collections.defaultdict(list)
    for ms, what in re.findall(r"^STALL \d+ ([\d.]+) (.+)$", log, re.M):
        stalls[re.sub(r" at 0x[0-9a-f]+", "", what)].append(float(ms))
    rows = sorted(([what, len(ms), f"{max(ms):.0f}", f"{sum(ms):.0f}"] for what, ms in stalls.items()),
                  key=lambda row: -float(row[3]))
    behind = [line for line in metrics.splitlines() if "behind" in line and not line.startswith("#")]
    print(f"## Event-loop stalls: workers = {args.workers}, {args.rounds} x {args.seconds:g} s of wrk c=50, "
          f"bootserver from {args.tree}\n")
    print(table(["run req/s", "p50 ms", "p99 ms", "errors"], runs))
    print(f"\nCallbacks over {STALL_MS} ms, every process, the whole run (its start included):\n")
    print(table(["what ran", "times", "longest ms", "total ms"], rows or [["none", 0, "", ""]]))
    print("\nWrite-behind, summed over the processes (/metrics):\n\n" + "\n".join(f"    {b}" for b in behind))


if __name__ == "__main__":
    main()
