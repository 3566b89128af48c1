"""One TFTP transfer: a payload sent to one peer from its own socket.

Every admitted transfer gets a `Session` on its own ephemeral socket (a new TID, as RFC 1350 asks),
read and written straight from the event loop.

The transfer socket is deliberately *not* connected to the peer. A connected UDP socket never sees
datagrams from other (host, port) pairs (the kernel drops them), so RFC 1350's "ERROR 5 unknown
transfer ID" could never be sent. The path MTU, which needs a connected socket, is read from a
short-lived probe socket connected to the peer instead (`wire.path_mtu`). The cost: ICMP errors are
not reported on an unconnected socket, so a vanished client is noticed by the retransmission timer,
not at once.

A transfer whose peer has never been heard from gets one retransmission of its first packet (OACK
or DATA 1), then is dropped without an ERROR. A forged RRQ sends its answers to the forged address:
every answer to a peer that never replied is traffic reflected at a victim, so a 22-byte request
buys at most two datagrams of at most 516 bytes (OACKs are smaller), instead of `retries + 1` of
them and an ERROR. A peer is heard from once any datagram from its (host, port) reaches the
transfer's socket: only a host that received our first packet knows that socket's port. From then
on the usual `retries` apply, and a transfer that times out tells the client why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..payload import Payload
from .wire import (
    ACK,
    DATA,
    DATA_HEADER,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    ERROR,
    Address,
    Negotiated,
    SockAddr,
    error_packet,
    oack_packet,
)

if TYPE_CHECKING:
    from .server import TftpServer

log = logging.getLogger(__package__)  # one logger for the package: "bootserver.tftp"

# Blocks sent per event-loop turn, so that one big window does not stall every other transfer.
SEND_BURST = 64
# Bytes read per datagram on a transfer socket: an ACK is 4, an ERROR at most a few hundred; longer
# datagrams are cut, which costs nothing since nothing past the opcode and number matters there.
RECV_SIZE = 1024
# Retransmissions of the first packet to a peer never heard from (see the module docstring).
UNANSWERED_RETRIES = 1


@dataclass(frozen=True)
class Transfer:
    """Handed to on_done when a transfer ends, successfully or not."""

    peer: Address
    filename: str
    payload: Payload | None  # None when the request was refused
    bytes_sent: int  # payload bytes acknowledged by the client
    seconds: float
    blksize: int
    windowsize: int
    error: str | None  # None on success, else a human message


@dataclass(frozen=True)
class Admitted:
    """One transfer as admission hands it to a loop: `Session` here, or the C loop's `NativeSession` (native.py).
    What a transfer is told and what it reports at the end are the same whichever loop runs it: they are here."""

    sock: socket.socket  # its own, on an ephemeral port: the transfer's TID
    sockaddr: SockAddr
    filename: str
    payload: Payload
    blocks: Blocks
    negotiated: Negotiated
    started: float  # time.monotonic() when the request arrived
    timeout: float  # seconds before a retransmission: the client's option, else the server's

    @property
    def peer(self) -> Address:
        return (self.sockaddr[0], self.sockaddr[1])

    def ended(self, acked: int, error: str | None) -> Transfer:
        """What on_done is told once the transfer ended with block `acked` acknowledged (0: the OACK, -1: none)."""
        bytes_sent = min(max(acked, 0) * self.negotiated.blksize, self.blocks.size)
        if error is None:
            log.debug("tftp %s:%d: sent %r, %d bytes", *self.peer, self.filename, bytes_sent)
        return Transfer(self.peer, self.filename, self.payload, bytes_sent, time.monotonic() - self.started,
                        self.negotiated.blksize, self.negotiated.windowsize, error)

    def client_aborted(self, code: int, message: str) -> str:
        # Quietly: PXE ROMs routinely abort after reading tsize from the OACK.
        log.debug("tftp %s:%d: client aborted %r: ERROR %d %r", *self.peer, self.filename, code, message)
        return f"client sent ERROR {code}: {message}"

    def never_answered(self, retries: int) -> str:
        log.info("tftp %s:%d: %r never answered, dropped after %d retries", *self.peer, self.filename, retries)
        return f"never answered: dropped after {retries} retries"

    def timed_out(self, retries: int) -> str:
        log.info("tftp %s:%d: %r timed out after %d retries", *self.peer, self.filename, retries)
        return f"timed out after {retries} retries"

    def unreadable(self, why: object) -> str:
        return f"cannot read {self.filename!r}: {why}"


class Blocks:
    """Random access to a payload: pread on an open file (kernels are tens of MB), or slices of bytes."""

    def __init__(self, payload: Payload) -> None:
        self._data = payload.data
        self._view: memoryview | None = None
        self._fd: int | None = None
        if payload.data is not None:
            self._view = memoryview(payload.data)
            self.size = len(payload.data)
        else:
            assert payload.path is not None
            self._fd = os.open(payload.path, os.O_RDONLY)
            # The size at open time, so tsize and the block count agree for the whole transfer.
            self.size = os.fstat(self._fd).st_size

    def read_into(self, target: memoryview, offset: int) -> None:
        """Fill `target` with the bytes at `offset`."""
        if self._view is not None:
            target[:] = self._view[offset : offset + len(target)]
            return
        assert self._fd is not None
        # Blocking, but a block from the page cache costs microseconds; not worth a thread hop.
        if os.preadv(self._fd, [target], offset) != len(target):
            raise OSError(f"file shrank during the transfer (short read at offset {offset})")

    def hand_over(self) -> tuple[bytes | None, int | None]:
        """(the bytes, None) or (None, the open file) for another owner, which closes the file; size stays."""
        if self._data is not None:
            return self._data, None  # as they are: the new owner copies them once
        fd, self._fd = self._fd, None
        return None, fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Session:
    """Sends one payload to one peer from its own socket.

    Blocks are numbered from 1 without limit here; only the wire number wraps at 65536. `_acked`
    is the highest block the client acknowledged (0 for the OACK, -1 before that); `_sent` is the
    highest block handed to the socket. Only an ACK that moves `_acked` forward sends anything:
    duplicates are ignored (Sorcerer's Apprentice) and retransmission is the deadline's job alone.

    The socket is read and written directly from an event-loop reader, not through an asyncio
    transport: the transport receives every datagram into a fresh 256 KiB buffer, which costs more
    than all the rest of handling an ACK and sending the next DATA. A lock-step transfer is one ACK
    in and one DATA out per block, so this is the hot path.
    """

    def __init__(self, server: TftpServer, admitted: Admitted) -> None:
        self._server = server
        self._admitted = admitted
        self._loop = asyncio.get_running_loop()
        # the hot path's, as attributes of their own
        self._sock, self.sockaddr, self.peer = admitted.sock, admitted.sockaddr, admitted.peer
        self._blocks, self._opts = admitted.blocks, admitted.negotiated
        self._last_block = self._blocks.size // self._opts.blksize + 1  # the last block is short, maybe empty
        self._acked = -1 if self._opts.oack else 0
        self._sent = 0
        self._next = 1  # next block of the current window to send
        self._window_end = 0
        self._attempts = 0  # timeouts since the last progress
        self._heard = False  # a datagram came from the peer's TID: it is not a forged source
        self.deadline: float | None = None  # loop time at which to retransmit; the server's sweep checks it
        self._blocked = False  # the socket's send buffer is full: wait until it is writable
        self._pump_pending = False
        self._done = False

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        if self._opts.oack:
            self._send_oack()
        else:
            self._start_window(1)

    # the socket

    def _on_readable(self) -> None:
        # One datagram per call: in lock-step there is only ever one waiting, and draining until
        # EAGAIN would cost a second system call per ACK. The selector calls again if more wait.
        try:
            data, addr = self._sock.recvfrom(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. an ICMP error queued on the socket
            log.debug("tftp %s:%d: socket error: %s", *self.peer, exc)
            return
        try:
            self._on_datagram(data, addr)
        except Exception as exc:  # a bug of ours: end this transfer, keep the server
            log.exception("tftp %s:%d: internal error", *self.peer)
            self._fail(ERR_UNDEFINED, "internal error", f"internal error: {exc!r}")

    def _send(self, packet: bytes | memoryview, sockaddr: SockAddr) -> bool:
        """Send one datagram; False when the send buffer is full (the caller decides what to retry)."""
        try:
            self._sock.sendto(packet, sockaddr)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # unreachable, message too long, ...: the retransmission deadline decides
            log.debug("tftp %s:%d: send failed: %s", *self.peer, exc)
            return True

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        self._blocked = False
        self._pump()

    # the transfer

    def _on_datagram(self, data: bytes, addr: SockAddr) -> None:
        if (addr[0], addr[1]) != self.peer:
            self._stray(data, addr)
            return
        self._heard = True
        if len(data) < 4:
            log.debug("tftp %s:%d: ignored %d-byte datagram", *self.peer, len(data))
        else:
            opcode, number = DATA_HEADER.unpack_from(data)
            if opcode == ACK:
                self._on_ack(number)
            elif opcode == ERROR:
                message = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
                self.finish(self._admitted.client_aborted(number, message))
            else:
                log.debug("tftp %s:%d: ignored opcode %d during transfer", *self.peer, opcode)

    def _stray(self, data: bytes, addr: SockAddr) -> None:
        """RFC 1350: a packet from another TID gets ERROR 5, and the transfer goes on."""
        log.debug("tftp %s:%d: datagram from unknown TID %s:%d", *self.peer, addr[0], addr[1])
        if data[:2] != b"\0\5":  # never answer an ERROR with an ERROR
            self._send(error_packet(ERR_UNKNOWN_TID, "unknown transfer ID"), addr)

    def _send_oack(self) -> None:
        self._send(oack_packet(self._opts.oack), self.sockaddr)  # if the buffer is full, the deadline resends
        self._arm_timer()

    def _start_window(self, first: int) -> None:
        self._next = first
        self._window_end = min(first - 1 + self._opts.windowsize, self._last_block)
        self._pump()

    def _pump(self) -> None:
        """Send the rest of the current window, SEND_BURST blocks per event-loop turn."""
        self._pump_pending = False
        if self._done or self._blocked:
            return
        try:
            for _ in range(SEND_BURST):
                if self._next > self._window_end:
                    break
                if not self._send_block(self._next):
                    self._blocked = True
                    self._loop.add_writer(self._sock.fileno(), self._on_writable)
                    return
                self._next += 1
        except OSError as exc:
            self._fail(ERR_UNDEFINED, "read error", self._admitted.unreadable(exc))
            return
        if self._next <= self._window_end:
            if not self._pump_pending:
                self._pump_pending = True
                self._loop.call_soon(self._pump)
        else:
            self._arm_timer()  # the window is out; now wait for its ACK

    def _send_block(self, block: int) -> bool:
        blksize = self._opts.blksize
        offset = (block - 1) * blksize
        length = min(blksize, self._blocks.size - offset)
        # One buffer for the whole server, filled in place: sendto copies it before returning, and
        # everything runs on one thread, so no block is ever built twice or allocated per packet.
        packet = self._server.scratch[: 4 + length]
        DATA_HEADER.pack_into(packet, 0, DATA, block & 0xFFFF)
        self._blocks.read_into(packet[4:], offset)
        if not self._send(packet, self.sockaddr):
            return False
        self._sent = max(self._sent, block)
        return True

    def _on_ack(self, wire: int) -> None:
        if self._done:
            return
        # The one block in (_sent - 65536, _sent] whose number is `wire`; windows are < 65536 blocks.
        block = self._sent - ((self._sent - wire) & 0xFFFF)
        if block <= self._acked:
            return  # duplicate or stale: resending here is the Sorcerer's Apprentice bug
        self._acked = block
        self._attempts = 0
        self.deadline = None
        if block >= self._last_block:
            self.finish(None)
        else:
            # RFC 7440: an ACK inside the window restarts the window right after that block.
            self._start_window(block + 1)

    def _arm_timer(self) -> None:
        # A deadline, not a timer per ACK: call_later and cancel for every block cost more than the
        # server's periodic sweep of all sessions (see TftpServer._sweep).
        self.deadline = self._loop.time() + self._admitted.timeout
        self._server._wake_sweep()

    def on_deadline(self) -> None:
        self.deadline = None
        self._attempts += 1
        retries = self._server.retries if self._heard else min(self._server.retries, UNANSWERED_RETRIES)
        if self._attempts > retries and not self._heard:
            # Maybe a forged source: an ERROR would be one more datagram at someone who never asked.
            self.finish(self._admitted.never_answered(retries))
        elif self._attempts > retries:
            self._fail(ERR_UNDEFINED, "timed out", self._admitted.timed_out(retries))
        elif self._acked < 0:
            self._send_oack()
        else:
            self._start_window(self._acked + 1)

    def _fail(self, code: int, wire_message: str, error: str) -> None:
        """End the transfer with an error, telling the client too."""
        if not self._done:
            self._send(error_packet(code, wire_message), self.sockaddr)
        self.finish(error)

    def finish(self, error: str | None) -> None:
        """Free everything and report; safe to call more than once."""
        if self._done:
            return
        self._done = True
        self.deadline = None
        self._loop.remove_reader(self._sock.fileno())
        if self._blocked:
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._blocks.close()
        self._server._forget(self)
        self._server._report(self._admitted.ended(self._acked, error))
