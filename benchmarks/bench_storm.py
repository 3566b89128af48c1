"""Boot storm: N emulated machines power on at once and go all the way to deployed.

Each machine (an asyncio task of this driver, with its own source address): TFTP undionly.kpxe from our
server, GET its iPXE script (pcbios, x86_64), GET the kernel (8 MiB), the initrd (40 MiB) and its per-boot
overlay, phone home with the script's token and its SSH host key, and is then provisioned by the server over
SSH: a real SSH server per machine (tests/support/sshd.py, hosted by benchmarks/sshd_pool.py processes) runs the
profile's deploy `check` (1 MiB of random data written and hashed in a scratch directory, then 0.2 s), then
the finish step's reboot (recorded, never run). Phases are timed by the driver; provisioning (queue under
`provision_concurrency`, then SSH) from the server's own event log afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
    verdict,
    workdir,
    write_section,
)
from fleet import (
    Pools,
    address,
    download,
    get_script,
    mac,
    phone_home,
    script_urls,
    session,
    site_toml,
    tftp_get,
    wait_terminal,
)

from bootserver.provision.pki import ServerKeys
from bootserver.store import Store

KERNEL, INITRD = 8 * MIB, 40 * MIB
CONCURRENCY = 8  # provision_concurrency, the default, written out
QUEUE = "server: phoned-home -> SSH step started (queue + connect)"
SSH = "server: SSH steps -> deployed"
TOTAL = "power-on -> deployed (server event)"
PHASES = ("tftp undionly.kpxe", "script", "kernel 8 MiB", "initrd 40 MiB", "overlay cpio", "phone-home",
          "provisioned (driver: 202 -> reboot)")


async def machine(i: int, base: str, tftp: tuple[str, int], pools: Pools, phases: dict[str, list[float]],
                  errors: list[str], t0: float, done_at: dict[int, float], timeout: float) -> None:
    try:
        t = time.monotonic()
        got = await tftp_get(tftp, "undionly.kpxe", address(i))
        if got <= 0:
            raise OSError("undionly.kpxe: empty")
        phases["tftp undionly.kpxe"].append(time.monotonic() - t)
        async with session(i) as http:
            t = time.monotonic()
            script = await get_script(http, base, i)
            phases["script"].append(time.monotonic() - t)
            kernel, initrds, token = script_urls(script)
            for name, url in [("kernel 8 MiB", kernel), *((f"initrd {n + 1}", u) for n, u in enumerate(initrds))]:
                t = time.monotonic()
                await download(http, url)
                label = {"initrd 1": "initrd 40 MiB", "initrd 2": "overlay cpio"}.get(name, name)
                phases[label].append(time.monotonic() - t)
            t = time.monotonic()
            status = await phone_home(http, base, i, token, pools.host_keys[i])
            phases["phone-home"].append(time.monotonic() - t)
            if status != 202:
                raise OSError(f"phone-home: HTTP {status}")
        t = time.monotonic()
        await asyncio.wait_for(pools.events[i].wait(), max(1.0, timeout - (time.monotonic() - t0)))
        phases["provisioned (driver: 202 -> reboot)"].append(time.monotonic() - t)
        done_at[i] = time.monotonic() - t0
    except (OSError, TimeoutError) as exc:
        errors.append(f"{mac(i)}: {type(exc).__name__}: {exc}")


@dataclass
class Round:
    """One storm: what the driver, the server's event log and the SSH servers saw."""

    count: int
    deployed: int
    final: dict[str, int]
    errors: list[str]
    all_done: float  # seconds from power-on to the last machine deployed
    checks_ran: int
    cpu: float
    elapsed: float
    rss: float
    max_ssh: int
    states: dict[str, int]
    phases: dict[str, list[float]]
    kpxe_size: int
    pool_processes: int

    @property
    def complete(self) -> bool:
        return self.deployed == self.count and not self.errors


async def storm(count: int, quick: bool) -> Round:
    timeout = 300 if quick else 600
    with workdir("bench-storm-") as scratch:
        data = scratch / "data"
        random_file(data / "images" / "vmlinuz", KERNEL)
        random_file(data / "images" / "initrd.img", INITRD)
        ipxe = scratch / "ipxe"
        ipxe.mkdir()
        if Path("/usr/lib/ipxe/undionly.kpxe").is_file():
            shutil.copy("/usr/lib/ipxe/undionly.kpxe", ipxe / "undionly.kpxe")
        else:
            random_file(ipxe / "undionly.kpxe", 70 * 1024)
        kpxe_size = (ipxe / "undionly.kpxe").stat().st_size
        nodes = scratch / "nodes"
        nodes.mkdir()
        keys = ServerKeys.load_or_create(data / "keys")  # the server finds and uses these
        pools = Pools(count)
        await pools.start(keys.ssh_public, nodes, per_process=125)
        http_port, tftp_port = free_port(), free_port(2)  # SOCK_DGRAM
        toml = site_toml(data=data, http_port=http_port, tftp_port=tftp_port, ipxe_dir=ipxe, nodes_dir=nodes,
                         pools=pools, blob_bytes=MIB, concurrency=CONCURRENCY)
        server = Ours(scratch, toml, http_port).start()
        try:
            cpu0 = cpu_seconds(server.pid)
            phases: dict[str, list[float]] = {k: [] for k in PHASES}
            errors: list[str] = []
            done_at: dict[int, float] = {}
            t0 = time.monotonic()
            wall0 = time.time()
            tasks = [asyncio.create_task(machine(i, server.url, ("127.0.0.1", tftp_port), pools, phases, errors,
                                                 t0, done_at, timeout)) for i in range(count)]
            await asyncio.wait(tasks, timeout=timeout + 30)
            for task in tasks:
                task.cancel()
            states = await wait_terminal(server.url, count, time.monotonic() + 60)
            elapsed_driver = time.monotonic() - t0
            cpu = cpu_seconds(server.pid) - cpu0
            rss = peak_rss_mib(server.pid)
        finally:
            server.stop()
            await pools.stop()
        store = Store(data / "bootserver.sqlite3")
        try:
            queue, ssh, total, deployed_times = [], [], [], []
            final: dict[str, int] = {}
            for i in range(count):
                events = store.events(mac(i), 0, 1000)
                node = store.node(mac(i))
                final[node.state if node else "never seen"] = final.get(node.state if node else "never seen", 0) + 1
                at = {e.kind: e.time for e in reversed(events)}  # the first event of each kind
                if "phoned-home" in at and "step-started" in at:
                    queue.append(at["step-started"] - at["phoned-home"])
                if "step-started" in at and "deployed" in at:
                    ssh.append(at["deployed"] - at["step-started"])
                if "deployed" in at:
                    total.append(at["deployed"] - wall0)
                    deployed_times.append(at["deployed"])
        finally:
            store.close()
        phases[QUEUE], phases[SSH], phases[TOTAL] = queue, ssh, total
        checks_ran = sum(1 for _ in nodes.glob("node.*/blob.sha256"))
    return Round(count, final.get("deployed", 0), final, errors,
                 (max(deployed_times) - wall0) if deployed_times else float("nan"), checks_ran, cpu,
                 elapsed_driver, rss, pools.max_concurrent(), states, phases, kpxe_size, len(pools.processes))


