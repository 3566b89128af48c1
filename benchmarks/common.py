"""Shared pieces of the benchmarks: starting servers, reading their CPU and memory, wrk, statistics, tables.

Every benchmark script imports this (benchmarks/ is on sys.path as the script's own directory), prints one
Markdown section and writes it to benchmarks/results/<name>.md; `benchmarks/run` joins them into latest.md.

Rules kept everywhere: traffic only to loopback addresses, every load loop bounded in count and in time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000  # throughput is in MB/s of 10^6 bytes, as iperf and curl report it
MIB = 1 << 20
SMOKE = False  # --quick (set by parse_args): smaller work than the targets are set for, so no verdict at all

sys.path.insert(0, str(ROOT))  # `import bootserver` from the working tree, installed or not


def parse_args(doc: str | None) -> argparse.Namespace:
    """Every section's arguments; also pins this driver (and so every client it starts) to the client CPUs."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help="a smoke version: fewer rounds, shorter runs")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.quick
    pin_clients()
    return args


# -- CPU pinning -------------------------------------------------------------------------------------------
# With two CPUs or more, every server under test runs on the first CPU and everything else (the section's own
# driver, curl, atftp, wrk, the SSH servers of emulated machines, py-spy) on the others, so that a server's
# throughput is not what its clients left it. Servers are started through `taskset` (server_command): their
# threads and forked workers inherit the mask. The driver pins itself in parse_args; its children inherit that.


def cpu_split() -> tuple[list[int], list[int]] | None:
    """(server CPUs, client CPUs), or None with one CPU. The CPUs are those this run was given, remembered in
    $BENCH_CPUS across re-executions (bench_tftp re-runs itself in a namespace after pinning itself)."""
    text = os.environ.get("BENCH_CPUS")
    cpus = [int(c) for c in text.split(",")] if text else sorted(os.sched_getaffinity(0))
    os.environ["BENCH_CPUS"] = ",".join(map(str, cpus))
    if len(cpus) < 2:
        return None
    return cpus[:1], cpus[1:]


def _cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus))


def pin_clients() -> None:
    split = cpu_split()
    if split is not None:
        os.sched_setaffinity(0, split[1])


def server_command(argv: Sequence[str]) -> list[str]:
    """`argv` started on the server CPU (taskset execs it: the same pid), or as is with one CPU."""
    split = cpu_split()
    return list(argv) if split is None else ["taskset", "--cpu-list", _cpu_list(split[0]), *argv]


def all_cpus() -> list[int]:
    """Every CPU this run was given (what an unpinned section's servers and clients share)."""
    split = cpu_split()
    return sorted(os.sched_getaffinity(0)) if split is None else split[0] + split[1]


def everywhere_command(argv: Sequence[str]) -> list[str]:
    """`argv` allowed on every CPU of the run (the driver that starts it is pinned to the client CPUs)."""
    return ["taskset", "--cpu-list", _cpu_list(all_cpus()), *argv]


def server_workers() -> str:
    """nginx's worker_processes: one per server CPU when pinned (more on one core would only take turns)."""
    split = cpu_split()
    return "auto" if split is None else str(len(split[0]))


def check_pinned(pid: int) -> None:
    """Raise unless every thread of `pid` and of its live children is allowed only the server CPUs."""
    split = cpu_split()
    if split is None:
        return
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for task in Path(f"/proc/{p}/task").iterdir():
            with contextlib.suppress(OSError):
                allowed = sorted(os.sched_getaffinity(int(task.name)))
                if allowed != split[0]:
                    raise RuntimeError(f"server task {task.name} of pid {p} may run on CPUs {allowed}, "
                                       f"not only {split[0]}")


def pinning_note(brief: bool = False) -> str:
    """How this run is pinned: for the machine table, or `brief` for a section's text."""
    split = cpu_split()
    if split is None:
        return "no pinning (one CPU)" if brief else "one CPU: no pinning, every server shares it with its clients"
    if brief:
        return f"server on CPU {_cpu_list(split[0])}, clients on CPU {_cpu_list(split[1])}"
    return (f"servers under test (ours, dnsmasq, tftpd-hpa, nginx and its workers) on CPU {_cpu_list(split[0])}; "
            f"clients and drivers (curl, atftp, wrk, the open-loop driver, the storm and burst drivers with their "
            f"SSH servers, py-spy) on CPU {_cpu_list(split[1])}")


