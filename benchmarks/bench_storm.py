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
import time
from pathlib import Path

from common import (
    MIB,
    Ours,
    cpu_seconds,
    free_port,
    parse_args,
    peak_rss_mib,
    pinning_note,
    random_file,
    table,
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
    phase_row,
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


async def storm(count: int, quick: bool) -> str:
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
            phases: dict[str, list[float]] = {k: [] for k in (
                "tftp undionly.kpxe", "script", "kernel 8 MiB", "initrd 40 MiB", "overlay cpio", "phone-home",
                "provisioned (driver: 202 -> reboot)")}
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
        nodes_done = sum(1 for _ in nodes.glob("node.*/blob.sha256"))
    deployed = final.get("deployed", 0)
    all_done = (max(deployed_times) - wall0) if deployed_times else float("nan")
    complete = deployed == count and not errors
    rows = [phase_row(name, values) for name, values in phases.items()]
    rows += [phase_row("server: phoned-home -> SSH step started (queue + connect)", queue),
             phase_row("server: SSH steps -> deployed", ssh),
             phase_row("power-on -> deployed (server event)", total)]
    out = [f"## Boot storm: {count} machines at once{' (--quick)' if quick else ''}\n",
           f"Each: TFTP undionly.kpxe ({kpxe_size // 1024} KiB, "
           f"blksize 1468, lock-step), iPXE script, kernel 8 MiB, initrd 40 MiB, overlay, phone-home, SSH "
           f"provisioning by the server (`provision_concurrency = {CONCURRENCY}`; a real SSH server per machine "
           f"running the deploy check: 1 MiB written and hashed in a scratch directory + 0.2 s). All machines "
           f"start at t=0 from one driver process ({pinning_note(brief=True)}: the driver and its "
           f"{len(pools.processes)} SSH-server processes are the clients).\n",
           table(["", "result"], [
               ["complete", f"{deployed}/{count} deployed ({100 * deployed / count:.0f}%): {verdict(complete)}"],
               ["final states", ", ".join(f"{k} {v}" for k, v in sorted(final.items()))],
               ["driver errors", f"{len(errors)}" + (f" (first: {errors[0]})" if errors else "")],
               ["time to all deployed", f"{all_done:.1f} s"],
               ["deploy checks that ran (blob.sha256 files)", str(nodes_done)],
               ["server CPU", f"{cpu:.1f} s ({100 * cpu / elapsed_driver:.0f}% of one core over "
                              f"{elapsed_driver:.1f} s)"],
               ["server peak RSS (VmHWM)", f"{rss:.0f} MiB"],
               ["max concurrent SSH sessions (seen by the SSH servers)",
                f"{pools.max_concurrent()} (cap {CONCURRENCY})"],
               ["states at the end (metrics)", ", ".join(f"{k} {v}" for k, v in sorted(states.items()))],
           ]),
           "\nPer phase, milliseconds (nearest-rank percentiles over the machines that got there):\n",
           table(["phase", "n", "p50 ms", "p99 ms", "max ms"], rows)]
    return "\n".join(out) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    count = 60 if args.quick else 250
    text = asyncio.run(storm(count, args.quick))
    write_section("storm", text)


if __name__ == "__main__":
    main()
