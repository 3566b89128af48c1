"""A Redfish BMC for tests: sushy-tools' emulator (`sushy-emulator --fake`, a test dependency) on loopback.

Its fake driver keeps one system in memory; a power change takes effect 1 to 11 s after it is asked (as a real
server takes its time), and a one-time boot override is kept as continuous. Nothing here is ours but the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.net import free_port

EMULATOR = "sushy-emulator"


@dataclass(frozen=True)
class Emulator:
    url: str  # http://127.0.0.1:PORT, as [machines."MAC".bmc] address takes it
    system: str  # its one system's id


@contextlib.asynccontextmanager
async def redfish_emulator(workdir: Path) -> AsyncIterator[Emulator]:
    # The emulator is a console script of the test venv, which CI runs without putting on PATH.
    emulator = shutil.which(EMULATOR, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if emulator is None:
        pytest.fail(f"missing: {EMULATOR} (pip install sushy-tools: the test extra, ./setup test installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (workdir / "sushy-emulator.log").open("wb")
    # TMPDIR: the emulator keeps its systems' state in TMPDIR/sushy-emulator, across runs: one of its own a test.
    process = subprocess.Popen([emulator, "--fake", "-i", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(workdir)})
    url = f"http://127.0.0.1:{port}"
    try:
        systems = await _answering(url, process, workdir)
        yield Emulator(url, systems[0]["@odata.id"].rsplit("/", 1)[1])
    finally:
        process.terminate()
        process.wait(10)
        log.close()


async def _answering(url: str, process: subprocess.Popen, workdir: Path, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{EMULATOR} exited ({process.returncode}): "
                                 f"{(workdir / 'sushy-emulator.log').read_text()[-2000:]}")
        try:
            body = await asyncio.to_thread(_get, f"{url}/redfish/v1/Systems")
            return body["Members"]
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{EMULATOR} did not answer on {url} within {timeout} s") from None
            await asyncio.sleep(0.2)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())
