"""Provision one node, step by step: partition its disk, install an OS onto it, deploy onto it, reboot it.

Each step runs over one `ssh.session` and is bracketed by events (`step-started`, `step-done` or
`step-failed`) through `record`; the caller gets an exception when anything goes wrong:

    StepFailed   the node answered, but a command failed or a file could not be deployed
    NodeLost     the node could not be reached, or stopped answering
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from ..config import Deployment, DiskLayout
from ..errors import BootserverError
from . import disk, diskimage, install
from .deploy import deploy
from .pki import IssuedCertificate, ServerKeys
from .ssh import NodeAccess, NodeLost, Record, Runner, StepFailed, session

Render = Callable[[Path, dict[str, Any]], str]
Installed = Callable[[install.Report], None]  # the OS is on the disk: pin its host key before it boots


@dataclass(frozen=True)
class Job:
    mac: str
    access: NodeAccess
    hostname: str
    ips: tuple[str, ...]  # for the TLS certificate's SAN
    disk: DiskLayout | None
    wipe: bool  # may repartition a disk that holds partitions
    deployment: Deployment | None
    context: dict[str, Any]  # template context (the node, its group's members, ...)
    os: install.OsInstall | diskimage.ImageInstall | None = None
    identity: install.Identity | None = None  # who the installed OS is (with os)
    address: install.StaticAddress | None = None  # its boot NIC's static address; None: DHCP


async def provision(job: Job, keys: ServerKeys, record: Record, *, render: Render,
                    command_timeout: float = 600, connect_timeout: float = 30,
                    keepalive_interval: float = 10, keepalive_count_max: int = 3, reboot: bool = True,
                    target_root: str = disk.TARGET_ROOT, installed: Installed = lambda report: None) -> None:
    """Run the steps for `job` on its node: "disk" (if it has a layout), "install" (if it has an OS),
    "deploy" (if it has a deployment), "finish" (sync, unmount, reboot). `target_root` is where the disk
    gets mounted; `installed` is told once the OS is on the disk."""
    async with session(job.access, keys, record, command_timeout=command_timeout, connect_timeout=connect_timeout,
                       keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max) as runner:
        target = "/"
        if job.disk:
            await _step(runner, record, "disk", lambda: _partition(runner, job, target_root))
            target = target_root
        if isinstance(job.os, diskimage.ImageInstall):
            target = target_root  # the image's root partition, mounted by the install step
        if job.os:
            await _step(runner, record, "install", lambda: _install(runner, job, record, target, installed))
        if job.deployment:
            await _step(runner, record, "deploy", lambda: _deploy(runner, job, keys, record, target, render))
        await _step(runner, record, "finish", lambda: _finish(runner, target, reboot))


async def _step(runner: Runner, record: Record, step: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run one step, bracketed by events; every failure leaves as StepFailed or NodeLost."""
    record("step-started", {"step": step})
    started = time.monotonic()
    try:
        await work()
    except (StepFailed, NodeLost) as exc:
        failure = exc
    except (BootserverError, asyncssh.Error, OSError) as exc:
        # On a dead connection SFTP and socket errors are symptoms; the lost connection is the cause.
        if runner.lost:
            failure = NodeLost(step, f"connection lost: {runner.lost}")
        else:
            failure = StepFailed(step, f"{step}: {exc}")
        failure.__cause__ = exc
    else:
        record("step-done", {"step": step, "seconds": round(time.monotonic() - started, 3)})
        return
    record("step-failed", {
        "step": step, "error": str(failure),
        "exit_status": getattr(failure, "exit_status", None),
        "stderr_tail": getattr(failure, "stderr_tail", ""),
    })
    raise failure


async def _partition(runner: Runner, job: Job, target_root: str) -> None:
    assert job.disk is not None
    try:
        commands = disk.disk_commands(job.disk, wipe=job.wipe, target=target_root)
    except ValueError as exc:
        raise StepFailed("disk", f"disk: cannot lay out {job.disk.device}: {exc}") from None
    for command in commands:
        await runner.run("disk", command)


async def _install(runner: Runner, job: Job, record: Record, target: str, installed: Installed) -> None:
    assert job.os is not None and job.identity is not None
    source = (job.os.image if isinstance(job.os, diskimage.ImageInstall) else job.os.rootfs).name

    def progress(done: int, total: int, seconds: float) -> None:
        record("install-progress", {"source": source, "bytes": done, "total": total, "seconds": round(seconds, 1),
                                    "mb_per_s": round(done / seconds / 1e6, 1) if seconds > 0 else None})

    try:
        if isinstance(job.os, diskimage.ImageInstall):
            report = await diskimage.install_image(runner, job.os, job.identity, target, progress)
        elif job.disk is None:
            raise StepFailed("install", "install: a rootfs needs a disk layout to install onto ([profiles.X.disk])")
        else:
            report = await install.install(runner, job.os, job.disk, job.identity, target, progress)
    except install.InstallError as exc:
        raise StepFailed("install", f"install: {exc}") from None
    installed(report)


async def _deploy(runner: Runner, job: Job, keys: ServerKeys, record: Record, target: str, render: Render) -> None:
    assert job.deployment is not None
    await deploy(runner, job.deployment, target=target, context=job.context,
                 sign=lambda csr_pem: _sign(keys, record, job, csr_pem), render=render)


def _sign(keys: ServerKeys, record: Record, job: Job, csr_pem: bytes) -> IssuedCertificate:
    """Sign the node's certificate request for the job's names (never the request's), and record it."""
    issued = keys.sign(csr_pem, job.hostname, list(job.ips))
    record("certificate-issued", issued.event_detail())
    return issued


async def _finish(runner: Runner, target: str, reboot: bool) -> None:
    """Flush and unmount the disk so it boots clean; then reboot in the background, so the command
    returns before the machine goes (a connection that drops anyway is fine: see _step). A disk that
    will not unmount fails the step: the machine is not rebooted into a disk we cannot vouch for."""
    commands = ["sync"]
    if target != "/":
        commands.append(unmount_all(target))
    if not reboot:
        await runner.run("finish", " && ".join(commands))
        return
    commands.append("{ (sleep 1; reboot -f) </dev/null >/dev/null 2>&1 & }")
    try:
        await runner.run("finish", " && ".join(commands))
    except (NodeLost, asyncssh.Error, OSError):
        if not runner.lost:
            raise
        # The node went down before the command reported back: what this step asked for.


def unmount_all(target: str) -> str:
    """Unmount `target` and everything mounted below it, deepest first; fail at the first that will not go.
    (Busybox's umount has no -R.)"""
    below = shlex.quote(f"^{re.escape(target.rstrip('/'))}(/|$)")
    return (f"cut -d' ' -f2 /proc/mounts | grep -E {below} | sort -r | "
            f"while read -r m; do umount \"$m\" || exit 1; done")
