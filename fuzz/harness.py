"""Throw mutated TFTP datagrams, DHCP packets and HTTP requests at a real `bootserver serve`, then check
that it survived: the process alive and answering /healthz, no internal error in its log, file descriptors
back to the baseline, resident memory within 10% of what it was after a warm-up.

It runs in a network namespace of its own holding only loopback (mutated DHCP packets name relays and
clients anywhere: their answers must not leave the machine), and a mount namespace with the server's data
on a tmpfs (10^5 recorded DHCP and HTTP requests would otherwise wait on fsync). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from support.net import listeners  # tests/support: fuzz/run puts tests/ on the path

from bootserver.dhcp import DhcpPacket
from bootserver.errors import BadRequest
from bootserver.mac import canonical_mac
from bootserver.store import Store
from bootserver.web.query import PAGE_EVENTS

from .mutate import MACS, PXE_BIOS, Mutator, dhcp_packet, http_request, tftp_datagram, tftp_other

ROOT = Path(__file__).resolve().parent.parent
NAMESPACED = "BOOTSERVER_FUZZ_NAMESPACED"
RESERVED_MAC = "52:54:00:ff:ff:fe"  # has a reserved address: full mode's other path
PROBE_MAC = "52:54:00:ff:ff:fd"  # the probes' client: never sent mutated packets
# An abandoned TFTP transfer lives timeout * (retries + 1): 6 s by default, 30 s with the longest timeout
# option the server accepts (tftp.MAX_ACCEPTED_TIMEOUT).
SETTLE_SECONDS = 40
BATCH = 256  # datagrams between probes: well below what the server's socket buffers hold
MAX_RSS_GROWTH = 0.10
WORKERS = 2  # [server] workers: HTTP is fuzzed through the owner and a worker process, as the kernel spreads it
LOG_LEVEL = os.environ.get("BOOTSERVER_FUZZ_LOG_LEVEL", "error")  # "info" to see every answer
PROBE_INTERVAL = 0.2
PATIENCE = 1.0  # seconds an HTTP request may take before we take it for incomplete


@dataclass(frozen=True)
class Plan:
    tftp: int
    dhcp: int
    http: int


FULL, QUICK = Plan(1_000_000, 100_000, 100_000), Plan(10_000, 1_000, 1_000)


@dataclass
class Figures:
    """What one protocol's run sent and got back."""

    name: str
    sent: int = 0
    seconds: float = 0.0
    answers: Counter = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    # Every input sent, by its index in the run, when asked for (record=True): what --seed must replay.
    inputs: dict[int, bytes] | None = None

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        top = ", ".join(f"{k} {v}" for k, v in self.answers.most_common(8))
        return f"{self.name:<5} {self.sent:>9,} sent in {self.seconds:7.1f} s ({rate:,.0f}/s); answers: {top}"


