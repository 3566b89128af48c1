"""The store's disk fills up or turns read-only under a running server: once a write has found it, every request
that must be recorded is refused with a message a person can act on (HTTP 503, TFTP ERROR 0), the server keeps
serving, nothing is half-written, and once the cause is gone it records again. A boot script's record is written
behind (within 100 ms of its answer): the one script answered before the failure was found keeps its record in
memory, never dropped, and it is written once the store can be written again.

The real `bootserver serve` runs in a private mount namespace (`unshare --mount`) with its data directory
on a small loop-mounted ext4 image, so the test can fill that file system, make the database files
immutable (`chattr +i`: file modes root ignores), or turn the whole file system read-only under the running
server (ext4's errors=remount-ro after an error: a plain `mount -o remount,ro` is refused while the server
holds the database open for writing). The test reaches the files through /proc/PID/root; the mount and its loop
device go away with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from support.config import server_section
from support.net import free_port
from support.require import require, require_root
from support.serve import ROOT, answers_async, serve_command
from support.wait import until_async

from bootserver.dhcp import DISCOVER, DhcpPacket


class Server:
    """`bootserver serve` with data_dir on its own 16 MB ext4, in a mount namespace of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"  # the mount point; empty in our own namespace
        self.data.mkdir()
        self.image = tmp_path / "data.img"
        subprocess.run(["truncate", "-s", "16M", str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(self.image)], check=True)  # -m 0: no root reserve
        images = tmp_path / "images"
        images.mkdir()
        (images / "vmlinuz").write_bytes(b"K" * 10_000)
        self.http, self.tftp = free_port(), free_port(socket.SOCK_DGRAM)
        self.dhcp, self.pxe = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        self.config = tmp_path / "site.toml"
        self.config.write_text(
            server_section(self.data, http=f"127.0.0.1:{self.http}", tftp=f"127.0.0.1:{self.tftp}",
                           new_machines_per_minute=100000) +
            f'[assets]\nkernel = "{images / "vmlinuz"}"\n'
            '[profiles.p]\nkernel = "kernel"\n[groups.all]\nprofile = "p"\n'
            f'[dhcp]\nmode = "proxy"\nserver_address = "127.0.0.1"\nport = {self.dhcp}\nproxy_port = {self.pxe}\n')
        self.log = tmp_path / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # errors=remount-ro: an error ext4 finds turns the file system read-only under the server, as on most hosts.
        script = (f'mount -o loop,errors=remount-ro "{self.image}" "{self.data}" && '
                  f'exec {shlex.join(serve_command(self.config))}')
        with self.log.open("ab") as log:  # a restart's output follows the first run's
            self.process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def path(self, name: str) -> Path:
        """A file of the data directory as the server sees it."""
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/root") / str(self.data).lstrip("/") / name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def device(self) -> str:
        """The loop device the server's data directory is mounted from, as in /proc/PID/mountinfo."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(self.data):
                return fields[fields.index("-") + 2]
        raise AssertionError(f"{self.data} is not mounted in the server's namespace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def query(self, sql: str, *params: object) -> list[tuple]:
        """Rows of `sql` on the server's store, read from inside its namespace: SQLite resolves symbolic
        links, so a path through /proc/PID/root would open a file of our own namespace instead."""
        assert self.process is not None
        code = ("import json, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
                "print(json.dumps(db.execute(sys.argv[2], json.loads(sys.argv[3])).fetchall()))")
        out = subprocess.run(["nsenter", "--target", str(self.process.pid), "--mount", sys.executable, "-c", code,
                              str(self.data / "bootserver.sqlite3"), sql, json.dumps(params)],
                             check=True, capture_output=True, text=True).stdout
        return [tuple(row) for row in json.loads(out)]


@pytest.fixture
def server(tmp_path: Path):
    require("unshare", "nsenter", "mkfs.ext4", "chattr", "e2fsck", "losetup")
    require_root("it mounts a file system in a mount namespace of its own")
    running = Server(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


async def wait_serving(server: Server, session: aiohttp.ClientSession) -> None:
    async def serving() -> bool:
        assert server.alive(), server.log.read_text()
        return await answers_async(session, f"http://127.0.0.1:{server.http}/healthz")

    await until_async(serving, 10, interval=0.05, what=lambda: f"the server to serve:\n{server.log.read_text()}")


def fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    chunk = b"\0" * (1 << 16)
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        with contextlib.suppress(OSError):  # the last few blocks, one byte at a time
            while True:
                f.write(b"\0" * 512)


def tftp_error(port: int, name: str) -> tuple[int, str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\0\1" + name.encode() + b"\0octet\0", ("127.0.0.1", port))
        data, _ = sock.recvfrom(2048)
    opcode, code = struct.unpack("!HH", data[:4])
    assert opcode == 5, data
    return code, data[4:-1].decode()


async def script(session: aiohttp.ClientSession, server: Server, mac: str) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{server.http}/boot/{mac}.ipxe") as response:
        return response.status, await response.text()


async def health(session: aiohttp.ClientSession, server: Server) -> dict:
    async with session.get(f"http://127.0.0.1:{server.http}/healthz") as response:
        assert response.status == 200
        return await response.json()


def recorded(server: Server, *macs: str) -> tuple[int, int, int]:
    """(machines, events, tokens) the store holds for `macs`."""
    canonical = [m.replace("-", ":") for m in macs]
    marks = ",".join("?" * len(macs))
    counts = " UNION ALL ".join(f"SELECT COUNT(*) FROM {t} WHERE mac IN ({marks})" for t in ("machines", "events",
                                                                                              "tokens"))
    return tuple(row[0] for row in server.query(counts, *canonical * 3))


def dhcp_answered(server: Server, mac: str, seconds: float = 1.5) -> bool:
    """Whether a PXE firmware's DISCOVER for `mac` gets an answer (proxy mode: a boot offer) within `seconds`."""
    xid = int.from_bytes(os.urandom(4), "big")
    discover = DhcpPacket(op=1, xid=xid, chaddr=bytes.fromhex(mac.replace("-", "")), flags=0x8000,
                          options={53: bytes([DISCOVER]), 60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0"})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(discover.encode(), ("127.0.0.1", server.dhcp))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                if DhcpPacket.parse(sock.recv(4096)).xid == xid:
                    return True
            except TimeoutError:
                return False
    return False


async def refused_while(server: Server, session: aiohttp.ClientSession, macs: list[str], cause: str) -> None:
    """Every request that must be recorded is refused, saying why; nothing of it is in the store. DHCP, which has
    no way to say why, is not answered at all."""
    for mac in macs:
        status, text = await script(session, server, mac)
        assert status == 503, text
        assert re.search(cause, text) and "nothing of this request was recorded" in text, text
    code, message = await asyncio.to_thread(tftp_error, server.tftp, f"boot/{macs[0]}.ipxe")
    assert (code, message) == (0, "server cannot record requests: store unavailable (disk full or read-only), "
                                  "try again later")
    problems = (await health(session, server))["problems"]
    assert len(problems) == 1 and re.search(cause, problems[0]), problems
    async with session.get(f"http://127.0.0.1:{server.http}/boot.ipxe") as response:
        assert response.status == 200  # what needs no record is served as ever
    assert not await asyncio.to_thread(dhcp_answered, server, macs[-1])
    assert server.alive()
    assert recorded(server, *macs) == (0, 0, 0)


async def failure_found(server: Server, session: aiohttp.ClientSession, mac: str) -> None:
    """The store failed; a script for `mac` is still answered (its record waits in memory) and the write behind it
    finds the failure within its interval: from then on the store says what is wrong."""
    status, text = await script(session, server, mac)
    assert status == 200, text
    await until_async(lambda: health_problems(server, session), 5, what="the write behind the script to fail")
    assert recorded(server, mac) == (0, 0, 0)


async def health_problems(server: Server, session: aiohttp.ClientSession) -> list[str]:
    return (await health(session, server))["problems"]


async def works_again(server: Server, session: aiohttp.ClientSession, mac: str) -> None:
    status, text = await script(session, server, mac)
    assert status == 200, text
    # Written at once while the store still counts as failing (its last write failed), else behind (100 ms).
    await until_async(lambda: recorded(server, mac) == (1, 1, 1), 5, what=f"the record of {mac}'s script")
    assert await asyncio.to_thread(dhcp_answered, server, mac)
    assert (await health(session, server))["problems"] == []
    assert server.query("PRAGMA integrity_check") == [("ok",)]


async def test_disk_full_then_read_only_then_fine_again(server: Server):
    async with aiohttp.ClientSession() as session:
        await wait_serving(server, session)
        assert (await script(session, server, "52-54-00-00-30-01"))[0] == 200
        await until_async(lambda: recorded(server, "52-54-00-00-30-01") == (1, 1, 1), 5, what="its record")

        fill(server.path("fill"))
        await failure_found(server, session, "52-54-00-00-31-ff")
        await refused_while(server, session, [f"52-54-00-00-31-{i:02x}" for i in range(20)],
                            r"\(database or disk is full\): free space on the file system holding ")
        server.path("fill").unlink()
        await works_again(server, session, "52-54-00-00-30-02")
        assert recorded(server, "52-54-00-00-31-ff") == (1, 1, 1)  # kept in memory, written once it could be

        files = [server.path(n) for n in ("bootserver.sqlite3", "bootserver.sqlite3-wal")]
        subprocess.run(["chattr", "+i", *map(str, files)], check=True)
        try:
            await failure_found(server, session, "52-54-00-00-32-ff")
            await refused_while(server, session, [f"52-54-00-00-32-{i:02x}" for i in range(20)],
                                r"\((disk I/O error|attempt to write a readonly database)\): check that .* writable")
        finally:
            subprocess.run(["chattr", "-i", *map(str, files)], check=True)
        await works_again(server, session, "52-54-00-00-30-03")
        assert recorded(server, "52-54-00-00-32-ff") == (1, 1, 1)
    log = server.log.read_text()
    assert "Traceback" not in log, log
    warnings = [line for line in log.splitlines() if "WARNING bootserver.store" in line]
    assert len(warnings) == 4, log  # once per outage and once when it is over, not once per request


async def test_a_file_system_turned_read_only_under_the_server(server: Server):
    """ext4 mounted errors=remount-ro meets an error (triggered through its sysfs knob, as a failing disk would):
    the kernel turns the whole file system read-only under the running server, open files and all. Every request
    that must be recorded is refused, DHCP unanswered, the rest served. ext4 allows no way back to read-write
    while it is mounted, so the cause is gone only after a restart with the file system checked: then what was
    acknowledged before is there and the server records again."""
    async with aiohttp.ClientSession() as session:
        await wait_serving(server, session)
        assert (await script(session, server, "52-54-00-00-33-01"))[0] == 200
        await until_async(lambda: recorded(server, "52-54-00-00-33-01") == (1, 1, 1), 5, what="its record")
        device = Path(server.device()).name
        Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("test: the disk failed\n")
        mounted = next(line for line in Path(f"/proc/{server.process.pid}/mounts").read_text().splitlines()
                       if line.split()[1] == str(server.data))
        assert mounted.split()[3].split(",")[0] == "ro" or "emergency_ro" in mounted, mounted
        await failure_found(server, session, "52-54-00-00-34-ff")
        await refused_while(server, session, [f"52-54-00-00-34-{i:02x}" for i in range(20)],
                            r"\((disk I/O error|attempt to write a readonly database)\): check that .* writable")
        # The provisioner polled for jobs (every second) during those 1.5 s of DHCP silence, and each poll's empty
        # transaction commits even now: the problem must stay until something is really written again.
        assert len((await health(session, server))["problems"]) == 1
    log = server.log.read_text()
    assert log.count("WARNING bootserver.store") == 1 and "can be written again" not in log, log

    server.stop()
    # 34-ff's record waited in memory for a store that never came back: the stop says it is lost, and how many.
    assert "1 records kept in memory behind boot scripts could not be written, and are lost" in \
        server.log.read_text()
    await until_async(lambda: image_free(server.image), 10, what=f"the loop device to let go of {server.image}")
    checked = subprocess.run(["e2fsck", "-f", "-y", str(server.image)], capture_output=True, text=True)
    assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 1: errors were corrected
    server.start()
    async with aiohttp.ClientSession() as session:
        await wait_serving(server, session)
        assert recorded(server, "52-54-00-00-33-01") == (1, 1, 1)  # acknowledged before: kept
        await works_again(server, session, "52-54-00-00-33-02")
    assert "Traceback" not in server.log.read_text()


def image_free(image: Path) -> bool:
    """Whether no loop device holds `image` any more (the mount namespace went with the server)."""
    listed = subprocess.run(["losetup", "--associated", str(image)], capture_output=True, text=True, check=True)
    return listed.stdout.strip() == ""
