"""TFTP under abuse, against the whole server (app.init_app, real UDP sockets on loopback): abandoned sessions and
bursts are capped per client and in total with a quarter of the table kept for new client addresses,
every unanswered session is dropped after one retransmission, file descriptors come back to where they
were, and a missing TFTP root is reported while everything else serves."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import shutil
import socket
import struct

import aiohttp
import pytest
from aiohttp import web
from support.wait import until_async

from bootserver import tftp
from bootserver.app import CONFIG, STORE, TFTP, http_address, init_app, running, tftp_address

RRQ, DATA, ERROR, OACK = 1, 3, 5, 6
CLIENTS = 1000
WAVE = 200


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rrq(name: str, **options: object) -> bytes:
    packet = struct.pack("!H", RRQ) + name.encode() + b"\0octet\0"
    return packet + b"".join(f"{k}\0{v}\0".encode() for k, v in options.items())


def flood(server: tuple[str, int], sockets: list[socket.socket], name: str) -> tuple[int, list[bytes]]:
    """One RRQ from each socket, never ACKed, in waves of WAVE (more at once would overflow the
    listening socket's buffer: the kernel drops them, the server never sees them). (admitted, refusals):
    an admitted request is answered from a new port (the transfer's TID), a refused one from the
    listening port with its ERROR packet."""
    admitted, refusals = 0, []
    for start in range(0, len(sockets), WAVE):
        wave = sockets[start:start + WAVE]
        for sock in wave:
            sock.sendto(rrq(name, blksize=1400, tsize=0), server)
        for sock in wave:
            sock.settimeout(5)
            data, source = sock.recvfrom(2048)  # the first answer; retransmissions are never read
            if source[1] == server[1]:
                refusals.append(data)
            else:
                assert data[:2] in (struct.pack("!H", OACK), struct.pack("!H", DATA)), data[:40]
                admitted += 1
    return admitted, refusals


def client_sockets(hosts: list[str], each: int) -> list[socket.socket]:
    sockets = []
    for host in hosts:
        for _ in range(each):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            sockets.append(sock)
    return sockets


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def curl_tftp(url: str) -> int:
    process = await asyncio.create_subprocess_exec("curl", "-sS", "-o", "/dev/null", url,
                                                   stderr=asyncio.subprocess.DEVNULL)
    return await process.wait()


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))  # both ends of 2,000 sockets live here
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_abandoned_sessions_and_bursts_are_capped_then_freed(config, many_files):
    app = init_app(config)
    async with running(app):
        await _flood_and_recover(app)


async def _flood_and_recover(app: web.Application) -> None:
    server, http = tftp_address(app), f"http://127.0.0.1:{http_address(app)[1]}"
    (app[CONFIG].server.tftp_root / "pxelinux.0").write_bytes(os.urandom(64 * 1024))
    tftp_server = app[TFTP]
    assert tftp_server is not None
    total = tftp.session_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    assert total == tftp.MAX_SESSIONS  # the limit was raised enough for the whole table
    app[STORE].record("52:54:00:00:00:01", "script-served", {})  # a MAC that asked for nothing first is not recorded
    gc.collect()  # objects left by earlier tests must not close their files in the middle of this count
    baseline = open_fds()
    # A request nobody answers holds its place timeout * 2 s (its first packet and one retransmission):
    # 6 s here rather than 2, so that no place is freed while the floods below run on a loaded machine.
    tftp_server.timeout = 3.0

    # A burst of 1,000 RRQs from one address (1,000 source ports): only the per-client cap is admitted.
    burst = client_sockets(["127.0.0.2"], CLIENTS)
    admitted, refusals = await asyncio.to_thread(flood, server, burst, "boot/52-54-00-00-00-01/vmlinuz")
    assert admitted == tftp.MAX_SESSIONS_PER_CLIENT
    assert set(refusals) == {struct.pack("!HH", ERROR, 0) + b"too many sessions\0"}
    # Finding 12 (trust on the boot network): 1,000 more, 10 from each of 100 addresses. Sources that
    # hold a transfer are admitted until three quarters of the table is taken; past that, each address
    # still holding nothing gets one: the last quarter is kept for sources holding none.
    shared = total - total // 4
    full, partial = divmod(shared - tftp.MAX_SESSIONS_PER_CLIENT, 10)  # 73 addresses get 10, the 74th 4
    rest = 100 - full - (partial > 0)  # and the 26 after it 1 each
    spread = client_sockets([f"127.0.1.{i}" for i in range(1, 101)], 10)
    admitted, refusals = await asyncio.to_thread(flood, server, spread, "pxelinux.0")
    assert admitted == shared - tftp.MAX_SESSIONS_PER_CLIENT + rest and len(refusals) == CLIENTS - admitted
    assert tftp_server.sessions == shared + rest < total
    # So it takes new addresses to fill the table: 300 of them, one request each; up to the hard cap.
    fresh = client_sockets([f"127.0.{3 + i // 200}.{1 + i % 200}" for i in range(300)], 1)
    admitted, refusals = await asyncio.to_thread(flood, server, fresh, "pxelinux.0")
    assert admitted == total - shared - rest and len(refusals) == len(fresh) - admitted
    assert tftp_server.sessions == total

    # Full table: HTTP serves as ever, a new TFTP client is told why it is turned away.
    assert (await get(f"{http}/boot/52-54-00-00-00-03.ipxe"))[0] == 200
    late = client_sockets(["127.0.2.1"], 1)
    assert (await asyncio.to_thread(flood, server, late, "pxelinux.0"))[0] == 0

    # Nobody ACKs: every session is dropped after one retransmission (timeout * 2 = 6 s), nothing leaks.
    deadline = tftp_server.timeout * (tftp.UNANSWERED_RETRIES + 1) + 5
    await until_async(lambda: tftp_server.sessions == 0, timeout=deadline)
    for sock in burst + spread + fresh + late:
        sock.close()
    # Not above the baseline: no socket or file of the flood leaked (fewer is fine: the test process
    # itself may close something meanwhile).
    await until_async(lambda: open_fds() <= baseline, timeout=5)
    failed = [e for e in app[STORE].events("52:54:00:00:00:01") if e.kind == "file-failed"]
    assert len(failed) == tftp.MAX_SESSIONS_PER_CLIENT
    assert {e.detail["error"] for e in failed} == {f"never answered: dropped after {tftp.UNANSWERED_RETRIES} retries"}
    # And it serves a real client again.
    assert await curl_tftp(f"tftp://127.0.0.1:{server[1]}/pxelinux.0") == 0


async def test_missing_tftp_root_is_a_named_problem_while_the_rest_serves(app: web.Application):
    root = app[CONFIG].server.tftp_root
    (root / "pxelinux.0").write_bytes(b"x" * 1000)
    http, tftp_url = f"http://127.0.0.1:{http_address(app)[1]}", f"tftp://127.0.0.1:{tftp_address(app)[1]}"
    health = (await get(f"{http}/healthz"))[1]
    assert '"problems": []' in health

    shutil.rmtree(root)
    status, body = await get(f"{http}/healthz")
    health = __import__("json").loads(body)
    assert status == 200 and health["ok"] is True  # alive: a supervisor must not restart it for this
    assert health["tftp_root"] is None
    assert health["problems"] == [f"tftp root {root} is missing: files under it are not served over TFTP "
                                  f"(boot scripts, kernels and iPXE binaries still are); recreate it with mkdir"]
    assert (await get(f"{http}/boot/52-54-00-00-00-01.ipxe"))[0] == 200
    assert await curl_tftp(f"{tftp_url}/boot/52-54-00-00-00-01/vmlinuz") == 0  # boot paths do not need it
    assert await curl_tftp(f"{tftp_url}/pxelinux.0") != 0  # file not found, not a crash

    root.mkdir()
    assert (await get(f"{http}/healthz"))[1].count('"problems": []') == 1
