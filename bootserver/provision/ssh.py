"""An SSH session with a node running the agent image: log in, run commands, report each one.

The node phoned home with its SSH host key; we log in as root with the server's provisioning key and
trust exactly that pinned host key, nothing else. Every command runs with a timeout and must exit 0,
and keepalives notice a node that dies mid-step. Each command is reported as an event through
`record`; failures leave as exceptions:

    StepFailed   the node answered, but a command failed
    NodeLost     the node could not be reached, or stopped answering
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from ..errors import BootserverError
from .pki import ServerKeys

TAIL = 2048  # bytes of stdout/stderr kept in events
MESSAGE_TAIL = 500  # of stderr quoted in an exception message: enough to act on, short enough to read

Record = Callable[[str, dict[str, Any]], None]  # (event kind, detail): the caller stores events and moves states
Progress = Callable[[int, int, float], None]  # (bytes read, bytes in all, seconds so far)
STREAM_CHUNK = 256 * 1024


class Source(Protocol):
    """What `Runner.stream` sends: chunks of bytes, and how far through its input it has got."""

    total: int  # bytes of input in all, for progress
    done: int  # bytes of input read so far

    def chunks(self) -> AsyncIterator[bytes]: ...


class FileSource:
    """A file on the server, read a chunk at a time; its SHA-256 is that of the bytes sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.total = path.stat().st_size
        self.done = 0
        self.sha256 = hashlib.sha256()

    async def chunks(self) -> AsyncIterator[bytes]:
        with self.path.open("rb") as file:
            while chunk := file.read(STREAM_CHUNK):
                self.sha256.update(chunk)
                self.done += len(chunk)
                yield chunk


@dataclass(frozen=True)
class NodeAccess:
    host: str
    port: int
    host_key: str  # the node's OpenSSH public key line, pinned when it phoned home


