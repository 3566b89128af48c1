"""Tests for bootserver.tftp against real sockets on loopback: tftpy's client, curl, atftp and raw UDP."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tftpy
from support.wait import until_async

from bootserver.errors import BadRequest
from bootserver.payload import Payload, resolve_under
from bootserver.tftp import (
    MAX_BLKSIZE,
    Address,
    TftpServer,
    Transfer,
    clamp_blksize,
    native,
    negotiate,
    parse_request,
)

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
MEMORY = b"#!ipxe\nchain http://example.invalid/boot\n" * 50

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@dataclass
class Env:
    server: TftpServer
    root: Path
    outside: Path
    done: list[Transfer]
    files: dict[str, bytes]

    @property
    def addr(self) -> Address:
        return self.server.address

    async def wait_done(self, count: int = 1) -> list[Transfer]:
        """on_done runs on the server's side after the last ACK, so the client may finish first."""
        await until_async(lambda: len(self.done) >= count, interval=0.01,
                          what=lambda: f"on_done {count} times (called {len(self.done)} times)")
        return self.done


def make_tree(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    root = tmp_path / "root"
    (root / "sub" / "dir").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret\n")
    files = {
        "kernel": os.urandom(300 * 1024 + 17),
        "exact.bin": os.urandom(4 * 512),  # a multiple of the block size: ends with an empty block
        "empty.bin": b"",
        "sub/dir/file.bin": os.urandom(3000),
        "rollover.bin": os.urandom(65536 * 8 + 100),  # over 65535 blocks of 8 bytes
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "escape").symlink_to(outside)
    (root / "a").mkdir()
    files["memory.cfg"] = MEMORY
    return root, outside, files


def make_resolve(root: Path) -> Callable[[str, Address], Payload]:
    def resolve(name: str, peer: Address) -> Payload:
        if name == "memory.cfg":
            return Payload(name, data=MEMORY)
        if name == "boom":
            raise RuntimeError("resolver bug")
        if name.startswith("bad-"):
            raise BadRequest(f"cannot parse {name!r}")
        return Payload(name, path=resolve_under(root, name))

    return resolve


ServerFactory = Callable[..., Awaitable[Env]]


@pytest.fixture(params=["python", "native"])
async def make_env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ServerFactory]:
    """Servers whose transfers run in Python (session.py) or in the C loop (native.py): every test, both."""
    servers: list[TftpServer] = []
    root, outside, files = make_tree(tmp_path)

    async def factory(host: str = "127.0.0.1", on_done: Callable[[Transfer], None] | None = None,
                      **kwargs: Any) -> Env:
        done: list[Transfer] = []
        server = TftpServer(make_resolve(root), on_done or done.append, **{"engine": request.param, **kwargs})
        await server.start(host, 0)
        servers.append(server)
        return Env(server, root, outside, done, files)

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def env(make_env: ServerFactory) -> Env:
    return await make_env(timeout=1.0, retries=2)


# --------------------------------------------------------------------------------------------
# A raw UDP client, run in a thread (asyncio.to_thread) while the server runs on the loop
# --------------------------------------------------------------------------------------------


def rrq(name: str | bytes, mode: bytes = b"octet", opcode: int = RRQ, **options: object) -> bytes:
    raw_name = name.encode() if isinstance(name, str) else name
    packet = struct.pack("!H", opcode) + raw_name + b"\0" + mode + b"\0"
    for key, value in options.items():
        packet += key.encode() + b"\0" + str(value).encode() + b"\0"
    return packet


def ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


@dataclass
class Packet:
    opcode: int
    number: int  # block number or error code
    body: bytes
    addr: tuple[Any, ...]

    @property
    def message(self) -> str:
        return self.body.split(b"\0", 1)[0].decode()

    def options(self) -> dict[str, str]:
        parts = self.body.split(b"\0")[:-1]
        return {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}


