"""Emulated machines for the boot-storm and phone-home benchmarks: their SSH servers, TFTP client and boot steps.

Machine i has MAC 52:54:00:bb:HH:LL, source address 127.0.X.Y (all of 127/8 is loopback: every machine is
its own client address, as the servers' per-client caps expect) and a real SSH server on 127.0.0.1 (hosted
by benchmarks/sshd_pool.py processes, tests/support/sshd.py's server), named in the config as `[machines.MAC] ssh`.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from common import BENCH

CHUNK = 1 << 20


def mac(i: int) -> str:
    return f"52:54:00:bb:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"


def address(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


# -- SSH servers -------------------------------------------------------------------------------------------


@dataclass
class Pools:
    """N SSH servers spread over a few processes; their connection timeline and finish times."""

    count: int
    processes: list[subprocess.Popen] = field(default_factory=list)
    ports: dict[int, int] = field(default_factory=dict)
    host_keys: dict[int, str] = field(default_factory=dict)
    opens: list[float] = field(default_factory=list)
    closes: list[float] = field(default_factory=list)
    finished: dict[int, float] = field(default_factory=dict)
    events: dict[int, asyncio.Event] = field(default_factory=dict)
    _readers: list[asyncio.Task] = field(default_factory=list)

    async def start(self, authorized_key: str, workdir: Path, per_process: int = 250) -> None:
        first = 0
        while first < self.count:
            n = min(per_process, self.count - first)
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH / "sshd_pool.py"), "--count", str(n), "--first", str(first),
                "--authorized-key", authorized_key, "--workdir", str(workdir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20)
            self.processes.append(process)
            first += n
        self.events = {i: asyncio.Event() for i in range(self.count)}
        ready = [asyncio.Event() for _ in self.processes]
        self._readers = [asyncio.create_task(self._read(p, ready[k])) for k, p in enumerate(self.processes)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 120)

    async def _read(self, process, ready: asyncio.Event) -> None:
        while line := await process.stdout.readline():
            msg = json.loads(line)
            if "open" in msg:
                self.opens.append(msg["open"])
            elif "close" in msg:
                self.closes.append(msg["close"])
            elif "finish" in msg:
                self.finished.setdefault(msg["finish"], msg["t"])
                if msg["finish"] in self.events:
                    self.events[msg["finish"]].set()
            elif "server" in msg:
                self.ports[msg["server"]] = msg["port"]
                self.host_keys[msg["server"]] = msg["host_key"]
            elif "ready" in msg:
                ready.set()

    def max_concurrent(self) -> int:
        """The most SSH connections open at once, over every server of every pool process."""
        timeline = sorted([(t, 1) for t in self.opens] + [(t, -1) for t in self.closes], key=lambda x: (x[0], x[1]))
        level = peak = 0
        for _, step in timeline:
            level += step
            peak = max(peak, level)
        return peak

    async def stop(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


def site_toml(*, data: Path, http_port: int, tftp_port: int | None, ipxe_dir: Path, nodes_dir: Path,
              pools: Pools, blob_bytes: int, concurrency: int) -> str:
    """One profile for every machine: the agent's kernel and initrd, and a deploy whose `check` does real work
    in a scratch directory (diskless nodes deploy to "/" of this very machine, so no files are deployed)."""
    check = (f'd=$(mktemp -d {nodes_dir}/node.XXXXXX) && head -c {blob_bytes} /dev/urandom > "$d/blob" '
             f'&& sha256sum "$d/blob" > "$d/blob.sha256" && sleep 0.2')
    lines = [
        "[server]", f'http = "127.0.0.1:{http_port}"',
        f'tftp = "127.0.0.1:{tftp_port}"' if tftp_port else 'tftp = "off"',
        f'data_dir = "{data}"', f'ipxe_dir = "{ipxe_dir}"', f"provision_concurrency = {concurrency}",
        "new_machines_per_minute = 1000000",  # the whole emulated fleet boots from this one address
        "[assets]", 'agent-kernel = "images/vmlinuz"', 'agent-initrd = "images/initrd.img"',
        "[profiles.agent]", 'kernel = "agent-kernel"', 'initrd = ["agent-initrd"]', 'cmdline = "console=ttyS0"',
        "[profiles.agent.deploy]", f"check = {json.dumps(check)}",
        "[groups.all]", 'profile = "agent"',
    ]
    for i in range(pools.count):
        lines += [f'[machines."{mac(i)}"]', f'hostname = "node{i:04d}"', f'ssh = "127.0.0.1:{pools.ports[i]}"']
    return "\n".join(lines) + "\n"


# -- TFTP client -------------------------------------------------------------------------------------------


async def tftp_get(server: tuple[str, int], filename: str, local_ip: str, *, blksize: int = 1468,
                   timeout: float = 1.0, retries: int = 5) -> int:
    """Fetch a file lock-step (RFC 1350 + blksize and tsize) as a PXE ROM would; the bytes received."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind((local_ip, 0))
        last = (b"\0\1" + filename.encode() + b"\0octet\0blksize\0" + str(blksize).encode() + b"\0tsize\0" + b"0\0")
        dest = server
        await loop.sock_sendto(sock, last, dest)
        peer = None
        size = 512
        expected = 1
        received = 0
        tries = 0
        while True:
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), timeout)
            except TimeoutError:
                tries += 1
                if tries > retries:
                    raise TimeoutError(f"tftp {filename}: no answer after {retries} retries") from None
                await loop.sock_sendto(sock, last, dest)
                continue
            if peer is None:
                peer = addr
            elif addr != peer:
                continue
            opcode = int.from_bytes(data[:2], "big")
            if opcode == 6:  # OACK
                parts = data[2:].split(b"\0")
                options = dict(zip(parts[0::2], parts[1::2], strict=False))
                size = int(options.get(b"blksize", b"512"))
                last, dest = b"\0\4\0\0", peer
            elif opcode == 3:
                number = int.from_bytes(data[2:4], "big")
                if number == expected & 0xFFFF:
                    received += len(data) - 4
                    last, dest = b"\0\4" + data[2:4], peer
                    expected += 1
                    tries = 0
                    await loop.sock_sendto(sock, last, dest)
                    if len(data) - 4 < size:
                        return received
                    continue
            elif opcode == 5:
                raise OSError(f"tftp {filename}: ERROR {data[2:4].hex()} {data[4:-1].decode(errors='replace')}")
            else:
                continue
            tries = 0
            await loop.sock_sendto(sock, last, dest)
    finally:
        sock.close()


