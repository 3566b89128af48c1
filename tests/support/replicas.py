"""`bootserver serve` replicas on one shared database, each a process of its own (so that `kill -9` is real)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from support.config import server_section
from support.net import free_port
from support.serve import answers_async, serve_command
from support.wait import NotInTime, until_async


class Replica:
    """`bootserver serve` as its own process, named `name`, on the shared `database`; `site` is the rest of
    its config (assets, profiles, machines), `server` more [server] settings."""

    def __init__(self, name: str, tmp_path: Path, database: str, site: str, server: str = "",
                 port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tmp_path / name
        (self.data / "images").mkdir(parents=True, exist_ok=True)
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text(
            server_section(self.data, http=f"127.0.0.1:{self.port}", new_machines_per_minute=100000,
                           database=database, replica=name, secret_key_file=tmp_path / "secret.key",
                           job_lease_seconds=2, provision_concurrency=16) + f"{server}\n{site}")
        self.log = tmp_path / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *serve_command(self.config, "--log-level", "warning"), stdout=log, stderr=log)
        async with aiohttp.ClientSession() as session:
            try:
                await until_async(lambda: answers_async(session, f"{self.url}/healthz"), 15, interval=0.05)
            except NotInTime:
                raise AssertionError(f"replica {self.name} did not start:\n{self.log.read_text()}") from None

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
