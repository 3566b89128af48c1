"""A real IPMI BMC on loopback for tests: OpenIPMI's ipmi_sim (bootserver/tools/labbmc.py), its chassis kept by
a small chassis_control program (power and boot device in files), so that no VM is needed.

    async with simulated_bmc(tmp_path) as bmc:
        bmc.power            # "on" or "off", as the chassis has it
        bmc.log              # every "set" ipmi_sim passed to the chassis: ["power 1", "boot pxe", "reset 1"]

ipmi_sim passes a one-time boot override on to the chassis but never marks it valid: reading it back shows
none. That is the BMC that accepts an override and reverts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bootserver.tools.labbmc import SimBmc
from support.net import free_port
from support.require import require

# OpenIPMI's chassis_control protocol: DEVICE get PARM... prints PARM:VALUE lines; DEVICE set PARM VALUE...
CHASSIS = """#!/bin/sh
dir="$(dirname "$0")/chassis"
mkdir -p "$dir"
shift
op=$1
shift
if [ "$op" = get ]; then
  for parm in "$@"; do echo "$parm:$(cat "$dir/$parm" 2>/dev/null || echo 0)"; done
else
  while [ $# -ge 2 ]; do
    echo "$2" > "$dir/$1"
    echo "$1 $2" >> "$dir/log"
    shift 2
  done
fi
"""


@dataclass
class RunningBmc:
    sim: SimBmc
    process: subprocess.Popen

    @property
    def power(self) -> str:
        path = self.sim.dir / "chassis" / "power"
        return "on" if path.exists() and path.read_text().strip() == "1" else "off"

    @property
    def log(self) -> list[str]:
        path = self.sim.dir / "chassis" / "log"
        return path.read_text().splitlines() if path.exists() else []


@contextlib.asynccontextmanager
async def simulated_bmc(workdir: Path) -> AsyncIterator[RunningBmc]:
    require("ipmi_sim")
    workdir.mkdir(parents=True, exist_ok=True)
    chassis = workdir / "chassis-control"
    chassis.write_text(CHASSIS)
    chassis.chmod(0o755)
    sim = SimBmc(workdir, "127.0.0.1", free_port(socket.SOCK_DGRAM), vm_port=free_port())
    log = (workdir / "ipmi_sim.log").open("wb")
    process = subprocess.Popen(sim.write(chassis_control=chassis), stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        await _answering(sim, process)
        yield RunningBmc(sim, process)
    finally:
        process.terminate()
        process.wait(5)
        log.close()


async def _answering(sim: SimBmc, process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Until ipmi_sim answers an RMCP ping (ASF presence ping) on its port."""
    ping = bytes.fromhex("0600ff06000011be80000000")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ipmi_sim exited ({process.returncode}): "
                                     f"{(sim.dir / 'ipmi_sim.log').read_text()}")
            probe.sendto(ping, (sim.address, sim.port))
            try:
                probe.recv(512)
                return
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ipmi_sim did not answer on {sim.address}:{sim.port} within {timeout} s")
            await asyncio.sleep(0.1)
