"""TFTP: bootserver beside dnsmasq and tftpd-hpa, same files, same clients, same run; and a py-spy profile.

Runs in a private network namespace (re-executes itself under `unshare --net`): dnsmasq's TFTP port is always
69, and there it is free. Every server and client shares that namespace's loopback; nothing else sees it.

Clients are curl (`tftp://`, lock-step, --tftp-blksize 1468 and 512) and atftp (RFC 7440 `windowsize 16`).
Per case: aggregate MB/s (all bytes / wall time from the moment every client has started and waits for its
URLs on its standard input, so that process start-up is not timed, to the last one's exit),
failures (non-zero exit or a short file), and each server's CPU (utime+stime from /proc, a cgroup for tftpd-hpa's
children) as MB per CPU-second and CPU-seconds per GB, per case, for every server.
Servers alternate within every round, in rotated order; ratios are ours / peer per round.

Ours runs its transfers in the C loop (`tftp_engine = "native"`); BENCH_TFTP_ENGINE=python measures the Python one.
"""

from __future__ import annotations

import collections
import functools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    MB,
    MIB,
    RESULTS,
    SPY_RATE,
    Ours,
    TreeCpu,
    alternate,
    check_pinned,
    cpu_seconds,
    free_port,
    med,
    parse_args,
    pinning_note,
    py_spy,
    random_file,
    run_label,
    server_command,
    spread,
    stop,
    summarize_profile,
    table,
    target_lines,
    verdict,
    wait_reading_stdin,
    workdir,
    write_section,
)

OURS, DNSMASQ, HPA = "ours", "dnsmasq", "tftpd-hpa"
SERVERS = (OURS, DNSMASQ, HPA)
FILES = {"1 MiB": ("1m.bin", MIB), "32 MiB": ("32m.bin", 32 * MIB)}
RUN_TIMEOUT = 300.0  # seconds: one case of one server, all clients
ENGINE = os.environ.get("BENCH_TFTP_ENGINE", "native")  # ours' [server] tftp_engine


@dataclass(frozen=True)
class Case:
    size: str
    clients: int
    reps: int  # fetches per client, one after the other (small files: enough bytes to time)
    blksize: int


@dataclass
class Run:
    mbps: float
    failures: int
    cpu: float  # server CPU seconds
    bytes: int

    @property
    def mb_per_cpu(self) -> float:
        return self.bytes / MB / self.cpu if self.cpu > 0 else float("inf")

    @property
    def cpu_per_gb(self) -> float:
        """Server CPU-seconds per GB moved (10^9 bytes): the reciprocal, as the HTTP tables give it."""
        return self.cpu / (self.bytes / 1e9) if self.bytes else float("nan")


@dataclass
class Server:
    name: str
    port: int
    pid: int
    process: subprocess.Popen | None = None
    tree: TreeCpu | None = None  # for a server that forks per transfer

    def cpu(self) -> float:
        return self.tree.read() if self.tree is not None else cpu_seconds(self.pid)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("1 MiB", 1, 8, 1468), Case("1 MiB", 16, 2, 1468), Case("1 MiB", 64, 1, 1468),
                Case("32 MiB", 1, 1, 1468), Case("32 MiB", 16, 1, 1468), Case("1 MiB", 16, 1, 512)]
    return [Case("1 MiB", 1, 16, 1468), Case("1 MiB", 16, 4, 1468), Case("1 MiB", 64, 2, 1468),
            Case("32 MiB", 1, 1, 1468), Case("32 MiB", 16, 1, 1468), Case("32 MiB", 64, 1, 1468),
            Case("1 MiB", 1, 8, 512), Case("1 MiB", 16, 2, 512), Case("1 MiB", 64, 1, 512),
            Case("32 MiB", 1, 1, 512)]


# -- servers -----------------------------------------------------------------------------------------------