def report(rounds: list[Round], quick: bool) -> str:
    first, count = rounds[0], rounds[0].count
    deployed = med([r.deployed for r in rounds])
    complete = med([float(r.complete) for r in rounds]) == 1  # the verdict on the median round
    errors = [e for r in rounds for e in r.errors]
    rows = [[name, spread([len(r.phases[name]) for r in rounds], "{:.0f}"),
             *(spread([1000 * stat(r.phases[name]) for r in rounds if r.phases[name]], "{:.0f}")
               for stat in (lambda v: percentile(v, 50), lambda v: percentile(v, 99), max))]
            for name in first.phases]
    n = len(rounds)
    out = [f"## Boot storm: {count} machines at once ({run_label(n, quick)})\n",
           f"Each: TFTP undionly.kpxe ({first.kpxe_size // 1024} KiB, "
           f"blksize 1468, lock-step), iPXE script, kernel 8 MiB, initrd 40 MiB, overlay, phone-home, SSH "
           f"provisioning by the server (`provision_concurrency = {CONCURRENCY}`; a real SSH server per machine "
           f"running the deploy check: 1 MiB written and hashed in a scratch directory + 0.2 s). All machines "
           f"start at t=0 from one driver process ({pinning_note(brief=True)}: the driver and its "
           f"{first.pool_processes} SSH-server processes are the clients). Every round is a new server, store and "
           f"fleet; figures are the median (min-max) over rounds, the verdict on the median.\n",
           table(["", "result"], [
               ["complete", f"{spread([r.deployed for r in rounds], '{:.0f}')}/{count} deployed "
                            f"({100 * deployed / count:.0f}% median; rounds complete "
                            f"{sum(r.complete for r in rounds)}/{n}): {verdict(complete)}"],
               ["final states", " | ".join(", ".join(f"{k} {v}" for k, v in sorted(r.final.items())) for r in rounds)],
               ["driver errors", f"{len(errors)}" + (f" (first: {errors[0]})" if errors else "")],
               ["time to all deployed", spread([r.all_done for r in rounds]) + " s"],
               ["deploy checks that ran (blob.sha256 files)", spread([r.checks_ran for r in rounds], "{:.0f}")],
               ["server CPU", spread([r.cpu for r in rounds]) + " s (" + spread(
                   [100 * r.cpu / r.elapsed for r in rounds], "{:.0f}") + "% of one core over "
                   + spread([r.elapsed for r in rounds]) + " s)"],
               ["server peak RSS (VmHWM)", spread([r.rss for r in rounds], "{:.0f}") + " MiB"],
               ["max concurrent SSH sessions (seen by the SSH servers)",
                f"{spread([r.max_ssh for r in rounds], '{:.0f}')} (cap {CONCURRENCY})"],
               ["states at the end (metrics)",
                " | ".join(", ".join(f"{k} {v}" for k, v in sorted(r.states.items())) for r in rounds)],
           ]),
           "\nPer phase, milliseconds (nearest-rank percentiles over the machines that got there, in each round; "
           "median (min-max) over rounds):\n",
           table(["phase", "n", "p50 ms", "p99 ms", "max ms"], rows),
           "\nTargets:\n", target_lines([(f"storm of {count}: every machine deployed, no driver error "
                                          f"({spread([r.deployed for r in rounds], '{:.0f}')}/{count}, rounds "
                                          f"complete {sum(r.complete for r in rounds)}/{n})", complete)])]
    return "\n".join(out) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    count = 60 if args.quick else 250
    rounds = []
    for r in range(args.rounds or (1 if args.quick else 3)):
        rounds.append(asyncio.run(storm(count, args.quick)))
        print(f"  storm round {r + 1}: {rounds[-1].deployed}/{count} deployed in {rounds[-1].all_done:.1f} s",
              file=sys.stderr, flush=True)
    write_section("storm", report(rounds, args.quick))


if __name__ == "__main__":
    main()
