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
import time

from common import (
    MIB,
    Ours,
    cpu_seconds,
    free_port,
    parse_args,
    peak_rss_mib,
    percentile,
    pinning_note,
    random_file,
    table,
    verdict,
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


async def burst(count: int, quick: bool) -> str:
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
    terminal = sum(states.get(s, 0) for s in ("deployed", "failed"))
    p99 = percentile(latency, 99)
    five = sum(n for s, n in statuses.items() if s.isdigit() and s.startswith("5"))
    not_202 = sum(n for s, n in statuses.items() if s != "202")
    peak = pools.max_concurrent()
    checks = [(f"phone-home p99 < 500 ms ({p99 * 1000:.0f} ms)", p99 < 0.5),
              (f"no 5xx ({five})", five == 0),
              (f"every machine deployed or failed ({terminal}/{count})", terminal == count),
              (f"SSH sessions at once <= provision_concurrency ({peak} <= {CONCURRENCY})", peak <= CONCURRENCY)]
    rows = [
        ["phone-home latency p50 / p99 / max", f"{percentile(latency, 50) * 1000:.0f} / {p99 * 1000:.0f} / "
                                              f"{max(latency) * 1000:.0f} ms"],
        ["all answered after", f"{burst_seconds:.2f} s"],
        ["status codes", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) + f" (not 202: {not_202})"],
        ["states at the end", ", ".join(f"{k} {v}" for k, v in sorted(states.items()))],
        ["burst -> every machine terminal", f"{terminal_at:.1f} s (last finish step seen by an SSH server at "
                                            f"{last_finish:.1f} s)"],
        ["max concurrent SSH sessions (seen by the SSH servers)", f"{peak} (cap {CONCURRENCY})"],
        ["server CPU from the burst to the end", f"{cpu:.1f} s"],
        ["server peak RSS (VmHWM)", f"{rss:.0f} MiB"],
    ]
    out = [f"## Phone-home burst: {count} machines at once{' (--quick)' if quick else ''}\n",
           f"Tokens from {count} script GETs first (50 at a time); then all {count} POSTs sent together by "
           f"{CURL_PROCESSES} curl processes in parallel mode, each POST on a new connection from its own 127/8 "
           f"address; latency is curl's time_total per POST. The curl processes are started first and wait for "
           f"their POSTs on standard input; \"all answered after\" runs from when those are handed over. "
           f"Provisioning: the deploy check (64 KiB written and hashed in a scratch directory + 0.2 s) on a real "
           f"SSH server per machine ({len(pools.processes)} processes of tests/support/sshd.py servers). "
           f"{pinning_note(brief=True)}: the curl processes and SSH servers are the clients.\n",
           table(["", "result"], rows), "\nTargets:\n",
           "\n".join(f"- {verdict(ok)}: {what}" for what, ok in checks)]
    return "\n".join(out) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    count = 250 if args.quick else 1000
    write_section("burst", asyncio.run(burst(count, args.quick)))


if __name__ == "__main__":
    main()