# -- processes -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, plus that of its reaped children (tftpd-hpa forks one per transfer)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


class TreeCpu:
    """CPU seconds of a process and of every process it forks, reaped or not, from a cpuacct cgroup of its own.

    For servers that fork per transfer and ignore SIGCHLD (tftpd-hpa): their children's CPU never reaches
    the parent's cutime. Falls back to /proc (the process and its reaped children) without cgroups."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.path: Path | None = None
        v1, v2 = Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup")
        for base, usage in ((v1, "cpuacct.usage"), (v2, "cpu.stat")):
            if not (base / "cgroup.procs").is_file():
                continue
            if usage == "cpu.stat" and not (base / "cgroup.controllers").is_file():
                continue  # cgroup v1 without cpuacct: no way to count the children
            path = base / f"bench-{name}-{pid}"
            try:
                path.mkdir()
                (path / "cgroup.procs").write_text(str(pid))
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            self.path, self.usage = path, usage
            break

    def read(self) -> float:
        if self.path is None:
            return cpu_seconds(self.pid)
        text = (self.path / self.usage).read_text()
        if self.usage == "cpuacct.usage":
            return int(text) / 1e9
        return int(text.split("usage_usec", 1)[1].split()[0]) / 1e6

    def close(self) -> None:
        """After the process has exited: remove the cgroup (moving any straggler back to the parent)."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                (self.path.parent / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()


# System calls a client idles in while it waits for its input, by number as /proc/PID/syscall shows them:
# read(2) on fd 0 (curl -K -), and select/poll (atftp's prompt).
_WAITING = {"x86_64": ("0 0x0 ", "7 ", "23 ", "270 ", "271 "),
            "aarch64": ("63 0x0 ", "72 ", "73 ")}.get(os.uname().machine)


