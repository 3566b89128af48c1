"""A power cut: `bootserver serve` in a VM with its store on the VM's own disk, machines booting and being
provisioned as fast as they can, and the VM's power cut (QEMU killed) in the middle of it.

The kill -9 trials (tests/test_crash.py) cannot tell synchronous=FULL from OFF: a dead process's writes are still
in the operating system's cache and reach the disk anyway. Here the operating system dies too (see
support/hostroot.py for what the cut loses and what it does not model). Afterwards the disk's journal is replayed
(e2fsck, as the kernel would at mount) and the store must hold every request the server acknowledged, matched
one by one (support/crash.py), in a file that passes integrity_check.

A control proves that the cut really loses what was not flushed: beside the server, on a second disk, a writer
commits rows to SQLite with synchronous=OFF and prints each committed row's number to the console; after the cut
the rows it printed but the disk lacks must be more than none, or the trial proved nothing.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from support.config import section, server_section
from support.crash import Acked, check_database, drive, in_progress, store_figures
from support.hostroot import hostroot_append, hostroot_image, share_host_root, virtio_disk
from support.net import free_port
from support.qemu import Vm
from support.require import require
from support.serve import answers_async, serve_command
from support.sshd import ssh_server
from support.wait import until_async

from bootserver.provision.pki import ServerKeys

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parent.parent
MACS = [f"52:54:00:00:30:{i:02x}" for i in range(1, 7)]
TRIALS = 3
GUEST_DATA = "/run/vda/data"  # the server's data_dir: the first disk, mounted by the guest's /init
GUEST_CONTROL = "/run/vdb/control/rows.sqlite3"

CONTROL = """
import os, sqlite3, sys, time

def open_rows(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY, pad BLOB)")
    return db, db.execute("SELECT COALESCE(MAX(n), 0) FROM rows").fetchone()[0]  # what an earlier cut left

try:
    db, n = open_rows(sys.argv[1])
except sqlite3.DatabaseError:  # synchronous=OFF may leave a corrupt file after a cut: that is its loss, start over
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(sys.argv[1] + suffix):
            os.remove(sys.argv[1] + suffix)
    db, n = open_rows(sys.argv[1])
console = open("/dev/console", "w")
while True:
    n += 1
    db.execute("INSERT INTO rows VALUES (?, randomblob(1000))", (n,))
    print(f"control committed {n}", file=console, flush=True)
    time.sleep(0.02)  # about 50 rows a second: a quarter of an hour fills no disk