# -- the server --------------------------------------------------------------------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "data"
        (self.data / "images").mkdir(parents=True)
        (self.data / "images" / "vmlinuz").write_bytes(os.urandom(64 * 1024))
        (self.data / "images" / "initrd.img").write_bytes(os.urandom(16 * 1024))
        (self.data / "tftp" / "sub" / "dir").mkdir(parents=True)
        (self.data / "tftp" / "pxelinux.0").write_bytes(os.urandom(32 * 1024))
        (self.data / "tftp" / "small.txt").write_bytes(b"small\n")
        (self.data / "tftp" / "sub" / "dir" / "file").write_bytes(b"x" * 700)
        self.http = free_port(socket.SOCK_STREAM)
        self.tftp, self.dhcp, self.pxe = (free_port(socket.SOCK_DGRAM) for _ in range(3))
        self.config = work / "site.toml"
        self.config.write_text(
            f'[server]\nhttp = "127.0.0.1:{self.http}"\ntftp = "127.0.0.1:{self.tftp}"\ndata_dir = "{self.data}"\n'
            f'workers = {WORKERS}\n'
            '[assets]\nkernel = "images/vmlinuz"\ninitrd = "images/initrd.img"\n'
            '[profiles.p]\nkernel = "kernel"\ninitrd = ["initrd"]\n[groups.all]\nprofile = "p"\n'
            f'[dhcp]\nmode = "full"\nserver_address = "127.0.0.1"\nport = {self.dhcp}\nproxy_port = {self.pxe}\n'
            'pool = "127.0.0.100-127.0.0.199"\nnetmask = "255.0.0.0"\n'
            f'[machines."{RESERVED_MAC}"]\nip = "127.0.0.250"\n')
        self.log = work / "server.log"
        self.process: subprocess.Popen | None = None
        self.idle_fds = 0

    def seed_history(self, events: int) -> None:
        """Give every machine the fuzzer names a long history, as on a server that has run for months, so the
        baseline is taken with status pages at their full size (a page shows at most PAGE_EVENTS events):
        memory that grows after it is memory that keeps growing, not pages still filling up."""
        store = Store(self.data / "bootserver.sqlite3")
        for text in MACS:
            with contextlib.suppress(BadRequest):
                mac = canonical_mac(text)
                for i in range(events):
                    store.record(mac, "file-served", {"file": "kernel", "protocol": "http", "bytes": i, "size": i,
                                                      "seconds": 0.01})
        store.close()

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bootserver", "--config", str(self.config), "--log-level", LOG_LEVEL, "serve"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        readings: list[int] = []
        # Up: it answers, each of its processes listens on the HTTP port, and what they hold has not changed for a
        # second.
        while not (self.healthy() and self.listening() == WORKERS and len(readings) >= 5
                   and len(set(readings[-5:])) == 1):
            if time.monotonic() > deadline or not self.alive():
                raise SystemExit(f"bootserver did not start:\n{self.log.read_text()}")
            readings.append(self.fds())
            time.sleep(0.2)
        self.idle_fds = self.fds()  # listening sockets, the store, the event loop: before any traffic

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.http), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                sock.settimeout(5)
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The server's processes: the owner, then its children (the workers, multiprocessing's resource tracker)."""
        assert self.process is not None
        pid = self.process.pid
        with contextlib.suppress(OSError):
            return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
        return [pid]

    def listening(self) -> int:
        """How many of the server's processes hold a socket listening on its HTTP port."""
        return len(listeners(self.http) & set(self.pids()))

    def fds(self) -> int:
        """Open files of all the server's processes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def describe_fds(self) -> str:
        """What the server's processes hold open: files, and their sockets as `ss` sees them."""
        pids = self.pids()
        links = sorted(f"{pid}: {os.readlink(fd)}" for pid in pids for fd in Path(f"/proc/{pid}/fd").iterdir())
        sockets = subprocess.run(["ss", "-tuanp"], capture_output=True, text=True).stdout
        mine = [line for line in sockets.splitlines() if any(f"pid={pid}," in line for pid in pids)]
        return "\n".join(["open files:", *links, "sockets:", *mine])

    def rss_kib(self) -> int:
        """VmRSS of all the server's processes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])
        return total

    def internal_errors(self) -> list[str]:
        """Log lines of level ERROR or tracebacks: the server caught a bug of its own."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]

    def stop(self) -> None:
        """SIGTERM to the owner, then wait for every process of the server (multiprocessing's resource tracker
        outlives its owner a moment, holding the log open): the work directory's tmpfs is unmounted next."""
        if self.alive():
            assert self.process is not None
            pids = self.pids()
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
            deadline = time.monotonic() + 10
            while any(_running(pid) for pid in pids[1:]) and time.monotonic() < deadline:
                time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether `pid` is alive and not a zombie (an exited process holds no files)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def settle(server: Server, target: int, seconds: float = SETTLE_SECONDS) -> int:
    """Wait for abandoned TFTP transfers to end: the fd count once it is down to `target`, or after
    `seconds` (the longest an abandoned transfer may live, and some)."""
    deadline = time.monotonic() + seconds
    while (now := server.fds()) > target and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


# -- UDP: TFTP and DHCP --------------------------------------------------------------------------------


def sockets_on(prefix: str, count: int) -> list[socket.socket]:
    """One socket on each of `count` loopback addresses: per-client caps then apply to each separately."""
    sockets = []
    for i in range(1, count + 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"{prefix}.{i}", 0))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def drain(sockets: list[socket.socket], answers: Counter, tids: deque | None = None) -> None:
    for sock in sockets:
        while True:
            try:
                data, source = sock.recvfrom(70000)
            except BlockingIOError:
                break
            opcode = int.from_bytes(data[:2], "big") if len(data) >= 2 else -1
            answers[f"op{opcode}"] += 1
            if tids is not None and opcode in (3, 6):  # DATA or OACK: a transfer's own port
                tids.append((sock, source))


