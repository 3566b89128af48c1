"""Provisioning jobs: which phoned-home nodes get provisioned, how many at once, what a restart leaves.

The SSH work for one node is `provision.provision`; this module decides when it runs, turns its
step events into machine states, and keeps the state machine honest across failures and restarts:

    script-served -> kernel-served -> phoned-home -> disk -> deploy -> finishing -> deployed
    any step -> failed (a command failed) | interrupted (the node or the server went away)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from .booter import Booter
from .errors import BootserverError, StoreUnavailable
from .mac import hyphenated
from .provision import Job, NodeAccess, NodeLost, provision
from .store import Node

log = logging.getLogger(__name__)

# The machine state while a step runs.
STEP_STATES = {"disk": "disk", "deploy": "deploy", "finish": "finishing"}
# States in which a node is being provisioned: a server that stops there leaves it interrupted.
IN_PROGRESS = ("phoned-home", *STEP_STATES.values())
SWEEP_SECONDS = 30.0


class Provisioner:
    def __init__(self, booter: Booter, **ssh_options: float) -> None:
        self.booter = booter
        self.store = booter.store
        self._cap = asyncio.Semaphore(booter.config.server.provision_concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ssh_options = ssh_options  # timeouts and keep-alive, shortened by tests
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Settle what a previous run left half done, then watch for nodes that never call back."""
        self.recover()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        tasks = [t for t in [self._sweeper, *self._tasks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def recover(self) -> None:
        """Nodes that were mid-provisioning when the server stopped are interrupted, not rerun blindly.

        They may be wiped when they phone home again: the half-done disk is ours.
        """
        for node in self.store.nodes_in_state(*IN_PROGRESS):
            self.store.set_reprovision(node.mac, True)
            self.store.record(node.mac, "interrupted", {"reason": f"the server stopped during {node.state}"},
                              state="interrupted")

    def sweep(self, now: float | None = None) -> None:
        """A node served a kernel that has not phoned home in time has failed, with the reason."""
        minutes = self.booter.config.server.phone_home_minutes
        deadline = (now or time.time()) - minutes * 60
        for node in self.store.nodes_in_state("kernel-served"):
            if node.last_seen < deadline:
                self.store.record(node.mac, "failed", {"reason": f"did not phone home within {minutes} minutes "
                                                                 f"of being served its kernel"}, state="failed")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            with contextlib.suppress(StoreUnavailable):  # logged by the store; the next sweep tries again
                self.sweep()

    # -- jobs ---------------------------------------------------------------------------------------

    def schedule(self, mac: str) -> None:
        """Provision `mac` in the background (under the concurrency cap), unless it already is."""
        running = self._tasks.get(mac)
        if running is not None and not running.done():
            return
        self._tasks[mac] = asyncio.get_running_loop().create_task(self._run(mac))

    async def wait(self, mac: str) -> None:
        """Until the job of `mac` (if any) is over; for the CLI and tests."""
        task = self._tasks.get(mac)
        if task is not None:
            await asyncio.shield(task)

    async def _run(self, mac: str) -> None:
        try:
            await self._provision(mac)
        except StoreUnavailable as exc:
            # Its outcome could not be recorded: on restart (or the next phone-home) it is settled again.
            log.error("provisioning %s: cannot record its outcome: %s", mac, exc)

    async def _provision(self, mac: str) -> None:
        async with self._cap:
            node = self.store.node(mac)
            job = self.job(node) if node else None
            if job is None:
                return
            try:
                await provision(job, self.booter.keys, lambda kind, detail: self._record(mac, kind, detail),
                                render=self.booter.templates.render_file, **self._ssh_options)
            except NodeLost as exc:
                # Not retried: the node may be dead or rebooting. Its next phone-home starts over (wipe allowed).
                self.store.set_reprovision(mac, True)
                self.store.record(mac, "interrupted", {"reason": f"the node stopped answering during {exc.step}: "
                                                                 f"{exc}", "step": exc.step}, state="interrupted")
            except BootserverError as exc:
                self.store.record(mac, "failed", {"reason": str(exc)}, state="failed")
            except Exception as exc:  # a bug of ours: the machine must still end in a state that says so
                log.exception("provisioning %s failed", mac)
                self.store.record(mac, "failed", {"reason": f"internal error: {exc!r}"}, state="failed")
            else:
                self.store.set_reprovision(mac, False)
                self.store.record(mac, "deployed", {"profile": job.context["profile"]}, state="deployed")

    def _record(self, mac: str, kind: str, detail: dict[str, Any]) -> None:
        state = STEP_STATES.get(detail.get("step", "")) if kind == "step-started" else None
        self.store.record(mac, kind, detail, state=state)

    def job(self, node: Node) -> Job | None:
        """What provisioning `node` means under its profile; None when the profile asks for nothing."""
        spec = self.booter.boot_spec(node.mac, {k: v for k, v in node.facts.items() if k in ("arch", "platform")})
        profile = spec.profile
        if profile is None or (profile.disk is None and profile.deploy is None):
            self.store.record(node.mac, "nothing-to-provision",
                              {"profile": profile.name if profile else None})
            return None
        if node.host_key is None or node.ip is None:
            raise BootserverError(f"{node.mac} has not phoned home: no pinned host key")
        machine = self.booter.config.machines.get(node.mac)
        host, port = (machine.ssh.host, machine.ssh.port) if machine and machine.ssh else (node.ip, 22)
        hostname = self.hostname(node.mac)
        return Job(
            mac=node.mac,
            access=NodeAccess(host, port, node.host_key),
            hostname=hostname,
            ips=(node.ip,),
            disk=profile.disk,
            wipe=bool(profile.disk and profile.disk.wipe) or node.reprovision,
            deployment=profile.deploy,
            context=self.context(node, spec.group, profile.name, hostname),
        )

    def hostname(self, mac: str) -> str:
        machine = self.booter.config.machines.get(mac)
        return (machine.hostname if machine else None) or f"node-{hyphenated(mac).replace('-', '')}"

    def context(self, node: Node, group: str | None, profile: str, hostname: str) -> dict[str, Any]:
        """Template context for config files: this node and every member of its group (a Raft peer list)."""
        members = []
        macs = {n.mac: n for n in self.store.nodes()}
        for mac in sorted(set(macs) | set(self.booter.config.machines)):
            known = macs.get(mac)
            facts = {k: v for k, v in (known.facts if known else {}).items() if k in ("arch", "platform")}
            if self.booter.boot_spec(mac, facts).group != group:
                continue
            machine = self.booter.config.machines.get(mac)
            members.append({"mac": mac, "hostname": self.hostname(mac), "ip": known.ip if known else None,
                            "labels": machine.labels if machine else {}})
        me = next(m for m in members if m["mac"] == node.mac)
        return {"node": me, "group": members, "group_name": group, "profile": profile, "hostname": hostname}