class RawClient:
    def __init__(self, server: Address, bind_host: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.server = server
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((bind_host or server[0], 0))

    def send(self, data: bytes, to: tuple[Any, ...] | None = None) -> None:
        self.sock.sendto(data, to or self.server)

    def recv(self, timeout: float = 3.0) -> Packet:
        self.sock.settimeout(timeout)
        data, addr = self.sock.recvfrom(70000)
        opcode = struct.unpack("!H", data[:2])[0]
        if opcode == OACK:
            return Packet(opcode, 0, data[2:], addr)
        return Packet(opcode, struct.unpack("!H", data[2:4])[0], data[4:], addr)

    def recv_or_none(self, timeout: float) -> Packet | None:
        try:
            return self.recv(timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@dataclass
class Download:
    data: bytes
    oack: dict[str, str] | None
    blocks: list[int] = field(default_factory=list)  # wire block numbers, in arrival order
    strays: list[Packet] = field(default_factory=list)  # packets from any other port than the TID


def raw_download(client: RawClient, name: str, **options: object) -> Download:
    """A small RFC 1350/2347/7440 client: ACKs each window's last block, or the last in-order one."""
    client.send(rrq(name, **options))
    first = client.recv()
    assert first.opcode in (DATA, OACK), f"got opcode {first.opcode}: {first.body!r}"
    tid = first.addr
    result = Download(b"", first.options() if first.opcode == OACK else None)
    blksize = int((result.oack or {}).get("blksize", 512))
    window = int((result.oack or {}).get("windowsize", 1))
    pending = [first] if first.opcode == DATA else []
    if first.opcode == OACK:
        client.send(ack(0), tid)
    received = bytearray()
    expected = 1
    while True:
        packet = pending.pop() if pending else client.recv()
        if packet.addr != tid:
            result.strays.append(packet)
            continue
        assert packet.opcode == DATA, f"got opcode {packet.opcode}: {packet.body!r}"
        result.blocks.append(packet.number)
        if packet.number != expected & 0xFFFF:
            client.send(ack(expected - 1), tid)  # RFC 7440: ACK the last block received in order
            continue
        received += packet.body
        expected += 1
        if len(packet.body) < blksize:
            client.send(ack(expected - 1), tid)
            result.data = bytes(received)
            return result
        if (expected - 1) % window == 0:
            client.send(ack(expected - 1), tid)


async def download_raw(env: Env, name: str, **options: object) -> Download:
    client = RawClient(env.addr)
    try:
        return await asyncio.to_thread(raw_download, client, name, **options)
    finally:
        client.close()


async def exchange(env: Env, packet: bytes, *, timeout: float = 3.0) -> Packet | None:
    """Send one datagram to the listening port; the reply, if any arrives within `timeout`."""
    client = RawClient(env.addr)
    try:
        client.send(packet)
        return await asyncio.to_thread(client.recv_or_none, timeout)
    finally:
        client.close()


async def run(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait()


# --------------------------------------------------------------------------------------------
# Real clients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blksize", [512, 1468, 8192])
async def test_tftpy_client_downloads_with_blksize_and_tsize(env: Env, tmp_path: Path, blksize: int) -> None:
    out = tmp_path / "out"
    client = tftpy.TftpClient(*env.addr, options={"blksize": blksize, "tsize": 0})
    await asyncio.to_thread(client.download, "kernel", str(out))
    assert out.read_bytes() == env.files["kernel"]
    [transfer] = await env.wait_done()
    assert transfer.error is None
    assert transfer.blksize == blksize
    assert transfer.bytes_sent == len(env.files["kernel"])
    assert transfer.payload is not None and transfer.payload.path == env.root / "kernel"


@pytest.mark.parametrize("name", ["memory.cfg", "exact.bin", "empty.bin", "sub/dir/file.bin"])
async def test_tftpy_client_downloads_edge_payloads(env: Env, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    await asyncio.to_thread(tftpy.TftpClient(*env.addr).download, name, str(out))
    assert out.read_bytes() == env.files[name]
    [transfer] = await env.wait_done()
    assert (transfer.error, transfer.bytes_sent) == (None, len(env.files[name]))


async def test_curl_downloads(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    host, port = env.addr
    assert await run("curl", "-s", f"tftp://{host}:{port}/kernel", "--tftp-blksize", "1468", "-o", str(out)) == 0
    assert out.read_bytes() == env.files["kernel"]
    [transfer] = await env.wait_done()
    assert (transfer.error, transfer.blksize) == (None, 1468)


async def test_curl_missing_file_fails(env: Env, tmp_path: Path) -> None:
    host, port = env.addr
    assert await run("curl", "-s", f"tftp://{host}:{port}/nope", "-o", str(tmp_path / "out")) != 0
    [transfer] = await env.wait_done()
    assert transfer.payload is None and transfer.error is not None and transfer.error.startswith("not found")


class FullSendBufferSocket(socket.socket):
    """Fault injection, not a fake network: a real UDP socket whose every third DATA send reports a full
    send buffer (EAGAIN), which loopback almost never does but a busy NIC does."""

    data_sends = 0
    refused = 0

    def sendto(self, data: Any, *args: Any) -> int:
        if bytes(data[:2]) == b"\0\3":
            FullSendBufferSocket.data_sends += 1
            if FullSendBufferSocket.data_sends % 3 == 0:
                FullSendBufferSocket.refused += 1
                raise BlockingIOError(11, "Resource temporarily unavailable")
        return super().sendto(data, *args)


# Python's only: the full buffer is a fake socket of Python's, which the C loop never calls (a real one does not fill
# on loopback, where the kernel frees a datagram's buffer space as it is sent).
@pytest.mark.parametrize("make_env", ["python"], indirect=True)
@pytest.mark.parametrize("windowsize", [1, 8])
async def test_full_send_buffer_loses_no_block(make_env: ServerFactory, monkeypatch: pytest.MonkeyPatch,
                                               windowsize: int) -> None:
    env = await make_env(timeout=5.0)
    original = TftpServer._transfer_socket

    def transfer_socket(self: TftpServer) -> socket.socket:
        real = original(self)
        return FullSendBufferSocket(real.family, real.type, fileno=real.detach())

    monkeypatch.setattr(TftpServer, "_transfer_socket", transfer_socket)
    FullSendBufferSocket.data_sends = FullSendBufferSocket.refused = 0
    result = await download_raw(env, "kernel", blksize=1024, windowsize=windowsize)
    assert result.data == env.files["kernel"]
    # Each block arrived once, in order: a refused send was retried when the socket became writable,
    # not left to the retransmission timer (5 s here) and not sent twice.
    assert result.blocks == list(range(1, len(env.files["kernel"]) // 1024 + 2))
    assert FullSendBufferSocket.refused > 100
    [transfer] = await env.wait_done()
    assert transfer.error is None


# atftp 0.8.0 in Debian 12 implements RFC 7440 windowsize (`--option "windowsize N"`).
@pytest.mark.parametrize(("options", "blksize", "windowsize"), [
    ([], 512, 1),
    (["--option", "windowsize 16", "--option", "blksize 1468"], 1468, 16),
])
async def test_atftp_downloads(env: Env, tmp_path: Path, options: list[str], blksize: int, windowsize: int) -> None:
    out = tmp_path / "out"
    host, port = env.addr
    assert await run("atftp", *options, "-g", "-r", "kernel", "-l", str(out), host, str(port)) == 0
    assert out.read_bytes() == env.files["kernel"]
    [transfer] = await env.wait_done()
    assert (transfer.error, transfer.blksize, transfer.windowsize) == (None, blksize, windowsize)


async def test_atftp_block_numbers_roll_over(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    host, port = env.addr
    argv = ["atftp", "--option", "windowsize 64", "--option", "blksize 8", "-g", "-r", "rollover.bin"]
    assert await run(*argv, "-l", str(out), host, str(port)) == 0
    assert out.read_bytes() == env.files["rollover.bin"]


# --------------------------------------------------------------------------------------------
# Raw sockets: protocol details
# --------------------------------------------------------------------------------------------


async def test_raw_block_numbers_roll_over_to_zero(env: Env) -> None:
    result = await download_raw(env, "rollover.bin", blksize=8, windowsize=32)
    assert result.data == env.files["rollover.bin"]
    wrap = result.blocks.index(65535)
    assert result.blocks[wrap + 1] == 0  # after 65535 comes 0, not 1
    assert result.blocks[-1] == (len(env.files["rollover.bin"]) // 8 + 1) & 0xFFFF


async def test_oack_answers_accepted_options_and_ignores_unknown(env: Env) -> None:
    result = await download_raw(env, "kernel", blksize=1024, tsize=0, timeout=3, windowsize=2, color="blue")
    assert result.oack == {"blksize": "1024", "tsize": str(len(env.files["kernel"])), "timeout": "3",
                           "windowsize": "2"}
    assert result.data == env.files["kernel"]


async def test_option_names_are_case_insensitive(env: Env) -> None:
    result = await download_raw(env, "kernel", BlkSize=1024)
    assert result.oack == {"blksize": "1024"}


async def test_only_unknown_options_means_no_oack(env: Env) -> None:
    result = await download_raw(env, "kernel", color="blue")
    assert result.oack is None
    assert result.data == env.files["kernel"]


@pytest.mark.parametrize("value", ["abc", "0", "7", "-5", "+600", "1_000", "512.0"])
async def test_invalid_blksize_is_ignored(env: Env, value: str) -> None:
    result = await download_raw(env, "sub/dir/file.bin", blksize=value)
    assert result.oack is None  # nothing accepted: the server starts with DATA 1 of 512 bytes
    assert result.data == env.files["sub/dir/file.bin"]


@pytest.mark.parametrize(("asked", "granted"), [(65464, 65464), (70000, MAX_BLKSIZE), (9999999999, MAX_BLKSIZE)])
async def test_large_blksize_is_clamped_to_rfc_maximum(env: Env, asked: int, granted: int) -> None:
    # Loopback's MTU is 64 KiB, so only the RFC 2348 maximum limits the size here.
    result = await download_raw(env, "kernel", blksize=asked)
    assert result.oack == {"blksize": str(granted)}
    assert result.data == env.files["kernel"]


def test_clamp_blksize_to_path_mtu() -> None:
    assert clamp_blksize(65464, 1500, ipv6=False) == 1468  # 1500 - 20 IP - 8 UDP - 4 TFTP
    assert clamp_blksize(65464, 1500, ipv6=True) == 1448  # 40-byte IPv6 header
    assert clamp_blksize(8192, 9000, ipv6=False) == 8192
    assert clamp_blksize(1024, 1500, ipv6=False) == 1024
    assert clamp_blksize(70000, None, ipv6=False) == MAX_BLKSIZE
    assert clamp_blksize(65464, 65536, ipv6=False) == 65464


def test_negotiate_rules() -> None:
    assert negotiate({"blksize": "abc"}, size=10, mtu=1500, ipv6=False).oack == {}
    assert negotiate({"blksize": "9000"}, size=10, mtu=1500, ipv6=False).blksize == 1468
    assert negotiate({"timeout": "0"}, size=10, mtu=None, ipv6=False).oack == {}
    assert negotiate({"timeout": "256"}, size=10, mtu=None, ipv6=False).oack == {}
    # Valid up to 255 (RFC 2349), but a long one would let an abandoned transfer hold its socket for minutes.
    assert negotiate({"timeout": "255"}, size=10, mtu=None, ipv6=False).oack == {}
    assert negotiate({"timeout": "6"}, size=10, mtu=None, ipv6=False).oack == {}
    assert negotiate({"timeout": "5"}, size=10, mtu=None, ipv6=False).timeout == 5
    assert negotiate({"windowsize": "0"}, size=10, mtu=None, ipv6=False).oack == {}
    assert negotiate({"windowsize": "70000"}, size=10, mtu=None, ipv6=False).windowsize == 65535
    assert negotiate({"tsize": "0"}, size=1234, mtu=None, ipv6=False).oack == {"tsize": "1234"}
    assert negotiate({"tsize": "x"}, size=1234, mtu=None, ipv6=False).oack == {}


def test_parse_request_strips_nul_padding_and_lowercases() -> None:
    request = parse_request(rrq("pxelinux.0", mode=b"OCTET", TSIZE=0) + b"\0" * 20)
    assert (request.filename, request.mode, request.options) == ("pxelinux.0", "octet", {"tsize": "0"})


async def test_windowsize_sends_a_window_then_waits(env: Env) -> None:
    def scenario(client: RawClient) -> None:
        client.send(rrq("kernel", windowsize=4))
        oack = client.recv()
        assert (oack.opcode, oack.options()) == (OACK, {"windowsize": "4"})
        tid = oack.addr
        client.send(ack(0), tid)
        assert [client.recv().number for _ in range(4)] == [1, 2, 3, 4]
        # The server's timeout is 1 s, so in 0.3 s a fifth block could only be a window overrun.
        assert client.recv_or_none(0.3) is None
        # An ACK inside the window restarts the window right after the acknowledged block.
        client.send(ack(2), tid)
        assert [client.recv().number for _ in range(4)] == [3, 4, 5, 6]
        client.send(ack(6), tid)
        assert [client.recv().number for _ in range(4)] == [7, 8, 9, 10]
        client.send(struct.pack("!HH", ERROR, 0) + b"enough\0", tid)

    client = RawClient(env.addr)
    try:
        await asyncio.to_thread(scenario, client)
    finally:
        client.close()
    [transfer] = await env.wait_done()
    assert transfer.windowsize == 4 and transfer.bytes_sent == 6 * 512


async def test_duplicate_ack_does_not_resend_data(env: Env) -> None:
    def scenario(client: RawClient) -> None:
        client.send(rrq("kernel"))
        first = client.recv()
        assert (first.opcode, first.number) == (DATA, 1)
        client.send(ack(1), first.addr)
        assert client.recv().number == 2
        client.send(ack(1), first.addr)  # a duplicate: must not trigger a second DATA 2
        client.send(ack(1), first.addr)
        client.send(ack(2), first.addr)
        assert client.recv().number == 3  # had the duplicates caused resends, DATA 2 would come first
        client.send(struct.pack("!HH", ERROR, 0) + b"enough\0", first.addr)

    client = RawClient(env.addr)
    try:
        await asyncio.to_thread(scenario, client)
    finally:
        client.close()
    [transfer] = await env.wait_done()
    assert transfer.bytes_sent == 2 * 512


async def test_packet_from_wrong_tid_gets_error_5_and_transfer_continues(env: Env) -> None:
    def scenario(client: RawClient, stray: RawClient) -> bytes:
        client.send(rrq("kernel"))
        first = client.recv()
        tid = first.addr
        stray.send(ack(1), tid)
        reply = stray.recv()
        assert (reply.opcode, reply.number, reply.message) == (ERROR, 5, "unknown transfer ID")
        received = first.body
        block = 1
        while True:  # finish the transfer normally; the stray ACK must not have moved it on
            client.send(ack(block), tid)
            packet = client.recv()
            assert packet.number == (block + 1) & 0xFFFF
            block += 1
            received += packet.body
            if len(packet.body) < 512:
                client.send(ack(block), tid)
                return received

    client, stray = RawClient(env.addr), RawClient(env.addr)
    try:
        data = await asyncio.to_thread(scenario, client, stray)
    finally:
        client.close()
        stray.close()
    assert data == env.files["kernel"]
    [transfer] = await env.wait_done()
    assert transfer.error is None


def collect(client: RawClient, silence: float) -> list[Packet]:
    """Every datagram that reaches `client` until none arrives for `silence` seconds."""
    packets = []
    while (packet := client.recv_or_none(silence)) is not None:
        packets.append(packet)
    return packets


@pytest.mark.parametrize(("options", "first"), [({}, (DATA, 1)), ({"blksize": 1400, "tsize": 0}, (OACK, 0))],
                         ids=["data", "oack"])
async def test_finding_12_unanswered_request_gets_one_retransmission_then_silence(
        make_env: ServerFactory, options: dict[str, object], first: tuple[int, int]) -> None:
    """Finding 12 (trust on the boot network): an RRQ with a forged source address sends our answers to
    a victim. A peer never heard from gets its first packet and one retransmission, then nothing: no
    more retries (5 here), no ERROR. With every retry, this request would have brought back 7."""
    env = await make_env(timeout=0.2, retries=5)
    client = RawClient(env.addr)
    try:
        client.send(rrq("kernel", **options))
        # 1 s of silence is five timeouts: longer than any gap between retransmissions.
        packets = await asyncio.to_thread(collect, client, 1.0)
        [transfer] = await env.wait_done()
        assert await asyncio.to_thread(client.recv_or_none, 0.5) is None  # and nothing after the end
    finally:
        client.close()
    assert [(p.opcode, p.number) for p in packets] == [first] * 2
    assert transfer.error == "never answered: dropped after 1 retries"
    assert transfer.bytes_sent == 0 and transfer.payload is not None


@pytest.mark.parametrize(("options", "answer", "resent"), [({}, ack(1), (DATA, 2)),
                                                           ({"tsize": 0}, ack(0), (DATA, 1))],
                         ids=["data", "oack"])
async def test_client_that_stops_acking_gets_every_retry_then_an_error(
        make_env: ServerFactory, options: dict[str, object], answer: bytes, resent: tuple[int, int]) -> None:
    """Once the client has ACKed (its first block, or the OACK), it gets the usual retries and is told
    why the transfer ends."""
    env = await make_env(timeout=0.2, retries=2)
    client = RawClient(env.addr)
    try:
        client.send(rrq("kernel", **options))
        first = await asyncio.to_thread(client.recv)
        client.send(answer, first.addr)
        packets = await asyncio.to_thread(collect, client, 1.0)
    finally:
        client.close()
    # The next block, two retransmissions, then an ERROR telling the client why.
    assert [(p.opcode, p.number) for p in packets] == [resent] * 3 + [(ERROR, 0)]
    [transfer] = await env.wait_done()
    assert transfer.error == "timed out after 2 retries"
    assert transfer.payload is not None


async def test_any_datagram_from_the_peer_tid_counts_as_an_answer(make_env: ServerFactory) -> None:
    """Finding 12: only a peer that received our first packet knows the transfer's port, so anything it
    sends there (here a datagram too short to mean anything) proves its address is not forged."""
    env = await make_env(timeout=0.2, retries=2)
    client = RawClient(env.addr)
    try:
        client.send(rrq("kernel"))
        first = await asyncio.to_thread(client.recv)
        client.send(b"\0", first.addr)
        packets = await asyncio.to_thread(collect, client, 1.0)
    finally:
        client.close()
    assert [(p.opcode, p.number) for p in packets] == [(DATA, 1)] * 2 + [(ERROR, 0)]
    [transfer] = await env.wait_done()
    assert transfer.error == "timed out after 2 retries"


async def test_finding_12_another_port_of_the_peer_host_is_no_answer(make_env: ServerFactory) -> None:
    """Finding 12: a datagram from the peer's host but another port (not its TID) gets ERROR 5 and does
    not count as the peer answering: the transfer is still dropped after one retransmission."""
    env = await make_env(timeout=0.2, retries=5)
    client, stray = RawClient(env.addr), RawClient(env.addr)
    try:
        client.send(rrq("kernel"))
        first = await asyncio.to_thread(client.recv)
        stray.send(ack(1), first.addr)
        unknown = await asyncio.to_thread(stray.recv)
        packets = await asyncio.to_thread(collect, client, 1.0)
    finally:
        client.close()
        stray.close()
    assert (unknown.opcode, unknown.number) == (ERROR, 5)
    assert [(p.opcode, p.number) for p in [first, *packets]] == [(DATA, 1)] * 2
    [transfer] = await env.wait_done()
    assert transfer.error == "never answered: dropped after 1 retries"


async def test_client_error_aborts_quietly(env: Env) -> None:
    client = RawClient(env.addr)
    try:
        client.send(rrq("kernel", tsize=0))
        oack = await asyncio.to_thread(client.recv)
        assert oack.options() == {"tsize": str(len(env.files["kernel"]))}
        client.send(struct.pack("!HH", ERROR, 8) + b"tsize probe only\0", oack.addr)
        [transfer] = await env.wait_done()
        assert transfer.error == "client sent ERROR 8: tsize probe only"
        # Quietly: the server answers the client's ERROR with nothing.
        assert await asyncio.to_thread(client.recv_or_none, 0.3) is None
    finally:
        client.close()


async def test_duplicate_rrq_from_same_port_is_one_transfer(env: Env) -> None:
    client = RawClient(env.addr)
    try:
        client.send(rrq("sub/dir/file.bin"))  # a retransmitted RRQ: the same client TID
        result = await asyncio.to_thread(raw_download, client, "sub/dir/file.bin")
    finally:
        client.close()
    assert result.data == env.files["sub/dir/file.bin"]
    assert result.strays == []  # no second session sending from another port
    await env.wait_done()
    # A second session would still be in the table or reported done by now: the server forgets a session before
    # it reports it, and both RRQs were read before the transfer's first ACK.
    assert env.server.sessions == 0 and len(env.done) == 1


async def test_file_is_read_block_by_block_not_loaded_whole(env: Env) -> None:
    # Truncating the file mid-transfer shows up at the next block: it was never read in one go.
    def scenario(client: RawClient) -> Packet:
        client.send(rrq("kernel"))
        first = client.recv()
        (env.root / "kernel").write_bytes(b"")
        client.send(ack(1), first.addr)
        return client.recv()

    client = RawClient(env.addr)
    try:
        reply = await asyncio.to_thread(scenario, client)
    finally:
        client.close()
    assert (reply.opcode, reply.number) == (ERROR, 0)
    [transfer] = await env.wait_done()
    assert transfer.error is not None and "shrank" in transfer.error


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


async def test_wrq_is_refused_and_nothing_written(env: Env) -> None:
    for name in ["new.bin", "kernel"]:
        reply = await exchange(env, rrq(name, opcode=WRQ))
        assert reply is not None and (reply.opcode, reply.number) == (ERROR, 2)
        assert reply.message == "read-only server"
    assert not (env.root / "new.bin").exists()
    assert (env.root / "kernel").read_bytes() == env.files["kernel"]
    transfers = await env.wait_done(2)
    assert all(t.payload is None and t.error and "read-only" in t.error for t in transfers)


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "a\\b", "escape", "sub/../../outside.txt"])
async def test_traversal_is_refused(env: Env, name: str) -> None:
    reply = await exchange(env, rrq(name))
    assert reply is not None and (reply.opcode, reply.number) == (ERROR, 2)
    assert b"secret" not in reply.body
    [transfer] = await env.wait_done()
    assert transfer.payload is None and transfer.error is not None and transfer.error.startswith("forbidden")


async def test_missing_file_is_error_1(env: Env) -> None:
    reply = await exchange(env, rrq("no/such/file"))
    assert reply is not None and (reply.opcode, reply.number) == (ERROR, 1)
    [transfer] = await env.wait_done()
    assert transfer.payload is None and transfer.error is not None and transfer.error.startswith("not found")


async def test_netascii_is_refused(env: Env) -> None:
    reply = await exchange(env, rrq("kernel", mode=b"netascii"))
    assert reply is not None and (reply.opcode, reply.number) == (ERROR, 4)
    [transfer] = await env.wait_done()
    assert transfer.error == "unsupported mode 'netascii'"


@pytest.mark.parametrize(("name", "code", "message", "error"), [
    ("bad-mac", 4, "bad request", "bad request: cannot parse 'bad-mac'"),
    ("boom", 0, "internal error", "internal error: RuntimeError('resolver bug')"),
])
async def test_resolve_exceptions_become_errors(env: Env, name: str, code: int, message: str, error: str) -> None:
    reply = await exchange(env, rrq(name))
    assert reply is not None and (reply.opcode, reply.number, reply.message) == (ERROR, code, message)
    [transfer] = await env.wait_done()
    assert (transfer.payload, transfer.error) == (None, error)
    assert (await download_raw(env, "sub/dir/file.bin")).data == env.files["sub/dir/file.bin"]


MALFORMED = {
    "empty": b"",
    "one byte": b"\x00",
    "two bytes": b"\x00\x01",
    "three bytes": b"\x00\x01a",
    "no NUL after name": b"\x00\x01kernel",
    "no NUL after mode": b"\x00\x01kernel\x00oct",
    "unknown opcode": b"\x00\x09kernel\x00octet\x00",
    "opcode 0": b"\x00\x00kernel\x00octet\x00",
    "non-ASCII name": b"\x00\x01\xff\xfekernel\x00octet\x00",
    "non-ASCII option": b"\x00\x01kernel\x00octet\x00bl\xe9ksize\x00512\x00",
    "option without NUL": b"\x00\x01kernel\x00octet\x00blksize\x00512",
    "option without value": b"\x00\x01kernel\x00octet\x00blksize\x00",
    "empty option name": b"\x00\x01kernel\x00octet\x00\x00512\x00",
    "over 512 bytes": rrq("k" * 600),
    "ACK to listen port": ack(1),
    "DATA to listen port": struct.pack("!HH", DATA, 1) + b"hello",
    "OACK to listen port": b"\x00\x06blksize\x00512\x00",
    "ERROR to listen port": struct.pack("!HH", ERROR, 0) + b"hi\0",
}


@pytest.mark.parametrize("datagram", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_datagram_is_dropped_and_server_survives(
        env: Env, datagram: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bootserver.tftp")
    reply = await exchange(env, datagram, timeout=0.3)
    assert reply is None or (reply.opcode, reply.number) == (ERROR, 4)
    if datagram[:2] == b"\0\5":
        assert reply is None  # an ERROR is never answered with an ERROR
    assert (await download_raw(env, "sub/dir/file.bin")).data == env.files["sub/dir/file.bin"]
    assert [t.filename for t in await env.wait_done()] == ["sub/dir/file.bin"]  # no report for garbage
    assert not any(record.exc_info for record in caplog.records)
    assert "malformed" in caplog.text or "ignored" in caplog.text


# --------------------------------------------------------------------------------------------
# Resource limits and lifecycle
# --------------------------------------------------------------------------------------------


async def test_session_caps_total_and_per_client(make_env: ServerFactory) -> None:
    env = await make_env(timeout=5.0, max_sessions=2, max_sessions_per_client=1)
    clients = {name: RawClient(env.addr, host) for name, host in
               [("a1", "127.0.0.1"), ("a2", "127.0.0.1"), ("b", "127.0.0.2"), ("c", "127.0.0.3")]}

    async def ask(name: str) -> Packet:
        clients[name].send(rrq("kernel"))
        return await asyncio.to_thread(clients[name].recv)

    try:
        first = await ask("a1")
        assert (first.opcode, first.number) == (DATA, 1)  # held open: never ACKed
        per_client = await ask("a2")
        assert (per_client.opcode, per_client.number, per_client.body) == (ERROR, 0, b"too many sessions\0")
        assert (await ask("b")).opcode == DATA
        total = await ask("c")
        assert (total.opcode, total.number, total.body) == (ERROR, 0, b"too many sessions\0")
        # Once a1's transfer ends, its host may start another.
        clients["a1"].send(struct.pack("!HH", ERROR, 0) + b"bye\0", first.addr)
        await env.wait_done(3)
        assert (await ask("a2")).opcode == DATA
    finally:
        for client in clients.values():
            client.close()
    refused = [t for t in env.done if t.error == "too many sessions"]
    assert len(refused) == 2 and all(t.payload is None for t in refused)


async def test_finding_12_table_filled_by_few_sources_still_admits_a_new_source(make_env: ServerFactory) -> None:
    """Finding 12 (trust on the boot network): sources that already hold transfers cannot fill the
    table; the last `new_source_reserve` places go only to a source's first transfer, up to the hard cap.
    With a plain total cap, four sources at their per-source cap would fill this table of 8."""
    env = await make_env(timeout=5.0, max_sessions=8, max_sessions_per_client=2, new_source_reserve=2)
    sources = [f"127.0.0.{i}" for i in range(2, 8)]  # 127.0.0.2-5 flood, .6 and .7 arrive late
    clients: list[RawClient] = []

    async def ask(host: str) -> Packet:
        client = RawClient(env.addr, host)
        clients.append(client)
        client.send(rrq("kernel"))
        return await asyncio.to_thread(client.recv)

    too_many = (ERROR, 0, b"too many sessions\0")
    try:
        # The per-source cap: a third transfer from one address is refused while the table is nearly empty.
        assert [(await ask(sources[0])).opcode for _ in range(3)] == [DATA, DATA, ERROR]
        assert env.server.sessions == 2
        # Three more sources ask for two each, as many as a total cap alone would let fill the table.
        answers = [(await ask(host)) for host in sources[1:4] for _ in range(2)]
        # A new source still gets a transfer.
        late = await ask(sources[4])
        assert (late.opcode, late.number) == (DATA, 1)
        assert env.server.sessions == 8  # the hard cap
        # Because once 8 - 2 = 6 places were held, a source holding one transfer could not take another,
        # though under its per-source cap: the reserve was left for the new source.
        assert [p.opcode for p in answers] == [DATA] * 5 + [ERROR]
        assert (answers[-1].opcode, answers[-1].number, answers[-1].body) == too_many
        # Past the hard cap nobody is admitted, not even a new source.
        full = await ask(sources[5])
        assert (full.opcode, full.number, full.body) == too_many
    finally:
        for client in clients:
            client.close()
    refused = [t for t in env.done if t.error == "too many sessions"]
    assert len(refused) == 3 and all(t.payload is None for t in refused)


def test_new_source_reserve_must_leave_room() -> None:
    resolve = make_resolve(Path("/nonexistent"))
    assert TftpServer(resolve, print, max_sessions=1)._new_source_reserve == 0
    assert TftpServer(resolve, print)._new_source_reserve == 250  # a quarter of 1,000 by default
    for reserve in (-1, 10):
        with pytest.raises(ValueError, match="new_source_reserve"):
            TftpServer(resolve, print, max_sessions=10, new_source_reserve=reserve)


async def test_close_ends_transfers_and_frees_sockets(make_env: ServerFactory) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    env = await make_env(timeout=5.0)
    client = RawClient(env.addr)
    try:
        client.send(rrq("kernel"))
        assert (await asyncio.to_thread(client.recv)).opcode == DATA
        await env.server.close()
        [transfer] = await env.wait_done()
        assert transfer.error == "server closed"
        assert asyncio.all_tasks() == {asyncio.current_task()}
    finally:
        client.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # listening socket, transfer socket, file


async def test_on_done_that_raises_does_not_break_the_server(
        make_env: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Transfer] = []
    escaped: list[dict[str, Any]] = []  # exceptions that reached the event loop

    def on_done(transfer: Transfer) -> None:
        calls.append(transfer)
        raise RuntimeError("broken event log")

    asyncio.get_running_loop().set_exception_handler(lambda loop, context: escaped.append(context))
    env = await make_env(on_done=on_done)
    for _ in range(2):
        assert (await download_raw(env, "memory.cfg")).data == MEMORY
    reply = await exchange(env, rrq("nope"))
    assert reply is not None and (reply.opcode, reply.number) == (ERROR, 1)
    await until_async(lambda: len(calls) == 3, what=lambda: f"three on_done calls ({len(calls)} so far)")
    # in any order: the C loop reports a transfer once it has seen the last ACK, maybe after the refusal
    assert sorted((t.filename, t.error is None) for t in calls) == [("memory.cfg", True)] * 2 + [("nope", False)]
    assert escaped == []
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 3 and all("on_done raised" in m for m in tracebacks)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_ipv6_download(make_env: ServerFactory) -> None:
    assert has_ipv6_loopback(), "no IPv6 loopback (::1): this test needs one, CI's machine has it"
    env = await make_env(host="::1")
    result = await download_raw(env, "kernel", blksize=1400, tsize=0)
    assert result.oack == {"blksize": "1400", "tsize": str(len(env.files["kernel"]))}
    assert result.data == env.files["kernel"]


def test_clients_are_installed() -> None:
    # The curl and atftp tests above would fail with a less clear message without them.
    assert shutil.which("curl") and shutil.which("atftp")


# --------------------------------------------------------------------------------------------
# Which loop runs the transfers
# --------------------------------------------------------------------------------------------


def test_the_c_loop_is_refused_when_missing_or_built_from_another_source(tmp_path: Path) -> None:
    assert native.available() is None  # CI builds it (./setup installs gcc): the [native] tests above ran it
    assert "was not built" in native.available(tmp_path / "_engine.so")
    copy = tmp_path / "_engine.so"
    shutil.copy(native.LIBRARY, copy)
    assert native.available(copy) is None  # no engine.c beside it (a wheel without sources): taken as built
    (tmp_path / "engine.c").write_text(native.LIBRARY.with_name("engine.c").read_text() + "/* edited */\n")
    assert "built from another engine.c" in native.available(copy)


async def test_without_the_c_loop_auto_runs_python_and_native_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "_engine.so")
    root, _, files = make_tree(tmp_path)
    with pytest.raises(RuntimeError, match="native TFTP engine is not available: .* was not built"):
        TftpServer(make_resolve(root), print, engine="native")
    server = TftpServer(make_resolve(root), print)
    assert server.engine == "python"
    assert "transfers run in Python" in caplog.text and "was not built" in caplog.text
    with pytest.raises(ValueError, match="engine 'c' is not one of auto, native, python"):
        TftpServer(make_resolve(root), print, engine="c")
