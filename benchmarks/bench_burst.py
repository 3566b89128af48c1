"""Phone-home burst: N booted machines call home at the same instant.

Each emulated machine first GETs its iPXE script (for its one-time token; 50 at a time), then all N POST
/boot/{mac}/phone-home together, each on a new connection from its own source address, as N agents that
booted together would. Measured: the POST latency (p50/p99/max), the status codes, whether every machine ends
deployed or failed, and the most SSH sessions open at once as seen by the SSH servers themselves (the
server's `provision_concurrency` cap is 8).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass

from common import (
    MIB,
    Ours,
    cpu_seconds,
    free_port,
    med,
    parse_args,
    peak_rss_mib,
    percentile,
    pinning_note,
    random_file,
    run_label,
    spread,
    table,
    target_lines,
    wait_reading_stdin,
    workdir,
    write_section,
)
from fleet import Pools, address, get_script, mac, script_urls, session, site_toml, wait_terminal

from bootserver.provision.pki import ServerKeys

CONCURRENCY = 8
CURL_PROCESSES = 4  # curl's --parallel-max is at most 300 transfers per process


async def curl_burst(base: str, tokens: dict[int, str], host_keys: dict[int, str]
                     ) -> tuple[list[float], collections.Counter[str], float]:
    """Every machine's POST at once: curl in parallel mode, CURL_PROCESSES processes, each transfer on its own
    connection from its machine's address. C clients, so that the driver's own CPU (a Python client spent ~1 ms
    per request) is not measured as the server's latency. The processes are started first and wait for their
    transfers on their standard input (`--config -`); the clock starts when those are written. Returns each
    POST's time_total (connect to last byte, as curl saw it), the status codes and the seconds from the start
    to the last curl's exit."""
    count = len(tokens)
    configs = []
    for p in range(CURL_PROCESSES):
        lines = []
        for i in range(p, count, CURL_PROCESSES):
            body = json.dumps({"token": tokens[i], "ip": address(i), "host_key": host_keys[i],
                               "kernel": "6.1.0-bench", "disks": []})
            path = mac(i).replace(":", "-")
            lines += [f'url = "{base}/boot/{path}/phone-home"', f'interface = "{address(i)}"',
                      'header = "Content-Type: application/json"', f"data-binary = {json.dumps(body)}",
                      'output = "/dev/null"', "silent", 'max-time = 120',
                      'write-out = "%{http_code} %{time_total}\\n"', "next"]
        configs.append(("\n".join(lines[:-1]) + "\n").encode())
    # --next separates transfers in the config: every option but the global ones is given per transfer.
    argv = ["curl", "--no-progress-meter", "--parallel", "--parallel-immediate", "--parallel-max", "300",
            "--config", "-"]
    procs = [await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                  stdout=asyncio.subprocess.PIPE) for _ in configs]
    wait_reading_stdin([proc.pid for proc in procs])
    t0 = time.monotonic()
    for proc, config in zip(procs, configs, strict=True):
        proc.stdin.write(config)
        proc.stdin.close()
    outputs = await asyncio.gather(*(proc.communicate() for proc in procs))
    seconds = time.monotonic() - t0
    latency: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    for out, _ in outputs:
        for line in out.decode().splitlines():
            code, seconds_text = line.split()
            statuses["connection failed" if code == "000" else code] += 1
            latency.append(float(seconds_text))
    statuses["no answer"] += count - len(latency)
    return latency, +statuses, seconds


@dataclass
class Round:
    """One burst on a new server, store and fleet."""

    count: int
    latency: list[float]  # seconds, one per answered POST
    statuses: collections.Counter[str]
    burst_seconds: float  # all answered after
    terminal_at: float  # burst -> every machine deployed or failed
    last_finish: float
    states: dict[str, int]
    max_ssh: int
    cpu: float
    rss: float
    pool_processes: int

    @property
    def terminal(self) -> int:
        return sum(self.states.get(s, 0) for s in ("deployed", "failed"))

    @property
    def five(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.isdigit() and s.startswith("5"))

    def ms(self, p: float) -> float:
        return 1000 * (percentile(self.latency, p) if p < 100 else max(self.latency, default=float("nan")))