def wait_reading_stdin(pids: Sequence[int], timeout: float = 30.0) -> None:
    """Return once every process in `pids` is blocked waiting for its standard input: exec'd, linked and
    initialised, waiting for its work. The start gate of clients spawned per transfer (curl -K -, atftp's
    prompt): the clock starts after this, when the work is written to them, so their start-up is not timed.
    Where /proc/PID/syscall cannot say (another architecture), waits until each sleeps, then 0.5 s more."""
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            try:
                if _WAITING is None:
                    ready = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
                else:
                    ready = Path(f"/proc/{pid}/syscall").read_text().startswith(_WAITING)
            except OSError:
                ready = True  # it has exited: nothing to wait for (its output tells what went wrong)
            if ready:
                waiting.discard(pid)
        if waiting:
            time.sleep(0.002)
    if waiting:
        raise RuntimeError(f"{len(waiting)} clients were not waiting on their input after {timeout:g} s")
    if _WAITING is None:
        time.sleep(0.5)


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the peak resident set size of `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: only this process, which we started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_http(url: str, timeout: float = 15.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


@dataclass
class Ours:
    """`bootserver serve` as a real subprocess, with a config written from `toml`."""

    workdir: Path
    toml: str
    http_port: int
    pinned: bool = True  # on the server CPU (server_command); False: on every CPU, as its clients
    process: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> Ours:
        config = self.workdir / "site.toml"
        config.write_text(self.toml)
        self.log = self.workdir / "bootserver.log"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with self.log.open("ab") as log:
            argv = [sys.executable, "-m", "bootserver", "--config", str(config), "--log-level", "warning", "serve"]
            self.process = subprocess.Popen(server_command(argv) if self.pinned else everywhere_command(argv),
                                            stdout=log, stderr=log, env=env, cwd=self.workdir)
        try:
            wait_http(f"{self.url}/healthz", 30, self.process)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"bootserver did not start:\n{self.log.read_text()[-3000:]}") from None
        if self.pinned:
            check_pinned(self.process.pid)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, 30)

    def __enter__(self) -> Ours:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory on the real disk (like a server's data_dir), removed afterwards."""
    base = Path(os.environ.get("BENCH_TMP", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=prefix, dir=base) as path:
        yield Path(path)


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            f.write(chunk)
            left -= len(chunk)
    return path


# -- nginx -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx(root: Path, scratch: Path, pinned: bool = True) -> Iterator[tuple[int, subprocess.Popen]]:
    """nginx serving `root` on 127.0.0.1:<free port>, Debian's defaults otherwise (sendfile), one worker per
    server CPU when pinned (server_workers); not `pinned`: one per CPU, on every CPU."""
    port = free_port()
    prefix = scratch / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes {server_workers() if pinned else "auto"};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    types {{ text/plain ipxe; }}
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    argv = ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    process = subprocess.Popen(server_command(argv) if pinned else everywhere_command(argv),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 10, process)
        if pinned:
            check_pinned(process.pid)
        yield port, process
    finally:
        stop(process)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live children (nginx's workers), from /proc."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


# -- wrk -----------------------------------------------------------------------------------------------

WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class WrkResult:
    requests: int
    bytes: int
    seconds: float
    errors: int  # connect, read, write, timeout and HTTP status >= 400
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / MB


def wrk(url: str, connections: int, seconds: float, *, threads: int | None = None,
        timeout: float = 10.0, lua: str = "") -> WrkResult:
    """Run wrk against `url` for `seconds` (bounded: wrk stops itself, and we kill it at 3x that).
    `lua`: more of wrk's script (setup/request functions), before our summary."""
    script = Path(tempfile.gettempdir()) / f"bench-wrk-report-{os.getpid()}.lua"
    script.write_text(lua + WRK_LUA)
    threads = threads or min(2, connections)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
               "--timeout", f"{timeout:g}s", "--latency", "-s", str(script), url]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 3 + 30).stdout
    finally:
        script.unlink(missing_ok=True)
    line = next((line for line in out.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    r = json.loads(line.removeprefix("WRKJSON "))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return WrkResult(r["requests"], r["bytes"], r["duration_us"] / 1e6, errors, r["p50_us"] / 1000,
                     r["p99_us"] / 1000, r["max_us"] / 1000)


# -- open loop ---------------------------------------------------------------------------------------------


@dataclass
class OpenLoopResult:
    """benchmarks/openloop.py's report: latency from each request's due time at a constant arrival rate."""

    rate: float
    scheduled: int
    completed: int
    errors: int
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    service_p99_ms: float  # from the actual send: what a closed-loop tool would have timed
    lag_p99_ms: float  # send delay: sent this late after due (timers, or a busy connection); in the latency


def open_loop(url: str, rate: float, seconds: float, connections: int = 50, drain: float = 10.0) -> OpenLoopResult:
    """Run benchmarks/openloop.py (its own process, on the client CPUs like every client) against `url`."""
    command = [sys.executable, str(BENCH / "openloop.py"), url, "--rate", f"{rate:g}", "--seconds", f"{seconds:g}",
               "--connections", str(connections), "--drain", f"{drain:g}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + drain + 60).stdout
    line = next((line for line in out.splitlines() if line.startswith("OPENLOOP ")), None)
    if line is None:
        raise RuntimeError(f"openloop.py printed no summary:\n{out}")
    r = {k: float("inf") if v is None else v for k, v in json.loads(line.removeprefix("OPENLOOP ")).items()}
    return OpenLoopResult(r["rate"], r["scheduled"], r["completed"], r["errors"], r["achieved_rps"], r["p50_ms"],
                          r["p99_ms"], r["p999_ms"], r["max_ms"], r["service_p99_ms"], r["lag_p99_ms"])


# -- statistics and tables --------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """median (min-max), or the one value when there is one round."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def verdict(ok: bool) -> str:
    """PASS or MISS; in a --quick run, which does smaller work than the targets name, neither."""
    if SMOKE:
        return "SMOKE (no verdict)"
    return "PASS" if ok else "MISS"


def target_lines(targets: Sequence[tuple[str, bool]]) -> str:
    """A section's targets, one `- VERDICT: what` line each (benchmarks/run gathers them into the summary)."""
    return "\n".join(f"- {verdict(ok)}: {what}" for what, ok in targets) + "\n"


def run_label(rounds: int, quick: bool) -> str:
    """For a section's title: "3 rounds", or "smoke, no verdict: --quick, 1 round"."""
    label = f"{rounds} round{'s' * (rounds != 1)}"
    return f"smoke, no verdict: --quick, {label}" if quick else label


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, text: str) -> None:
    """Print a result section and keep it for latest.md: in $BENCH_PARTS when benchmarks/run runs us,
    else in benchmarks/results/NAME.md."""
    parts = Path(os.environ.get("BENCH_PARTS") or RESULTS)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"{name}.md").write_text(text.rstrip() + "\n")
    print(text.rstrip() + "\n", flush=True)


def alternate(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the servers in one round: rotated every round, so that no one always goes first."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


# -- py-spy --------------------------------------------------------------------------------------------------

SPY_RATE = 200  # samples per second


def py_spy(pid: int, work, fmt: str = "raw", out: Path | None = None):
    """Run `work()` while py-spy records `pid`: (work's result, seconds work took, the raw profile text or "")."""
    keep = out is not None
    out = out or Path(tempfile.gettempdir()) / f"bench-py-spy-{os.getpid()}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(SPY_RATE), "--format", fmt,
                            "-o", str(out), "--duration", "600"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # let it attach
    started = time.monotonic()
    try:
        result = work()
    finally:
        elapsed = time.monotonic() - started
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        try:
            spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
    text = ""
    if not keep and out.is_file():
        text = out.read_text()
        out.unlink()
    return result, elapsed, text


# Frames every sample of an asyncio server has: left out of the inclusive table, which they would fill.
_PLUMBING = re.compile(r"\((asyncio/|<frozen runpy>|selectors\.py|bootserver/cli\.py|bootserver/__main__\.py)")
# Waits that py-spy does not recognise as idle: thread-pool workers waiting for work.
_IDLE = re.compile(r"^_worker \(concurrent/futures/thread\.py:\d+\)$")


def summarize_profile(raw: str, seconds: float, rate: int = SPY_RATE, top: int = 15) -> str:
    """Self and inclusive time per function from py-spy's collapsed stacks ("f1;f2;f3 COUNT" lines)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    lines_own: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        if _IDLE.match(_short(frames[-1])):
            idle += count
            continue
        total += count
        names = [_function(f) for f in frames]
        own[names[-1]] += count
        lines_own[_short(frames[-1])] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return "no samples\n"
    busy = total / (seconds * rate)
    head = (f"{total} samples while not idle (~{busy:.0%} of one core over the {seconds:.1f} s run"
            + (f"; {idle} samples of thread-pool workers waiting for work left out" if idle else "") + ").\n\n")
    own_rows = [(name, f"{100 * n / total:.1f}%") for name, n in own.most_common(top)]
    inc_rows = [(name, f"{100 * n / total:.1f}%") for name, n in inclusive.most_common()
                if not _PLUMBING.search(name)][:top]
    line_rows = [(name, f"{100 * n / total:.1f}%") for name, n in lines_own.most_common(10)]
    return (head + "Self time (where the CPU is, by function; time in a system call counts as its caller's):\n\n"
            + table(["function", "self"], own_rows)
            + "\n\nInclusive time (the function and what it calls; event-loop plumbing left out):\n\n"
            + table(["function", "inclusive"], inc_rows)
            + "\n\nHottest lines (self):\n\n" + table(["line", "self"], line_rows) + "\n")


def _function(frame: str) -> str:
    """'_send_block (bootserver/tftp/session.py:318)' -> '_send_block (bootserver/tftp/session.py)'."""
    return re.sub(r":\d+\)$", ")", _short(frame))


def _short(frame: str) -> str:
    frame = re.sub(r"\(/[^()]*/(site-packages|lib/python3\.\d+)/", "(", frame)
    return re.sub(r"\(/[^()]*/bootserver/", "(bootserver/", frame)
