"""Provisioning jobs: which phoned-home nodes get provisioned, by which replica, how many at once, and
what a restart or a dead replica leaves.

The SSH work for one node is `steps.provision`; this module decides when it runs, turns its
step events into machine states, and keeps the state machine honest across failures and restarts:

    script-served -> kernel-served -> phoned-home -> disk -> install -> deploy -> finishing -> rebooting
    (the installed OS reports: booted, its job queued again) -> health checks pass: running
    any step -> failed (a command failed, no report, checks never passed) | interrupted (a node or server went away)

A phone-home queues the machine's job in the store (one per machine, whichever replica took the
call). Every replica's claim loop takes queued jobs under its concurrency cap and holds each by a
lease it renews; a replica that dies stops renewing, and after `job_lease_seconds` another takes its
jobs over and runs them again (`resumed` in the machine's events). A replica that cannot renew (cut off
from the database) stops its jobs before their leases lapse, so a job never runs on two replicas at
once. A replica that restarts marks the jobs it had accepted or was running `interrupted` instead: the
node may be mid-reboot, so no blind rerun.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import asyncssh

from ..errors import BootserverError, StoreUnavailable
from ..lifecycle import IN_PROGRESS, STEP_STATES, EventKind, State
from ..mac import hyphenated
from ..settings import ProvisionSettings
from ..store import JobClaim, Node, Store
from ..tokens import Signer
from .health import wait_until_healthy
from .install import Identity
from .install import Report as InstallReport
from .pki import ServerKeys
from .ssh import NodeLost, session
from .steps import Job, provision

if TYPE_CHECKING:
    from ..plans import HealthJob

log = logging.getLogger(__name__)

SWEEP_SECONDS = 30.0
TOKEN_KEEP_SECONDS = 7 * 86400  # an expired token's row is kept this long (for "used already" messages), then pruned
CLAIM_POLL_SECONDS = 1.0  # how soon a job queued through another replica is noticed here


class JobPolicy(Protocol):
    """What the provisioner asks the core (Booter) each time, so that a reloaded config applies to the next job:
    the provisioner runs jobs and records their outcome; the core decides what a job is."""

    def provision_settings(self) -> ProvisionSettings: ...

    def provision_job(self, node: Node, ssh_port: int) -> Job | None: ...

    def health_job(self, node: Node, ssh_port: int) -> HealthJob: ...

    def job_source(self, mac: str) -> str | None: ...

    def render_file(self, path: Path, context: dict[str, Any]) -> str: ...


class Provisioner:
    def __init__(self, store: Store, keys: ServerKeys, policy: JobPolicy, ssh_port: int = 22,
                 job_seconds: float | None = None, **ssh_options: float) -> None:
        """`keys`: the server's, to log in to nodes and sign their certificates. `ssh_port`, `job_seconds`
        (instead of [server] job_minutes) and `ssh_options` (provision's timeouts and keep-alives) are for tests,
        which shorten them."""
        self.store = store
        self.keys = keys
        self._policy = policy
        self._job_seconds = job_seconds
        self._ssh_port = ssh_port  # where a node's sshd listens unless [machines] says otherwise
        self._running: dict[str, asyncio.Task[None]] = {}  # by MAC: the jobs this replica holds
        self._sources: dict[str, str] = {}  # by MAC: the node address a running job counts against
        self._lease_ends: dict[str, float] = {}  # by MAC: until when (at the latest) we hold each
        self._wake = asyncio.Event()
        self._ssh_options = ssh_options  # timeouts and keep-alive, shortened by tests
        self._loops: list[asyncio.Task[None]] = []
        self._reboots: set[asyncio.Task[None]] = set()

    @property
    def replica(self) -> str:
        """This server's name: the owner of its jobs, as on the events it records."""
        return self.store.replica

    @property
    def lease_seconds(self) -> float:
        return self._policy.provision_settings().lease_seconds

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Settle what a previous run left half done, then claim jobs and watch for nodes that never call."""
        self.recover()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._sweep_forever()), loop.create_task(self._claim_forever()),
                       loop.create_task(self._renew_forever())]

    async def stop(self) -> None:
        tasks = [*self._loops, *self._running.values(), *self._reboots]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def recover(self) -> None:
        """Jobs this replica had accepted or was running when it stopped are interrupted, not rerun
        blindly; so are machines left mid-provisioning with no unfinished job (no job row, or one already done).

        They may be wiped when they phone home again: the half-done disk is ours.
        """
        for claim in self.store.unfinished_jobs(self.replica):
            node = self.store.node(claim.mac)
            if node is not None and node.state == State.BOOTED:  # health checks change nothing: run them again
                self.store.requeue_job(claim.mac)
                continue
            if node is not None and node.state in IN_PROGRESS:
                self._interrupt(node, f"the server stopped during {node.state}")
            self.store.finish_job(claim.mac, self.replica)
        for node in self.store.nodes_in_state(*IN_PROGRESS):
            job = self.store.job(node.mac)
            if job is None or job.state == "done":
                self._interrupt(node, f"the server stopped during {node.state}")

    def _interrupt(self, node: Node, reason: str) -> None:
        self.store.set_reprovision(node.mac, True)
        self.store.record(node.mac, "interrupted", {"reason": reason}, state=State.INTERRUPTED)

    def sweep(self, now: float | None = None) -> None:
        """A node served a kernel that has not phoned home in time has failed, with the reason. Tokens
        long expired are deleted (every boot script issues one: unpruned, the table only grows), and
        events older than `[server] event_days` when it is set."""
        now = now or time.time()
        settings = self._policy.provision_settings()
        minutes = settings.phone_home_minutes
        deadline = now - minutes * 60
        for node in self.store.nodes_in_state("kernel-served"):
            if node.last_seen < deadline:
                self.store.record(node.mac, "failed", {"reason": f"did not phone home within {minutes} minutes "
                                                                 f"of being served its kernel"}, state=State.FAILED)
        for node in self.store.nodes_in_state(State.REBOOTING):
            self._check_rebooted(node, settings.boot_minutes, now)
        pruned = self.store.prune_tokens(now - TOKEN_KEEP_SECONDS)
        if pruned:
            log.info("pruned %d phone-home tokens that expired over %d days ago", pruned, TOKEN_KEEP_SECONDS // 86400)
        days = settings.event_days
        if days is not None and (pruned := self.store.prune_events(now - days * 86400)):
            log.info("pruned %d events older than %d days ([server] event_days)", pruned, days)

    def _check_rebooted(self, node: Node, minutes: int, now: float) -> None:
        """An installed OS that has not reported within `minutes` of its reboot has failed, saying what we saw."""
        events = self.store.recent_events(node.mac, 200)
        rebooted = next((e for e in reversed(events) if e.kind == EventKind.REBOOTING), None)
        if rebooted is None or rebooted.time > now - minutes * 60:
            return
        scripts = sum(1 for e in events if e.id > rebooted.id and e.kind == EventKind.SCRIPT_SERVED)
        seen = (f"served the local-disk script {_times(scripts)} and never heard from the installed OS: is the "
                f"disk bootable on this firmware, and can the installed OS reach this server?") if scripts else (
                "never asked for a script again: did it reboot (does its firmware netboot first)?")
        self.store.record(node.mac, "failed", {"reason": f"no first-boot report within {minutes} minutes "
                                                         f"([server] boot_minutes): {seen}"},
                          state=State.FAILED, only_from=(State.REBOOTING,))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            with contextlib.suppress(StoreUnavailable):  # logged by the store; the next sweep tries again
                self.sweep()

    # -- jobs ---------------------------------------------------------------------------------------

    def schedule(self, mac: str) -> None:
        """A phone-home queued `mac`'s job: claim it now rather than at the next poll."""
        self._wake.set()

    async def _claim_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(StoreUnavailable):  # logged by the store; the next round tries again
                while len(self._running) < self._policy.provision_settings().concurrency:
                    claim = self.store.claim_job(self.replica, self.lease_seconds, self._busy_sources())
                    if claim is None:
                        break
                    source = self._policy.job_source(claim.mac)
                    if source is not None:
                        self._sources[claim.mac] = source
                    task = loop.create_task(self._run(claim))
                    self._running[claim.mac] = task
                    self._lease_ends[claim.mac] = claim.lease_until or 0.0
                    task.add_done_callback(lambda _, mac=claim.mac: self._done(mac))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow our own cancellation when the
            # event is set in the same loop turn, and stop() then waits for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLAIM_POLL_SECONDS):
                    await self._wake.wait()
            self._wake.clear()

    def _busy_sources(self) -> list[str]:
        """Node addresses that hold all the jobs one address may hold at once ([server] provision_per_source):
        a forger that claims many MACs from one address, with an sshd that never answers, holds only those."""
        counts = collections.Counter(self._sources.values())
        return [ip for ip, n in counts.items() if n >= self._policy.provision_settings().per_source]

    def _done(self, mac: str) -> None:
        self._running.pop(mac, None)
        self._sources.pop(mac, None)
        self._lease_ends.pop(mac, None)
        self._wake.set()  # room under the cap for the next job

    async def _renew_forever(self) -> None:
        """Renew this replica's leases well before they lapse. A job another replica took over meanwhile is
        stopped here; so is one whose lease would lapse before the next try, when renewing fails (the
        database is unreachable from here, maybe not from the others): it may be taken over any moment."""
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            mine = list(self._running)
            asked = time.time()  # the store's lease starts a little later: ours is the safe side
            try:
                held = self.store.renew_jobs(self.replica, mine, self.lease_seconds)
            except StoreUnavailable:
                lapsing = [mac for mac in mine if self._lease_ends.get(mac, 0.0) <= time.time() + interval]
                self._stop(lapsing, "its lease cannot be renewed (the database is unreachable), another replica "
                                    "may take it over")
                continue
            self._lease_ends.update(dict.fromkeys(held, asked + self.lease_seconds))
            self._stop(set(mine) - held, "another replica took this job over")

    def _stop(self, macs: Iterable[str], why: str) -> None:
        for mac in macs:
            task = self._running.get(mac)
            if task is not None and not task.done():
                log.warning("provisioning %s: %s; stopping here", mac, why)
                task.cancel()

    async def _run(self, claim: JobClaim) -> None:
        try:
            if claim.taken_over_from is not None:
                node = self.store.node(claim.mac)
                state = node.state if node else None
                if state not in (*IN_PROGRESS, State.BOOTED):  # it recorded the outcome, then died before closing
                    self.store.finish_job(claim.mac, self.replica)
                    return
                self.store.record(claim.mac, "resumed", {"from": claim.taken_over_from, "state": state,
                                                         "attempt": claim.attempt})
                if state in STEP_STATES.values():  # its disk may be half made, by us: wipe allowed
                    self.store.set_reprovision(claim.mac, True)
            await self._provision(claim.mac)
            self.store.finish_job(claim.mac, self.replica)
        except StoreUnavailable as exc:
            # Not recorded: the lease lapses and another replica takes the job over (finishing it if its outcome
            # was recorded), or this one, restarted, marks it interrupted.
            log.error("provisioning %s: cannot record its outcome: %s", claim.mac, exc)

    async def _provision(self, mac: str) -> None:
        node = self.store.node(mac)
        if node is not None and node.state == State.BOOTED:
            await self._check_health(node)
            return
        job = self._policy.provision_job(node, self._ssh_port) if node else None
        if job is None:
            return
        installed: list[InstallReport] = []
        pin = None
        if job.os is not None:
            job, pin = self._with_identity(job)

        def keep(report: InstallReport) -> None:
            installed.append(report)
            if pin is not None:
                pin(report)
        limit = self._job_seconds or self._policy.provision_settings().job_seconds
        try:
            async with asyncio.timeout(limit):
                await provision(job, self.keys, lambda kind, detail: self._record(mac, kind, detail),
                                render=self._policy.render_file, installed=keep,
                                **self._ssh_options)
        except TimeoutError:
            # A node that stalls (or an sshd that never answers) must not hold a provisioning slot for good.
            self.store.record(mac, "failed", {"reason": f"provisioning did not finish within {limit / 60:g} minutes "
                                                        f"([server] job_minutes)"}, state=State.FAILED)
        except NodeLost as exc:
            # Not retried: the node may be dead or rebooting. Its next phone-home starts over (wipe allowed).
            self.store.set_reprovision(mac, True)
            self.store.record(mac, "interrupted", {"reason": f"the node stopped answering during {exc.step}: "
                                                             f"{exc}", "step": exc.step}, state=State.INTERRUPTED)
        except BootserverError as exc:
            self.store.record(mac, "failed", {"reason": str(exc)}, state=State.FAILED)
        except Exception as exc:  # a bug of ours: the machine must still end in a state that says so
            log.exception("provisioning %s failed", mac)
            self.store.record(mac, "failed", {"reason": f"internal error: {exc!r}"}, state=State.FAILED)
        else:
            self.store.set_reprovision(mac, False)
            if not installed:
                self.store.record(mac, "deployed", {"profile": job.context["profile"]}, state=State.DEPLOYED)
            else:
                minutes = self._policy.provision_settings().boot_minutes
                self.store.record(mac, "rebooting", {"profile": job.context["profile"], "minutes": minutes},
                                  state=State.REBOOTING)

    def _with_identity(self, job: Job) -> tuple[Job, Callable[[InstallReport], None]]:
        """The job with who its installed OS will be: an SSH host key made here (no trust on first use) and a
        one-time token for its first-boot report; both are kept only once the install has put them on the disk."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        public = key.export_public_key().decode().strip()
        minutes = self._policy.provision_settings()
        presented, token = Signer(self.keys.token_key).issue(job.mac, minutes.job_seconds / 60 + minutes.boot_minutes,
                                                             purpose="report")
        identity = Identity(mac=job.mac, hostname=job.hostname, host_key=key.export_private_key().decode(),
                            authorized_key=self.keys.ssh_public, report_path=f"/boot/{hyphenated(job.mac)}/booted",
                            report_token=presented, address=job.address)

        def installed(report: InstallReport) -> None:
            self.store.installed(job.mac, public, token, {
                "source": report.source, "kernel": report.kernel,
                "platform": report.platform, "boot_loaders": list(report.boot_loaders), "seconds": report.seconds,
                "fingerprint": key.get_fingerprint("sha256"),
                **({"sha256": report.sha256} if report.sha256 else {}),
                **({"grown": report.grown} if report.grown else {})})

        return dataclasses.replace(job, identity=identity), installed

    def reboot_soon(self, mac: str) -> None:
        """reboot(mac) in the background (an operator's reprovision through the pages or the API)."""
        task = asyncio.get_running_loop().create_task(self.reboot(mac))
        self._reboots.add(task)
        task.add_done_callback(self._reboots.discard)

    async def reboot(self, mac: str) -> bool:
        """Reboot the installed OS of `mac` over SSH (its pinned host key), so that it netboots into the flow."""
        node = self.store.node(mac)
        record = functools.partial(self.store.record, mac)
        try:
            if node is None:
                raise BootserverError(f"no machine {mac}")
            access = self._policy.health_job(node, self._ssh_port).access
            async with session(access, self.keys, lambda kind, detail: None, **self._ssh_options) as runner:
                try:
                    await runner.run("reboot", "(sleep 1; systemctl reboot) </dev/null >/dev/null 2>&1 &")
                except (NodeLost, asyncssh.Error, OSError):
                    if not runner.lost:
                        raise
                    # It went down before the command reported back: what we asked for.
        except (BootserverError, asyncssh.Error, OSError) as exc:
            record("reboot-failed", {"reason": str(exc)})
            return False
        record("reboot-sent", {"host": f"{access.host}:{access.port}"})
        return True

    async def _check_health(self, node: Node) -> None:
        """A booted machine is `running` once its profile's health checks all pass, else `failed` saying which."""
        mac = node.mac
        try:
            health = self._policy.health_job(node, self._ssh_port)
            await wait_until_healthy(health.access, self.keys, health.checks,
                                     lambda kind, detail: self.store.record(mac, kind, detail), **self._ssh_options)
        except BootserverError as exc:
            self.store.record(mac, "failed", {"reason": f"health: {exc}"}, state=State.FAILED)
        else:
            self.store.record(mac, "running", {"profile": health.profile}, state=State.RUNNING)

    def _record(self, mac: str, kind: str, detail: dict[str, Any]) -> None:
        state = STEP_STATES.get(detail.get("step", "")) if kind == EventKind.STEP_STARTED else None
        self.store.record(mac, kind, detail, state=state)


def _times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")
