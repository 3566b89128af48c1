"""A real SSH server on 127.0.0.1 for tests: commands run for real with `sh -c`, SFTP on the real filesystem.

It stands in for the agent image's sshd: a generated host key, exactly one authorized client key (the
boot server's), every exec request recorded before it runs. It can also misbehave the ways nodes do:
go silent mid-command (a hung kernel, a pulled cable) or drop the connection (a reboot).

Commands are executed as whoever runs the tests (root here), so tests point every path at temporary
directories. As a guard, a command that mentions `reboot` is recorded but never executed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncssh

# Commands the server records but refuses to execute, whatever a test asks: this runs as root.
NEVER_RUN = ("reboot", "poweroff", "halt", "shutdown")


@dataclass
class TestSSHServer:
    port: int
    host_key: asyncssh.SSHKey
    commands: list[str] = field(default_factory=list)  # every exec request, in arrival order
    # every SSH connection: [opened, closed] (time.monotonic(); closed is None while it is open)
    connections: list[list[float | None]] = field(default_factory=list)
    hang_on: str | None = None  # a command containing this makes the server stop answering entirely
    drop_on: str | None = None  # a command containing this closes the connection, as a reboot would
    _frozen: list[asyncssh.SSHServerConnection] = field(default_factory=list)

    __test__ = False  # not a pytest test class, despite the name

    @property
    def host_key_line(self) -> str:
        """The server's public host key as an OpenSSH line, what a node reports at phone-home."""
        return self.host_key.export_public_key().decode().strip()

    async def handle(self, process: asyncssh.SSHServerProcess) -> None:
        command = process.command or ""
        self.commands.append(command)
        conn = process.get_extra_info("connection")
        if self.hang_on and self.hang_on in command:
            self._freeze(conn)
            await asyncio.Event().wait()  # never answers; cancelled when the server closes
        if (self.drop_on and self.drop_on in command) or any(word in command for word in NEVER_RUN):
            conn.abort()
            return
        process.exit(await _run(command, process))

    def _freeze(self, conn: asyncssh.SSHServerConnection) -> None:
        """Stop reading from the socket: keepalives go unanswered, exactly like a dead machine."""
        conn._transport.pause_reading()  # private, but this is what "stops responding" means
        self._frozen.append(conn)


class Connections(asyncssh.SSHServer):
    """asyncssh's default server, noting when each connection opens and closes."""

    def __init__(self, server: TestSSHServer) -> None:
        self.span: list[float | None] = [time.monotonic(), None]
        server.connections.append(self.span)

    def connection_lost(self, exc: Exception | None) -> None:
        self.span[1] = time.monotonic()


async def _run(command: str, process: asyncssh.SSHServerProcess) -> int:
    """Run `sh -c command` with the channel's stdin/stdout/stderr piped through; its exit status."""
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", command,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # as sshd does (setsid), so a signal reaches the command's children too
    )
    feeding = asyncio.create_task(_feed(process.stdin, proc))
    try:
        await asyncio.gather(_pump(proc.stdout, process.stdout), _pump(proc.stderr, process.stderr), proc.wait())
    finally:
        feeding.cancel()
        if proc.returncode is None:  # the server is shutting down: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    status = proc.returncode
    return status if status >= 0 else 128 - status  # killed by a signal: what a shell reports


async def _feed(source: asyncssh.SSHReader, proc: asyncio.subprocess.Process) -> None:
    """Client's stdin to the command, then, until it exits, any signal request (what a client sends
    on a timeout) to the command. asyncssh queues a signal behind EOF, so after EOF this polls."""
    sink = proc.stdin
    assert sink is not None
    eof = False
    while proc.returncode is None:
        try:
            data = await source.read(65536)
        except asyncssh.SignalReceived as exc:
            # sshd delivers a "signal" request with killpg() to the session's process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, getattr(signal, f"SIG{exc.signal}", signal.SIGTERM))
            continue
        if data and not eof:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sink.write(data)
                await sink.drain()
        elif not data and not eof:
            eof = True
            sink.close()
        else:
            await asyncio.sleep(0.05)


async def _pump(source: asyncio.StreamReader, sink: asyncssh.SSHWriter) -> None:
    while data := await source.read(65536):
        sink.write(data)


@contextlib.asynccontextmanager
async def ssh_server(authorized_key: str, *, hang_on: str | None = None, drop_on: str | None = None,
                     host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[TestSSHServer]:
    """An SSH server on host:port (default 127.0.0.1:<free port>) accepting only `authorized_key` (an OpenSSH
    public key line)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    server = TestSSHServer(port=0, host_key=host_key, hang_on=hang_on, drop_on=drop_on)
    acceptor = await asyncssh.listen(
        host, port,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(authorized_key + "\n"),
        process_factory=server.handle,
        server_factory=lambda: Connections(server),  # looked up here: sshd_pool adds to it
        sftp_factory=True,  # asyncssh's SFTPServer on the real filesystem, no chroot
        encoding=None,  # bytes through, as sshd does
        password_auth=False, kbdint_auth=False, gss_host=None,
    )
    server.port = acceptor.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        for conn in server._frozen:
            conn.abort()
        acceptor.close()
        await acceptor.wait_closed()