def probe(sock: socket.socket, request: bytes, to: tuple[str, int], timeout: float = 10.0) -> int:
    """Send `request` until any answer comes (within `timeout`): the server has read what came before.
    Resent every PROBE_INTERVAL: right after a burst the server's socket buffer may be full, and the
    kernel drops the probe like any other datagram. How many were sent; 0: no answer at all."""
    sock.setblocking(True)
    sock.settimeout(PROBE_INTERVAL)
    deadline, sent = time.monotonic() + timeout, 0
    try:
        while time.monotonic() < deadline:
            sock.sendto(request, to)
            sent += 1
            try:
                sock.recvfrom(70000)
                return sent
            except TimeoutError:
                continue
        return 0
    finally:
        sock.setblocking(False)


def run_tftp(server: Server, count: int, m: Mutator, record: bool = False) -> Figures:
    """`count` datagrams. Datagram i is made by a generator seeded by (the run's seed, i), never by one whose
    state depends on the server's answers: so --seed replays every datagram's bytes. Where a mid-transfer one
    goes (a transfer's port, which the server chose; the main port while no transfer is open) is the server's."""
    figures = Figures("tftp", inputs={} if record else None)
    clients, (prober,) = sockets_on("127.0.3", 64), sockets_on("127.0.4", 1)
    tids: deque = deque(maxlen=512)
    started = time.monotonic()
    target = ("127.0.0.1", server.tftp)
    base = m.rng.getrandbits(64)
    while figures.sent < count:
        for _ in range(min(BATCH, count - figures.sent)):
            mi = input_mutator(base, figures.sent)
            sock = mi.choice(clients)
            if mi.rng.random() < 0.15:  # mid-transfer packets at a transfer's port, from its client or not
                datagram = mi.bytes(tftp_other(mi)) if mi.rng.random() < 0.5 else tftp_other(mi)
                pick, own = mi.rng.random(), mi.rng.random() < 0.8
                to = target
                if tids:
                    owner, to = tids[int(pick * len(tids))]
                    sock = owner if own else sock
            else:
                datagram, to = tftp_datagram(mi), target
            sock.sendto(datagram, to)
            if figures.inputs is not None:
                figures.inputs[figures.sent] = datagram
            figures.sent += 1
        drain(clients, figures.answers, tids)
        sent = probe(prober, b"\0\1fuzz-probe\0octet\0", target)
        figures.answers["probes resent"] += max(sent - 1, 0)
        if not sent:
            figures.findings.append(f"tftp: no answer to a probe after {figures.sent} datagrams")
            break
    figures.seconds = time.monotonic() - started
    drain(clients, figures.answers)
    for sock in [*clients, prober]:
        sock.close()
    return figures


def dhcp_probe_packet(pxe: bool) -> bytes:
    """A packet whose answer depends on no lease the fuzzing may have taken or declined: on port 4011 a
    PXE REQUEST (ACK with the boot file), on the DHCP port a REQUEST for an address outside the pool (NAK)."""
    options = {**PXE_BIOS, 53: bytes([3])}
    if not pxe:
        options |= {50: IPv4Address("10.9.9.9").packed, 54: IPv4Address("127.0.0.1").packed}
    packet = DhcpPacket(op=1, xid=0x0F0F0F0F, chaddr=bytes.fromhex(PROBE_MAC.replace(":", "")), options=options)
    return packet.encode()


