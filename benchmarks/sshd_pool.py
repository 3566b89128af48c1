"""Many real SSH servers in one process: tests/support/sshd.py's `ssh_server`, one per emulated machine, on loopback.

Each runs the provisioning commands it gets for real (`sh -c`, in --workdir); a command that mentions `reboot`
(the finish step's) is recorded and never run, the connection dropped, as a rebooting node would.

    python benchmarks/sshd_pool.py --count 125 --first 0 --authorized-key "ssh-ed25519 AAAA..." --workdir DIR

stdout, one JSON object per line:
    {"server": I, "port": P, "host_key": "ssh-ed25519 ..."}   one per server, then {"ready": N}
    {"open": T} and {"close": T}                               every SSH connection (time.time())
    {"finish": I, "t": T}                                      server I got the finish step (its node "reboots")
It stops, closing every server, when stdin reaches EOF (or after --max-seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import sshd  # noqa: E402  (tests/support/sshd.py: the real SSH server the test suite uses)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class CountingServer(sshd.Connections):
    """tests/support/sshd.py's server behaviour, plus a line for every connection opened and closed."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        emit({"open": time.time()})

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        emit({"close": time.time()})


def instrument(index_of_port: dict[int, int]) -> None:
    """Count connections and report finish commands without changing what tests/support/sshd.py does."""
    sshd.Connections = CountingServer  # what ssh_server() makes for each connection
    handle = sshd.TestSSHServer.handle

    async def reporting_handle(self: sshd.TestSSHServer, process: asyncssh.SSHServerProcess) -> None:
        if "reboot" in (process.command or ""):
            emit({"finish": index_of_port.get(self.port, -1), "t": time.time()})
        await handle(self, process)

    sshd.TestSSHServer.handle = reporting_handle


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first server (for the report lines)")
    parser.add_argument("--authorized-key", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=1800)
    args = parser.parse_args()
    os.chdir(args.workdir)
    index_of_port: dict[int, int] = {}
    instrument(index_of_port)
    async with contextlib.AsyncExitStack() as stack:
        for i in range(args.first, args.first + args.count):
            server = await stack.enter_async_context(sshd.ssh_server(args.authorized_key))
            index_of_port[server.port] = i
            emit({"server": i, "port": server.port, "host_key": server.host_key_line})
        emit({"ready": args.count})
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), args.max_seconds)
    os._exit(0)  # the stdin reader thread may still be blocked


if __name__ == "__main__":
    asyncio.run(main())
