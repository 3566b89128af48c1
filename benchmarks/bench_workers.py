"""HTTP on every CPU: the per-machine iPXE script with [server] workers = 1 and = one per CPU, beside nginx.

The other sections pin each server to one CPU and its clients to the rest, which is the fair way to compare one
process with another, and leaves a server's extra processes nothing to run on. Here nothing is pinned: ours with
one process, ours with a process per CPU (the default), and nginx with a worker per CPU (worker_processes auto)
each share every CPU of the machine with wrk, in turn. On a machine of two CPUs the client takes much of the second
one: this shows what the workers win where they must share, not what they would on a server of their own.
"""

from __future__ import annotations

import collections
import os
import sys
import urllib.request
from pathlib import Path

from common import (
    Ours,
    all_cpus,
    alternate,
    free_port,
    med,
    nginx,
    open_loop,
    parse_args,
    process_tree_cpu,
    random_file,
    run_label,
    spread,
    table,
    target_lines,
    workdir,
    write_section,
    wrk,
)

MAC = "52:54:00:00:00:01"
MAC_PATH = MAC.replace(":", "-")
RATES = (1000, 2000, 3000)  # the open loop's arrival rates (req/s)


def site(data: Path, http_port: int, workers: int) -> str:
    return (f'[server]\nhttp = "127.0.0.1:{http_port}"\ntftp = "off"\ndata_dir = "{data}"\nworkers = {workers}\n'
            '[assets]\nvmlinuz = "images/vmlinuz"\n'
            '[profiles.linux]\nkernel = "vmlinuz"\ncmdline = "console=ttyS0 quiet"\n'
            '[groups.all]\nprofile = "linux"\n'
            f'[machines."{MAC}"]\nhostname = "node1"\n')


def main() -> None:
    args = parse_args(__doc__)
    os.sched_setaffinity(0, all_cpus())  # the clients too: nothing is pinned here
    cpus = len(all_cpus())
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 3 if args.quick else 8
    one, many, reference = "ours, workers = 1", f"ours, workers = {cpus}", "nginx, a worker per CPU"
    with workdir("bench-workers-") as scratch:
        servers = {}
        for name, workers in ((one, 1), (many, cpus)):
            data = scratch / f"data-{workers}"
            random_file(data / "images" / "vmlinuz", 1 << 20)
            (scratch / f"ours-{workers}").mkdir()
            port = free_port()
            servers[name] = Ours(scratch / f"ours-{workers}", site(data, port, workers), port, pinned=False)
        with servers[one] as ours_one, servers[many] as ours_many:
            with urllib.request.urlopen(f"{ours_one.url}/boot/{MAC_PATH}.ipxe") as response:
                script = response.read()
            static = scratch / "static"
            static.mkdir()
            (static / "script.ipxe").write_bytes(script)
            with nginx(static, scratch, pinned=False) as (nginx_port, nginx_process):
                urls = {one: (ours_one.pid, f"{ours_one.url}/boot/{MAC_PATH}.ipxe"),
                        many: (ours_many.pid, f"{ours_many.url}/boot/{MAC_PATH}.ipxe"),
                        reference: (nginx_process.pid, f"http://127.0.0.1:{nginx_port}/script.ipxe")}
                closed = closed_loop(urls, rounds, seconds)
                opened = open_loops({name: url for name, (_, url) in urls.items()}, rounds, args.quick)
    runs = closed
    gain = [b.rps / a.rps for (a, _), (b, _) in zip(runs[one], runs[many], strict=True)]
    rows = []
    for name in urls:
        results = runs[name]
        rows.append([name, spread([r.rps for r, _ in results], "{:,.0f}"),
                     spread([r.p50_ms for r, _ in results], "{:.2f}"), spread([r.p99_ms for r, _ in results], "{:.2f}"),
                     sum(r.errors for r, _ in results),
                     spread([c / r.requests * 1e6 for r, c in results if r.requests], "{:.0f}")])
    targets = [(f"workers = {cpus} answer more scripts than one process (x{med(gain):.2f} its req/s)", med(gain) > 1.0)]
    out = [f"## HTTP on every CPU: workers (unpinned, {run_label(rounds, args.quick)})\n",
           f"The per-machine script (`GET /boot/{MAC_PATH}.ipxe`, {len(script)} bytes: template, signed token, "
           f"records written behind) at 50 connections, wrk 4.1 with 2 threads, {seconds} s per run; nginx serves a "
           f"static copy. Nothing pinned: every server and wrk share the machine's {cpus} CPUs. Server CPU: the "
           f"process and its children (workers). Workers = {cpus} over workers = 1, per round: "
           f"{spread(gain, '{:.2f}x')}.\n",
           table(["server", "req/s", "p50 ms", "p99 ms", "errors", "server CPU us/request"], rows),
           opened, "\n### Workers targets\n", target_lines(targets)]
    write_section("workers", "\n".join(out))


def closed_loop(urls: dict[str, tuple[int, str]], rounds: int, seconds: float) -> dict[str, list]:
    runs: dict[str, list] = collections.defaultdict(list)
    for r in range(rounds):
        for name in alternate(list(urls), r):
            pid, url = urls[name]
            before = process_tree_cpu(pid)
            result = wrk(url, 50, seconds, threads=2, timeout=10)
            runs[name].append((result, process_tree_cpu(pid) - before))
        print(f"  workers c=50 round {r + 1}: " + ", ".join(f"{n} {runs[n][-1][0].rps:,.0f} req/s" for n in urls),
              file=sys.stderr, flush=True)
    return runs


def open_loops(urls: dict[str, str], rounds: int, quick: bool) -> str:
    seconds = 3 if quick else 6
    rows = []
    for rate in RATES:
        runs: dict[str, list] = collections.defaultdict(list)
        for r in range(rounds):
            for name in alternate(list(urls), r):
                runs[name].append(open_loop(urls[name], rate, seconds))
        for name in urls:
            results = runs[name]
            rows.append([f"{rate:,}", name, spread([x.achieved_rps for x in results], "{:,.0f}"),
                         spread([x.p50_ms for x in results], "{:.2f}"), spread([x.p99_ms for x in results], "{:.2f}"),
                         spread([x.max_ms for x in results], "{:.1f}"),
                         sum(x.scheduled - x.completed for x in results)])
        print(f"  workers open loop {rate}/s: " + ", ".join(f"{n} p99 {med([x.p99_ms for x in runs[n]]):.1f} ms"
                                                           for n in urls), file=sys.stderr, flush=True)
    return "\n".join([
        f"\n### The script at a constant arrival rate (open loop, {seconds} s per run, unpinned)\n",
        "benchmarks/openloop.py: latency from each request's due time, 50 connections.\n",
        table(["rate req/s", "server", "answered req/s", "p50 ms", "p99 ms", "max ms", "unanswered"], rows)])


if __name__ == "__main__":
    main()