# -- one machine -------------------------------------------------------------------------------------------


def session(i: int, total_timeout: float = 600) -> aiohttp.ClientSession:
    """HTTP as machine i: its own source address and connections."""
    connector = aiohttp.TCPConnector(local_addr=(address(i), 0), limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=total_timeout))


async def get_script(http: aiohttp.ClientSession, base: str, i: int) -> str:
    path = mac(i).replace(":", "-")
    async with http.get(f"{base}/boot/{path}.ipxe", params={"platform": "pcbios", "arch": "x86_64"}) as r:
        text = await r.text()
        if r.status != 200:
            raise OSError(f"script: HTTP {r.status}: {text[:200]}")
    return text


def script_urls(script: str) -> tuple[str, list[str], str]:
    """(kernel URL, initrd URLs, token) from a rendered linux.ipxe.j2 script."""
    kernel = re.search(r"^kernel (\S+)", script, re.M)
    token = re.search(r"bootserver\.token=(\S+)", script)
    if not kernel or not token:
        raise OSError(f"script has no kernel line or token:\n{script[:400]}")
    return kernel[1], re.findall(r"^initrd (\S+)", script, re.M), token[1]


async def download(http: aiohttp.ClientSession, url: str) -> int:
    got = 0
    async with http.get(url) as r:
        if r.status != 200:
            raise OSError(f"{url}: HTTP {r.status}")
        async for chunk in r.content.iter_chunked(CHUNK):
            got += len(chunk)
        if r.content_length is not None and got != r.content_length:
            raise OSError(f"{url}: {got} of {r.content_length} bytes")
    return got


async def phone_home(http: aiohttp.ClientSession, base: str, i: int, token: str, host_key: str) -> int:
    path = mac(i).replace(":", "-")
    body = {"token": token, "ip": address(i), "host_key": host_key, "kernel": "6.1.0-bench", "disks": []}
    async with http.post(f"{base}/boot/{path}/phone-home", json=body) as r:
        await r.read()
        return r.status


# -- after the run -----------------------------------------------------------------------------------------


async def wait_terminal(base: str, count: int, deadline: float) -> dict[str, int]:
    """Poll /metrics (one cheap request a second) until `count` machines are deployed, failed or interrupted."""
    states: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base}/metrics") as r:
                    text = await r.text()
                states = {m[1]: int(float(m[2])) for m in
                          re.finditer(r'^bootserver_machines\{state="([^"]+)"\} (\S+)', text, re.M)}
                states = {k: v for k, v in states.items() if v}
            except (aiohttp.ClientError, TimeoutError):
                pass
            if sum(states.get(s, 0) for s in ("deployed", "failed", "interrupted")) >= count:
                break
            await asyncio.sleep(1.0)
    return states