def run_dhcp(server: Server, count: int, m: Mutator, record: bool = False) -> Figures:
    """`count` packets, all from `m` in order: nothing the server answers changes what is drawn next."""
    figures = Figures("dhcp", inputs={} if record else None)
    clients, (prober,) = sockets_on("127.0.5", 16), sockets_on("127.0.6", 1)
    macs = [f"52:54:00:{m.rng.randrange(256):02x}:{m.rng.randrange(256):02x}:{m.rng.randrange(256):02x}"
            for _ in range(500)] + [RESERVED_MAC]
    started = time.monotonic()
    while figures.sent < count:
        pxe = m.rng.random() < 0.3
        port = server.pxe if pxe else server.dhcp
        for _ in range(min(BATCH // 4, count - figures.sent)):  # DHCP packets are big: smaller bursts
            packet = dhcp_packet(m, macs)
            m.choice(clients).sendto(packet, ("127.0.0.1", port))
            if figures.inputs is not None:
                figures.inputs[figures.sent] = packet
            figures.sent += 1
        drain(clients, figures.answers)
        sent = probe(prober, dhcp_probe_packet(pxe), ("127.0.0.1", port))
        figures.answers["probes resent"] += max(sent - 1, 0)
        if not sent:
            figures.findings.append(f"dhcp: no answer to a probe on port {port} after {figures.sent} packets")
            break
    figures.seconds = time.monotonic() - started
    for sock in [*clients, prober]:
        sock.close()
    figures.answers = Counter({"replies" if k == "op513" else k: v for k, v in figures.answers.items()})
    return figures


# -- HTTP ------------------------------------------------------------------------------------------


async def one_http(port: int, request: bytes, timeout: float = 10.0) -> str:
    """Send `request` on a fresh connection and read the answer: its status, or why there is none.

    A mutated request may be incomplete (the server waits for the rest until its keep-alive timeout):
    with no answer after PATIENCE seconds we half-close, and the server must then answer or close."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as exc:
        return f"connect failed: {type(exc).__name__}"
    try:
        writer.write(request)
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.read(64), PATIENCE)
        except TimeoutError:
            writer.write_eof()
            head = await asyncio.wait_for(reader.read(64), timeout)
            if not head:
                return "incomplete request: closed at our EOF"
        if not head:
            return "closed without answer"
        match = re.match(rb"HTTP/\d\.\d (\d{3})", head)
        if match and match[1] != b"100":  # 100 Continue: the server waits for a body that is not coming
            await _rest(reader)
        return match[1].decode() if match else f"not HTTP: {head[:20]!r}"
    except TimeoutError:
        return "no answer within 10 s"
    except (ConnectionError, OSError) as exc:
        return f"reset: {type(exc).__name__}"
    finally:
        writer.close()


async def _rest(reader: asyncio.StreamReader, idle: float = 0.5) -> None:
    """Read the rest of an answer: until the server closes or goes quiet (a kept-alive connection, a live
    event stream of the status pages)."""
    with contextlib.suppress(TimeoutError):
        while await asyncio.wait_for(reader.read(65536), idle):
            pass


async def real_token(port: int, mac: str) -> str | None:
    """A valid token, as a machine fetching its script gets it: phone-homes then get past the token check."""
    answer = await _read_all(port, f"GET /boot/{mac}.ipxe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    match = re.search(rb"bootserver\.token=(\S+)", answer)
    return match[1].decode() if match else None


async def _read_all(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def input_mutator(base: int, index: int) -> Mutator:
    """The generator of a run's input `index`: the same for a seed whichever worker sends it, and when."""
    return Mutator(random.Random(f"{base}:{index}"))


def run_mutator(seed: int, phase: str, protocol: str) -> Mutator:
    """The generator of one protocol's run in one phase (warm-up, run): a seed replays each run by itself,
    whatever the runs before it drew."""
    return Mutator(random.Random(f"{seed}:{phase}:{protocol}"))


TOKEN_MACS = ["52-54-00-00-00-01", "52-54-00-00-40-01"]
# Where a request carries a token it is generated with this stand-in, of a real token's shape and length
# (tokens.new_token: 12 characters, a dot, 43), and the machine's real token, from the server, goes in its place
# when it is sent: the generated bytes do not depend on which token the server happened to issue.
TOKEN_STAND_IN = "T" * 12 + "." + "S" * 43


async def run_http_async(server: Server, count: int, m: Mutator, workers: int = 64, record: bool = False) -> Figures:
    """`count` requests from `workers` connections at once. Request i comes from a generator seeded by (the run's
    seed, i), not from one generator the workers share in whatever order they run: so --seed replays the inputs
    (`record`: kept in Figures.inputs, with the token stand-in where a real token was sent)."""
    figures = Figures("http", inputs={} if record else None)
    tokens = dict.fromkeys(TOKEN_MACS, "x" * 12 + "." + "y" * 43)  # of the right shape, valid for nobody
    started = time.monotonic()
    base = m.rng.getrandbits(64)

    async def worker() -> None:
        while figures.sent < count:
            index = figures.sent
            mi = input_mutator(base, index)
            figures.sent += 1
            mac = mi.choice(TOKEN_MACS)
            if mi.rng.random() < 0.02:  # a fresh token for that machine, as its boot script would bring
                tokens[mac] = await real_token(server.http, mac) or tokens[mac]
            request = http_request(mi, TOKEN_STAND_IN)
            if figures.inputs is not None:
                figures.inputs[index] = request
            status = await one_http(server.http, request.replace(TOKEN_STAND_IN.encode(), tokens[mac].encode()))
            figures.answers[status] += 1
            if status == "500" or status.startswith(("no answer", "connect failed", "not HTTP")):
                figures.findings.append(f"http: {status}")

    await asyncio.gather(*(worker() for _ in range(workers)))
    figures.seconds = time.monotonic() - started
    return figures


def run_http(server: Server, count: int, m: Mutator, record: bool = False) -> Figures:
    return asyncio.run(run_http_async(server, count, m, record=record))


# -- the run ------------------------------------------------------------------------------------


def isolate(argv: list[str]) -> None:
    """Re-run this program in new network and mount namespaces (root only); set up loopback there."""
    if os.environ.get(NAMESPACED) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        raise SystemExit("fuzz/run needs root: it runs in network and mount namespaces of its own")
    os.environ[NAMESPACED] = "1"
    os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                          sys.executable, str(ROOT / "fuzz" / "run"), *argv])