async def burst(count: int, quick: bool) -> Round:
    with workdir("bench-burst-") as scratch:
        data = scratch / "data"
        random_file(data / "images" / "vmlinuz", MIB)
        random_file(data / "images" / "initrd.img", MIB)
        nodes = scratch / "nodes"
        nodes.mkdir()
        keys = ServerKeys.load_or_create(data / "keys")
        pools = Pools(count)
        await pools.start(keys.ssh_public, nodes, per_process=250)
        http_port = free_port()
        toml = site_toml(data=data, http_port=http_port, tftp_port=None, ipxe_dir=scratch, nodes_dir=nodes,
                         pools=pools, blob_bytes=64 * 1024, concurrency=CONCURRENCY)
        server = Ours(scratch, toml, http_port).start()
        sessions = [session(i, 120) for i in range(count)]
        try:
            tokens: dict[int, str] = {}
            gate = asyncio.Semaphore(50)

            async def fetch(i: int) -> None:
                async with gate:
                    tokens[i] = script_urls(await get_script(sessions[i], server.url, i))[2]

            await asyncio.wait_for(asyncio.gather(*(fetch(i) for i in range(count))), 300)
            for s in sessions:
                await s.close()
            sessions = []
            cpu0 = cpu_seconds(server.pid)
            wall0 = time.time()
            t0 = time.monotonic()
            latency, statuses, burst_seconds = await curl_burst(server.url, tokens, pools.host_keys)
            states = await wait_terminal(server.url, count, time.monotonic() + (240 if quick else 400))
            terminal_at = time.monotonic() - t0
            cpu = cpu_seconds(server.pid) - cpu0
            rss = peak_rss_mib(server.pid)
        finally:
            for s in sessions:
                await s.close()
            server.stop()
            await pools.stop()
        last_finish = max(pools.finished.values()) - wall0 if pools.finished else float("nan")
    return Round(count, latency, statuses, burst_seconds, terminal_at, last_finish, states, pools.max_concurrent(),
                 cpu, rss, len(pools.processes))


def report(rounds: list[Round], quick: bool) -> str:
    count, n = rounds[0].count, len(rounds)
    p99 = med([r.ms(99) for r in rounds])
    five = sum(r.five for r in rounds)
    terminal = med([r.terminal for r in rounds])
    peak = max(r.max_ssh for r in rounds)
    checks = [(f"phone-home p99 < 500 ms ({spread([r.ms(99) for r in rounds], '{:.0f}')} ms)", p99 < 500),
              (f"no 5xx ({five} over {n} round{'s' * (n > 1)})", five == 0),
              (f"every machine deployed or failed ({spread([r.terminal for r in rounds], '{:.0f}')}/{count})",
               terminal == count),
              (f"SSH sessions at once <= provision_concurrency (at most {peak} <= {CONCURRENCY})",
               peak <= CONCURRENCY)]
    statuses: collections.Counter[str] = sum((r.statuses for r in rounds), collections.Counter())
    not_202 = sum(v for k, v in statuses.items() if k != "202")
    rows = [
        ["phone-home latency p50 / p99 / max", " / ".join(spread([r.ms(p) for r in rounds], "{:.0f}")
                                                          for p in (50, 99, 100)) + " ms"],
        ["all answered after", spread([r.burst_seconds for r in rounds], "{:.2f}") + " s"],
        ["status codes, all rounds", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
         + f" (not 202: {not_202})"],
        ["states at the end", " | ".join(", ".join(f"{k} {v}" for k, v in sorted(r.states.items())) for r in rounds)],
        ["burst -> every machine terminal", f"{spread([r.terminal_at for r in rounds])} s (last finish step seen by "
                                            f"an SSH server at {spread([r.last_finish for r in rounds])} s)"],
        ["max concurrent SSH sessions (seen by the SSH servers)",
         f"{spread([r.max_ssh for r in rounds], '{:.0f}')} (cap {CONCURRENCY})"],
        ["server CPU from the burst to the end", spread([r.cpu for r in rounds]) + " s"],
        ["server peak RSS (VmHWM)", spread([r.rss for r in rounds], "{:.0f}") + " MiB"],
    ]
    out = [f"## Phone-home burst: {count} machines at once ({run_label(n, quick)})\n",
           f"Tokens from {count} script GETs first (50 at a time); then all {count} POSTs sent together by "
           f"{CURL_PROCESSES} curl processes in parallel mode, each POST on a new connection from its own 127/8 "
           f"address; latency is curl's time_total per POST. The curl processes are started first and wait for "
           f"their POSTs on standard input; \"all answered after\" runs from when those are handed over. "
           f"Provisioning: the deploy check (64 KiB written and hashed in a scratch directory + 0.2 s) on a real "
           f"SSH server per machine ({rounds[0].pool_processes} processes of tests/support/sshd.py servers). "
           f"Pinning: {pinning_note(brief=True)}; the curl processes and SSH servers are the clients. Every "
           f"round is a new server, store and fleet; median (min-max) over rounds, the verdicts on the median (5xx "
           f"and the SSH cap: on every round).\n",
           table(["", "result"], rows), "\nTargets:\n",
           target_lines(checks)]
    return "\n".join(out) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    count = 250 if args.quick else 1000
    rounds = []
    for r in range(args.rounds or (1 if args.quick else 3)):
        rounds.append(asyncio.run(burst(count, args.quick)))
        print(f"  burst round {r + 1}: p99 {rounds[-1].ms(99):.0f} ms, {rounds[-1].terminal}/{count} terminal",
              file=sys.stderr, flush=True)
    write_section("burst", report(rounds, args.quick))


if __name__ == "__main__":
    main()