def start_servers(scratch: Path) -> tuple[dict[str, Server], Ours]:
    data = scratch / "data"
    root = data / "tftp"
    for name, size in FILES.values():
        random_file(root / name, size)
    tftp_port, http_port = 6969, free_port()
    ours = Ours(scratch, f'[server]\nhttp = "127.0.0.1:{http_port}"\ntftp = "127.0.0.1:{tftp_port}"\n'
                         f'data_dir = "{data}"\ntftp_engine = "{ENGINE}"\n', http_port).start()
    servers = {OURS: Server(OURS, tftp_port, ours.pid, ours.process)}
    # dnsmasq: TFTP only (--port=0: no DNS); its default cap of 50 transfers would fail 64 clients, so 512.
    dnsmasq = subprocess.Popen(server_command(
        ["dnsmasq", "--keep-in-foreground", "--port=0", "--enable-tftp", f"--tftp-root={root}",
         "--listen-address=127.0.0.1", "--bind-interfaces", "--tftp-max=512", "--quiet-tftp", "--user=root",
         f"--pid-file={scratch / 'dnsmasq.pid'}", f"--log-facility={scratch / 'dnsmasq.log'}"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers[DNSMASQ] = Server(DNSMASQ, 69, dnsmasq.pid, dnsmasq)
    # tftpd-hpa: -L stays in the foreground and forks a child per transfer (counted via cutime/cstime).
    # `-a 127.0.0.1:PORT` fails in a loopback-only namespace; `-a :PORT` works.
    hpa_port = 6970
    hpa = subprocess.Popen(server_command(["in.tftpd", "-L", "-u", "root", "-s", str(root), "-a", f":{hpa_port}"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers[HPA] = Server(HPA, hpa_port, hpa.pid, hpa, TreeCpu(hpa.pid, "tftpd-hpa"))
    time.sleep(0.5)
    for server in servers.values():
        check_pinned(server.pid)
        fetch = curl_clients(server.port, FILES["1 MiB"][0], 1, 1, 1468)
        if fetch.failures:
            raise RuntimeError(f"{server.name} on port {server.port} does not serve TFTP")
    return servers, ours


# -- clients -----------------------------------------------------------------------------------------------


@dataclass
class Fetch:
    bytes: int
    seconds: float
    failures: int


def curl_clients(port: int, name: str, clients: int, reps: int, blksize: int) -> Fetch:
    """`clients` curl processes at once, each fetching `name` `reps` times in a row. Timed from the moment all
    of them have started and wait for their URLs (`curl -K -` reads them from its standard input) to the last
    one's exit: process start-up stays outside the clock."""
    url = f"tftp://127.0.0.1:{port}/{name}"
    size = next(s for n, s in FILES.values() if n == name)
    command = ["curl", "-s", "--tftp-blksize", str(blksize), "--max-time", "120",
               "-w", "%{exitcode} %{size_download}\\n", "-K", "-"]
    urls = f'url = "{url}"\noutput = "/dev/null"\n' * reps
    # Each client is a machine of its own: its own source address (all of 127/8 is loopback), as servers
    # that cap transfers per client address (ours does) would see a rack booting.
    procs = [subprocess.Popen([*command, "--interface", client_address(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(clients)]
    wait_reading_stdin([proc.pid for proc in procs])
    started = time.monotonic()
    for proc in procs:
        proc.stdin.write(urls)
        proc.stdin.close()
    good = 0
    for proc in procs:
        try:
            proc.wait(max(1.0, RUN_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for line in proc.stdout.read().splitlines()[:reps]:  # a few short lines: never fills the pipe
            parts = line.split()
            good += len(parts) == 2 and parts[0] == "0" and parts[1].isdigit() and int(parts[1]) == size
    seconds = time.monotonic() - started
    for proc in procs:
        proc.stdout.close()
    return Fetch(good * size, seconds, clients * reps - good)


def client_address(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def atftp_client(port: int, name: str, out: Path) -> Fetch:
    """One atftp at its prompt (commands on its standard input), timed from when it waits there to its exit."""
    size = next(s for n, s in FILES.values() if n == name)
    proc = subprocess.Popen(["atftp", "127.0.0.1", str(port)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    wait_reading_stdin([proc.pid])
    started = time.monotonic()
    proc.stdin.write(f"option blksize 1468\noption windowsize 16\nget {name} {out}\nquit\n")
    proc.stdin.close()
    try:
        proc.wait(120)
        ok = proc.returncode == 0 and out.stat().st_size == size
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait()
        ok = False
    seconds = time.monotonic() - started
    out.unlink(missing_ok=True)
    return Fetch(size if ok else 0, seconds, 0 if ok else 1)


def measure(server: Server, fetch) -> Run:
    before = server.cpu()
    result = fetch()
    cpu = server.cpu() - before
    return Run(result.bytes / MB / result.seconds, result.failures, cpu, result.bytes)


# -- profile -----------------------------------------------------------------------------------------------


def profile(server: Server) -> str:
    """py-spy on our server during a 16-client 32 MiB run: the frames that eat the time."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed: no profile.\n"
    def work() -> Fetch:
        return curl_clients(server.port, FILES["32 MiB"][0], 16, 1, 1468)
    fetch, seconds, raw = py_spy(server.pid, work, "raw")
    py_spy(server.pid, work, "flamegraph", RESULTS / "tftp-profile.svg")
    svg = RESULTS / "tftp-profile.svg"
    size = svg.stat().st_size if svg.is_file() else 0
    if size > 1_000_000:
        svg.unlink()
        note = "(the flame graph was over 1 MB and was not kept)"
    else:
        note = f"flame graph: `benchmarks/results/tftp-profile.svg` ({size // 1024} KiB, from a second identical run)"
    return (f"py-spy record at {SPY_RATE} Hz on `bootserver serve` while 16 curl clients fetched 32 MiB at blksize "
            f"1468 ({fetch.bytes / MB / seconds:.1f} MB/s under the profiler, {fetch.failures} failures); "
            f"{note}.\n\n{summarize_profile(raw, seconds)}")


# -- main ----------------------------------------------------------------------------------------------------


def in_namespace() -> None:
    """Re-run this script in a fresh network namespace with only loopback (needs root and unshare)."""
    if os.environ.get("BENCH_NETNS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        sys.exit("bench_tftp: needs root and unshare (dnsmasq serves TFTP on port 69 only)")
    env = {**os.environ, "BENCH_NETNS": "1"}
    os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, *sys.argv], env)


def main() -> None:
    args = parse_args(__doc__)
    in_namespace()
    rounds = args.rounds or (1 if args.quick else 3)
    with workdir("bench-tftp-") as scratch:
        servers, ours = start_servers(scratch)
        try:
            text = run_all(servers, rounds, args.quick, scratch)
        finally:
            ours.stop()
            for server in servers.values():
                if server.process is not None and server.name != OURS:
                    stop(server.process)
                if server.tree is not None:
                    server.tree.close()
    write_section("tftp", text)


def run_all(servers: dict[str, Server], rounds: int, quick: bool, scratch: Path) -> str:
    results: dict[tuple[Case, str], list[Run]] = collections.defaultdict(list)
    for case in cases(quick):
        name = FILES[case.size][0]
        for r in range(rounds):
            for server_name in alternate(SERVERS, r):
                server = servers[server_name]
                run = measure(server, functools.partial(curl_clients, server.port, name, case.clients, case.reps,
                                                        case.blksize))
                results[(case, server_name)].append(run)
            print(f"  tftp {case.size} x{case.clients} bs{case.blksize} round {r + 1}: " + ", ".join(
                f"{s} {results[(case, s)][-1].mbps:.1f} MB/s" for s in SERVERS), file=sys.stderr, flush=True)
    window: dict[str, list[Run]] = collections.defaultdict(list)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else scratch
    for r in range(rounds):
        for server_name in alternate(SERVERS, r):
            server = servers[server_name]
            out = shm / f"bench-atftp-{os.getpid()}.bin"
            window[server_name].append(measure(server, lambda s=server, o=out: atftp_client(s.port, "32m.bin", o)))
    profile_text = profile(servers[OURS])
    return report(results, window, rounds, quick, profile_text)


def report(results: dict[tuple[Case, str], list[Run]], window: dict[str, list[Run]], rounds: int, quick: bool,
           profile_text: str) -> str:
    out = [f"## TFTP: bootserver vs dnsmasq 2.90 and tftpd-hpa 5.2 ({run_label(rounds, quick)})\n",
           f"curl 7.88 clients (lock-step), all servers on one private loopback; {pinning_note(brief=True)}; "
           "MB/s = 10^6 bytes/s aggregate over all clients, timed from the moment every curl has started and "
           "waits for its URLs on standard input (`-K -`: process start-up is not timed) to the last one's exit; "
           "median (min-max) over rounds; ratio = ours / peer, per round. dnsmasq runs with `--tftp-max=512` (its "
           "default cap of 50 fails 64 clients). Failures are summed over all rounds. Ours: "
           f"`tftp_engine = \"{ENGINE}\"` ({'the C loop' if ENGINE == 'native' else 'transfers in Python'}).\n"]
    targets: list[tuple[str, bool]] = []
    efficiency: dict[str, list[float]] = collections.defaultdict(list)  # per-case medians at blksize 1468
    for blksize in (1468, 512):
        rows = []
        for case in [c for c in cases(quick) if c.blksize == blksize]:
            runs = {s: results[(case, s)] for s in SERVERS}
            ratio_d = [a.mbps / b.mbps for a, b in zip(runs[OURS], runs[DNSMASQ], strict=True) if b.mbps]
            ratio_h = [a.mbps / b.mbps for a, b in zip(runs[OURS], runs[HPA], strict=True) if b.mbps]
            fails = [sum(r.failures for r in runs[s]) for s in SERVERS]
            eff = {s: med([r.mb_per_cpu for r in runs[s]]) for s in SERVERS}
            per_gb = {s: med([r.cpu_per_gb for r in runs[s]]) for s in SERVERS}
            marks = []
            if blksize == 1468:
                for s in SERVERS:
                    efficiency[s].append(eff[s])
                if case.clients in (16, 64):
                    ok = med(ratio_d) >= 1.0
                    marks.append(f">=1.0x dnsmasq: {verdict(ok)}")
                    targets.append((f"TFTP {case.size} x {case.clients} clients, blksize 1468: >= 1.0x dnsmasq "
                                    f"(median {med(ratio_d):.2f}x; server CPU-s per GB ours {per_gb[OURS]:.1f}, "
                                    f"dnsmasq {per_gb[DNSMASQ]:.1f})", ok))
                if case.clients == 64 and case.size == "32 MiB":
                    ok = fails[0] == 0
                    marks.append(f"0 failures: {verdict(ok)}")
                    targets.append((f"TFTP 64 x 32 MiB: 0 failures (ours {fails[0]})", ok))
            rows.append([f"{case.size} x {case.clients}" + (f" ({case.reps} each)" if case.reps > 1 else ""),
                         spread([r.mbps for r in runs[OURS]]), spread([r.mbps for r in runs[DNSMASQ]]),
                         spread([r.mbps for r in runs[HPA]]), spread(ratio_d, "{:.2f}x"), spread(ratio_h, "{:.2f}x"),
                         " / ".join(f"{per_gb[s]:.1f}" for s in SERVERS),
                         " / ".join(f"{eff[s]:.0f}" for s in SERVERS),
                         " / ".join(str(f) for f in fails), "; ".join(marks)])
        out.append(f"\n### blksize {blksize}\n")
        out.append(table(["files x clients", "ours MB/s", "dnsmasq MB/s", "tftpd-hpa MB/s", "ours/dnsmasq",
                          "ours/tftpd-hpa", "server CPU-s per GB ours/dnsmasq/hpa", "MB per CPU-s ours/dnsmasq/hpa",
                          "failures ours/dnsmasq/hpa", "targets"], rows))
    # The same statistic for every server: the median over the blksize 1468 cases of each case's median.
    ok = med(efficiency[OURS]) >= 120
    peers = ", ".join(f"{s} {med(efficiency[s]):.0f}" for s in SERVERS if s != OURS)
    targets.append((f"TFTP blksize 1468: >= 120 MB per server CPU-second (ours {med(efficiency[OURS]):.0f}, "
                    f"median of the per-case medians; {peers})", ok))
    out.append("\nMB per server CPU-second at blksize 1468, the median over the cases of each case's median "
               "(the per-case figures are in the table; the same statistic for every server): "
               + ", ".join(f"{s} {med(efficiency[s]):.0f} (cases {min(efficiency[s]):.0f}-{max(efficiency[s]):.0f})"
                           for s in SERVERS)
               + f". Target >= 120 for ours: {verdict(ok)}\n")
    rows = []
    for s in SERVERS:
        runs = window[s]
        ratio = [a.mbps / b.mbps for a, b in zip(window[OURS], runs, strict=True) if b.mbps]
        rows.append([s, spread([r.mbps for r in runs]), spread(ratio, "{:.2f}x"),
                     spread([r.cpu_per_gb for r in runs]), spread([r.mb_per_cpu for r in runs], "{:.0f}"),
                     sum(r.failures for r in runs)])
    ok = med([r.mbps for r in window[OURS]]) >= 80 and not sum(r.failures for r in window[OURS])
    targets.append((f"TFTP one atftp client, windowsize 16: >= 80 MB/s "
                    f"(ours {med([r.mbps for r in window[OURS]]):.1f})", ok))
    out.append("\n### One atftp 0.8 client, 32 MiB, options blksize 1468 and windowsize 16\n")
    out.append("Timed from when atftp waits at its prompt (commands on standard input) to its exit.\n")
    out.append(table(["server", "MB/s", "ours/server", "server CPU-s per GB", "MB per CPU-s", "failures"], rows))
    out.append(f"\nTarget >= 80 MB/s for ours: {verdict(ok)}. (dnsmasq and tftpd-hpa do not implement RFC 7440 "
               f"windowsize; atftp falls back to lock-step with them.)\n")
    out.append("\n### Profile of our TFTP hot path\n\n" + profile_text)
    out.append("\n### TFTP targets\n\n" + target_lines(targets))
    return "\n".join(out)


if __name__ == "__main__":
    main()