def run(plan: Plan, seed: int) -> bool:
    work = Path(tempfile.mkdtemp(prefix="bootserver-fuzz-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(work)], check=True)
    server = Server(work)
    started = time.monotonic()
    server.seed_history(PAGE_EVENTS)
    server.start()
    try:
        return measure(server, plan, seed)
    finally:
        stopping = time.monotonic()
        server.stop()
        print(f"{time.monotonic() - started:.1f} s in all, {time.monotonic() - stopping:.1f} s of it to stop the "
              f"server")
        subprocess.run(["umount", str(work)], check=False)
        os.rmdir(work)


def measure(server: Server, plan: Plan, seed: int) -> bool:
    warm = Plan(max(plan.tftp // 10, 1000), max(plan.dhcp // 10, 200), max(plan.http // 10, 200))
    print(f"warm-up: {warm.tftp:,} TFTP, {warm.dhcp:,} DHCP, {warm.http:,} HTTP", flush=True)
    results = []
    for run_one, count in ((run_tftp, warm.tftp), (run_dhcp, warm.dhcp), (run_http, warm.http)):
        results.append(run_one(server, count, run_mutator(seed, "warm-up", run_one.__name__)))
        print("  " + results[-1].line(), flush=True)
    settling = time.monotonic()
    fds_before = settle(server, server.idle_fds)
    rss_before = server.rss_kib()
    print(f"baseline: {fds_before} fds, VmRSS {rss_before / 1024:.1f} MiB (settled in "
          f"{time.monotonic() - settling:.1f} s)", flush=True)
    for run_one, count in ((run_tftp, plan.tftp), (run_dhcp, plan.dhcp), (run_http, plan.http)):
        results.append(run_one(server, count, run_mutator(seed, "run", run_one.__name__)))
        print(f"  {results[-1].line()}; server VmRSS now {server.rss_kib() / 1024:.1f} MiB", flush=True)
    alive_after_load = server.alive() and server.healthy()
    fds_after = settle(server, fds_before)
    rss_after = server.rss_kib()
    growth = (rss_after - rss_before) / rss_before
    findings = [f for r in results for f in r.findings]
    if not alive_after_load:
        findings.append("the server died or stopped answering /healthz")
    if fds_before > server.idle_fds:
        findings.append(f"file descriptors after the warm-up: {fds_before}, {server.idle_fds} before any traffic")
    if fds_after > fds_before:
        findings.append(f"file descriptors: {fds_after}, baseline {fds_before}")
        print(server.describe_fds(), flush=True)
    if growth >= MAX_RSS_GROWTH:
        findings.append(f"VmRSS grew {growth:.1%} (limit {MAX_RSS_GROWTH:.0%})")
    errors = server.internal_errors()
    findings += [f"server log: {line}" for line in errors[:20]]
    print(f"after: alive and /healthz 200: {alive_after_load}; {fds_after} fds (baseline {fds_before}); "
          f"VmRSS {rss_after / 1024:.1f} MiB ({growth:+.1%}); internal errors logged: {len(errors)}")
    for finding in dict.fromkeys(findings):  # each distinct finding once
        print(f"FINDING: {finding}")
    if findings:  # the data directory is a tmpfs that goes with the namespace: keep the log
        kept = Path(tempfile.gettempdir()) / "bootserver-fuzz-server.log"
        kept.write_bytes(server.log.read_bytes())
        print(f"server log: {kept}")
    print("PASS" if not findings else "FAIL")
    return not findings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fuzz/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^4 TFTP, 10^3 DHCP, 10^3 HTTP (CI)")
    parser.add_argument("--seed", type=int, default=1, help="random seed: the same seed replays the same inputs")
    args = parser.parse_args(argv)
    isolate(argv)
    plan = QUICK if args.quick else FULL
    print(f"fuzzing bootserver: {plan.tftp:,} TFTP datagrams, {plan.dhcp:,} DHCP packets, {plan.http:,} HTTP "
          f"requests, seed {args.seed}", flush=True)
    return 0 if run(plan, args.seed) else 1