"""


def make_disk(image: Path, contents: Path, megabytes: int) -> None:
    """An ext4 file system of `megabytes` in image, holding what is under contents (mke2fs -d: no mount, no root)."""
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(contents), str(image), f"{megabytes}M"],
                   check=True)


def read_back(image: Path, directory: str, dest: Path) -> Path:
    """What the disk holds after the cut, as the next boot would find it: the journal replayed (e2fsck, exit 0 or
    1: clean, or errors fixed), then `directory` copied out with debugfs (no mount, no root)."""
    fsck = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), f"e2fsck {image}: exit {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump {directory} {dest}", str(image)], check=True, capture_output=True)
    return dest / Path(directory).name


def write_site(tmp_path: Path, ssh_port: int, api_token: str, url: str) -> Path:
    machines = "".join(f'[machines."{mac}"]\nssh = "10.0.2.2:{ssh_port}"\n' for mac in MACS)
    config = tmp_path / "site.toml"
    config.write_text(
        server_section(Path(GUEST_DATA), http="0.0.0.0:8080", api_token=api_token,
                       origins=[url]) +  # reached through QEMU's port forward: our name as the clients see it +
        section("assets", kernel="images/vmlinuz", initrd="images/initrd.img") +
        '[profiles.p]\nkernel = "kernel"\ninitrd = ["initrd"]\n[profiles.p.deploy]\ncheck = "sleep 0.3"\n'
        f'[groups.all]\nprofile = "p"\n{machines}')
    return config


async def test_power_cuts_lose_no_acknowledged_request(tmp_path: Path):
    require("mkfs.ext4", "e2fsck", "debugfs")
    rng = random.Random(7)
    kernel, initrd = hostroot_image(tmp_path)
    disk, control = tmp_path / "disk", tmp_path / "control"
    data = disk / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(rng.randbytes(256 * 1024))
    (data / "images" / "initrd.img").write_bytes(rng.randbytes(64 * 1024))
    keys = ServerKeys.load_or_create(data / "keys")  # the server finds them on its disk
    (control / "control").mkdir(parents=True)
    make_disk(tmp_path / "vda.img", disk, 256)
    make_disk(tmp_path / "vdb.img", control, 128)
    api_token = tmp_path / "api_token"
    api_token.write_text(secrets.token_hex(16))
    (tmp_path / "control.py").write_text(CONTROL)
    acked: list[Acked] = []  # one per boot: each boot's clock has its own offset from ours
    caught: list[tuple[str, str]] = []  # machines the last cut caught mid-provisioning
    interrupted = 0
    lost_by_control: list[tuple[int, int]] = []

    async with ssh_server(keys.ssh_public) as node:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = write_site(tmp_path, node.port, api_token.read_text(), url)
        script = tmp_path / "run.sh"
        script.write_text(
            f"export PYTHONDONTWRITEBYTECODE=1 HOME=/run TMPDIR=/run\ncd {ROOT}\n"
            f"{sys.executable} {tmp_path / 'control.py'} {GUEST_CONTROL} &\n"
            f"exec {shlex.join(serve_command(config, '--log-level', 'warning'))}\n")
        for trial in range(TRIALS):
            vm = Vm(workdir=tmp_path / "vm", kernel=kernel, initrd=initrd, append=hostroot_append(script),
                    memory=768, hostfwd={port: 8080},
                    extra_args=[*share_host_root(), *virtio_disk(tmp_path / "vda.img", "vda"),
                                *virtio_disk(tmp_path / "vdb.img", "vdb")])
            async with vm:
                await vm.wait_for_serial(r"control committed \d+", timeout=240)
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_connect=3, sock_read=3)) as s:
                    await until_async(lambda s=s: answers_async(s, f"{url}/healthz"), 240, interval=0.5)
                    # Recovery on the disk the last cut left: what it caught mid-provisioning is interrupted.
                    for mac, _ in caught:
                        async with s.get(f"{url}/api/v1/machines/{mac}") as response:
                            assert (await response.json())["state"] == "interrupted", (trial, mac)
                # What the cut is about: the live store commits with synchronous=FULL in WAL mode.
                await store_figures(url)
                acked.append(Acked())
                drivers = [asyncio.create_task(drive(url, node.host_key_line, mac, acked[-1], api_token))
                           for mac in MACS]
                await asyncio.sleep(rng.uniform(6, 10))
                vm.process.kill()  # the power cut
                await vm.process.wait()
                for driver in drivers:
                    driver.cancel()
                await asyncio.gather(*drivers, return_exceptions=True)
                serial = vm.serial_log

            stored = read_back(tmp_path / "vda.img", "/data", tmp_path / f"after-{trial}")
            for each in acked:  # this boot's requests, and every earlier boot's still there
                check_database(stored, each)
            caught = in_progress(stored)
            interrupted += len(caught) if trial < TRIALS - 1 else 0
            printed = max(int(n) for n in re.findall(r"control committed (\d+)", serial))
            rows = read_back(tmp_path / "vdb.img", "/control", tmp_path / f"control-{trial}") / "rows.sqlite3"
            try:
                kept = sqlite3.connect(rows).execute("SELECT COALESCE(MAX(n), 0) FROM rows").fetchone()[0]
            except sqlite3.DatabaseError:
                kept = 0
            lost_by_control.append((printed - kept, printed))

    scripts, phone_homes = sum(len(a.scripts) for a in acked), sum(len(a.phone_homes) for a in acked)
    print(f"{TRIALS} power cuts after {sum(len(a) for a in acked)} acknowledged requests ({scripts} scripts, "
          f"{phone_homes} phone-homes): all stored; the control (synchronous=OFF) lost "
          + ", ".join(f"{lost} of {printed}" for lost, printed in lost_by_control) + " committed rows; "
          f"{interrupted} machines caught mid-provisioning found interrupted after the restart")
    assert all(lost for lost, _ in lost_by_control), (
        f"a cut lost none of the rows the control committed with synchronous=OFF ({lost_by_control}): it did not "
        "drop what was not flushed, so it proved nothing about the server")
    assert all(len(a.scripts) > 10 and a.phone_homes for a in acked), \
        f"too little happened before a cut: {[(len(a.scripts), len(a.phone_homes)) for a in acked]} (scripts, " \
        "phone-homes)"