class StepFailed(BootserverError):
    """A step could not be completed although the node answered; the message says what and why."""

    def __init__(self, step: str, message: str, *, command: str | None = None,
                 exit_status: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.command = command
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class HostKeyMismatch(StepFailed):
    """The node presented a host key other than the one it phoned home with: maybe another machine."""


class NodeLost(BootserverError):
    """The node could not be reached, or stopped answering mid-step (crashed, powered off, unplugged)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


class _Client(asyncssh.SSHClient):
    """Remembers why the connection went away: asyncssh reports a lost connection to a running
    command as a process with no exit status rather than as an exception."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: Exception | None = None
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc


class Runner:
    """One SSH connection to a node: runs commands with a timeout, insists on exit 0, records each."""

    def __init__(self, conn: asyncssh.SSHClientConnection, client: _Client, sftp: asyncssh.SFTPClient,
                 record: Record, timeout: float) -> None:
        self.conn = conn
        self.sftp = sftp
        self._client = client
        self._record = record
        self._timeout = timeout

    @property
    def lost(self) -> str | None:
        """Why the connection is gone, or None while it is up."""
        if not self._client.closed:
            return None
        return str(self._client.lost or "the node closed the connection")

    async def run(self, step: str, command: str, *, input: str | bytes | None = None,
                  timeout: float | None = None) -> str:
        """Run `command` with `sh -c` semantics on the node; its stdout. Non-zero exit raises StepFailed."""
        timeout = self._timeout if timeout is None else timeout
        started = time.monotonic()
        data = input.encode() if isinstance(input, str) else input
        # No input: stdin at EOF, so a command that reads it (cat, sfdisk) cannot wait forever.
        stdin = asyncssh.PIPE if data is not None else asyncssh.DEVNULL
        try:
            process = await self.conn.create_process(command, input=data, stdin=stdin, encoding=None)
        except (OSError, asyncssh.Error) as exc:  # the connection is gone (see _step), or sshd refused a session
            self._record_command(step, command, None, started, "", str(exc))
            raise
        result, timed_out = await _waited(process, timeout)
        return self._finish(step, command, result, started, timeout if timed_out else None)

    async def stream(self, step: str, command: str, source: Source, progress: Progress, *,
                     timeout: float | None = None) -> str:
        """Run `command` with `source` on its stdin, sent a chunk at a time (never whole, so a multi-GB
        image costs no memory); `progress(done, total, seconds)` at most once a second."""
        timeout = self._timeout if timeout is None else timeout
        started = last = time.monotonic()
        try:
            process = await self.conn.create_process(command, stdin=asyncssh.PIPE, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            self._record_command(step, command, None, started, "", str(exc))
            raise
        try:
            async with contextlib.aclosing(source.chunks()) as chunks:
                async for chunk in chunks:
                    process.stdin.write(chunk)
                    await process.stdin.drain()
                    if (now := time.monotonic()) - last >= 1:
                        progress(source.done, source.total, now - started)
                        last = now
            process.stdin.write_eof()
        except (OSError, asyncssh.Error):
            pass  # the command stopped reading (it failed, or the node went): its exit status says which
        except BaseException:
            process.close()
            raise
        progress(source.done, source.total, time.monotonic() - started)
        result, timed_out = await _waited(process, timeout)
        return self._finish(step, command, result, started, timeout if timed_out else None)

    def _finish(self, step: str, command: str, result: Any, started: float, timed_out: float | None) -> str:
        """Record the command's outcome; its stdout, or the exception that its outcome deserves."""
        stdout, stderr = _text(result.stdout), _text(result.stderr)
        status = result.exit_status
        self._record_command(step, command, status, started, stdout, stderr)
        if timed_out is not None:
            raise StepFailed(step, f"{step}: `{command}` did not finish within {timed_out:g} s"
                                   f"{_quoted(stderr)}", command=command, stderr_tail=stderr[-TAIL:])
        if status is None and result.exit_signal is None:
            if self.lost:
                raise NodeLost(step, f"connection lost: {self.lost}")
            raise StepFailed(step, f"{step}: `{command}` ended without reporting an exit status{_quoted(stderr)}",
                             command=command, stderr_tail=stderr[-TAIL:])
        if status != 0:
            reason = (f"exited with status {status}" if status is not None
                      else f"was killed by signal {result.exit_signal[0]}")
            raise StepFailed(step, f"{step}: `{command}` {reason}{_quoted(stderr)}",
                             command=command, exit_status=status, stderr_tail=stderr[-TAIL:])
        return stdout

    def _record_command(self, step: str, command: str, status: int | None, started: float,
                        stdout: str, stderr: str) -> None:
        self._record("command", {
            "step": step, "command": command, "exit_status": status,
            "seconds": round(time.monotonic() - started, 3),
            "stdout_tail": stdout[-TAIL:], "stderr_tail": stderr[-TAIL:],
        })


async def _waited(process: asyncssh.SSHClientProcess, timeout: float | None) -> tuple[Any, bool]:
    """The process's result, or the TimeoutError that holds its output so far (True: it timed out, and was
    killed: closing the channel alone leaves the command running on the node, as sshd does not kill it)."""
    try:
        return await process.wait(timeout=timeout), False
    except asyncssh.TimeoutError as exc:
        with contextlib.suppress(OSError, asyncssh.Error):
            process.send_signal("KILL")
        return exc, True
    finally:
        process.close()


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _quoted(stderr: str) -> str:
    tail = stderr.strip()[-MESSAGE_TAIL:]
    return f": {tail}" if tail else " (nothing on stderr)"


@asynccontextmanager
async def session(access: NodeAccess, keys: ServerKeys, record: Record, *, command_timeout: float = 600,
                  connect_timeout: float = 30, keepalive_interval: float = 10,
                  keepalive_count_max: int = 3) -> AsyncIterator[Runner]:
    """A Runner logged in to the node at `access` as root, trusting only its pinned host key.

    Raises HostKeyMismatch (before any command runs), StepFailed (our key refused, no SFTP) or NodeLost."""
    conn, client = await _connect(access, keys, record, connect_timeout=connect_timeout,
                                  keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max)
    async with conn:
        sftp = await _open_sftp(conn, client, access, record)
        yield Runner(conn, client, sftp, record, command_timeout)


async def _connect(access: NodeAccess, keys: ServerKeys, record: Record, *, connect_timeout: float,
                   keepalive_interval: float, keepalive_count_max: int) -> tuple[asyncssh.SSHClientConnection,
                                                                                 _Client]:
    where = f"{access.host}:{access.port}"
    known_hosts = asyncssh.import_known_hosts(_known_hosts_line(access) + "\n")
    client = _Client()
    try:
        conn, _ = await asyncssh.create_connection(
            lambda: client, access.host, access.port,
            username="root",
            client_keys=[keys.ssh_key],
            known_hosts=known_hosts,  # the pinned key and nothing else; never None
            agent_path=None, config=None,  # nothing from the operator's ~/.ssh: not their agent, not their keys
            password_auth=False, kbdint_auth=False, gss_host=None,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max,
        )
    except (asyncssh.HostKeyNotVerifiable, asyncssh.KeyExchangeFailed) as exc:
        # KeyExchangeFailed: the node offers no host key of the pinned key's type at all.
        message = (f"host key of {where} does not match the key pinned at phone-home ({exc.reason}): another "
                   f"machine may answer at that address, or the node was reinstalled; let it phone home again")
        record("host-key-mismatch", {"host": access.host, "port": access.port, "error": str(exc)})
        raise HostKeyMismatch("connect", message) from None
    except asyncssh.PermissionDenied as exc:
        message = (f"{where} refused the server's SSH key ({exc.reason}): the agent image must authorize "
                   f"the server's public key for root")
        record("connect-failed", {"host": access.host, "port": access.port, "error": message})
        raise StepFailed("connect", message) from None
    except (OSError, asyncssh.Error) as exc:  # OSError includes TimeoutError
        message = f"cannot reach {where}: {exc or type(exc).__name__}"
        record("connect-failed", {"host": access.host, "port": access.port, "error": message})
        raise NodeLost("connect", message) from None
    return conn, client


def _known_hosts_line(access: NodeAccess) -> str:
    """A known_hosts line pinning the node's key to exactly its host and port."""
    try:
        key = asyncssh.import_public_key(access.host_key.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise BootserverError(f"the host key pinned for {access.host}:{access.port} is not an OpenSSH public "
                              f"key line ({exc}): let the node phone home again") from None
    # Re-exported rather than pasted: a pinned "key" holding a newline cannot add known_hosts entries.
    line = key.export_public_key().decode().strip()
    # OpenSSH's format, which asyncssh follows: a bare host for port 22, [host]:port for any other.
    host = access.host if access.port == 22 else f"[{access.host}]:{access.port}"
    return f"{host} {line}"


async def _open_sftp(conn: asyncssh.SSHClientConnection, client: _Client, access: NodeAccess,
                     record: Record) -> asyncssh.SFTPClient:
    try:
        return await conn.start_sftp_client()
    except (OSError, asyncssh.Error) as exc:
        if client.closed:
            raise NodeLost("connect", f"connection lost: {client.lost or exc}") from exc
        message = (f"{access.host}:{access.port} offers no SFTP ({exc}): the agent image's sshd needs its "
                   f"sftp subsystem")
        record("connect-failed", {"host": access.host, "port": access.port, "error": message})
        raise StepFailed("connect", message) from exc
