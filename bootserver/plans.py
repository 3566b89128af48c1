"""What provisioning a machine means under its profile, with the config of the moment: the job its agent gets
(disk, OS, files), the health checks of the OS it then boots, and its group for config templates. The core
(Booter) answers the Provisioner's questions from here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config, OperatingSystem
from .errors import BootserverError
from .facts import selector_facts
from .groups import BootSpec, Groups
from .provision.diskimage import ImageInstall
from .provision.health import HealthChecks
from .provision.install import OsInstall, StaticAddress
from .provision.ssh import NodeAccess
from .provision.steps import Job
from .store import Node, Store


@dataclass(frozen=True)
class HealthJob:
    """The checks that make a booted machine `running`, and how to reach its installed OS."""

    access: NodeAccess  # pinned to the host key the server made for the installed OS
    checks: HealthChecks
    profile: str


class Plans:
    def __init__(self, config: Config, store: Store, groups: Groups, hostname: Callable[[str], str]) -> None:
        self._config = config
        self._store = store
        self._groups = groups
        self._hostname = hostname

    def provision_job(self, node: Node, ssh_port: int) -> Job | None:
        """What provisioning `node` means under its profile; None (recorded) when the profile asks for nothing.
        `ssh_port`: where its sshd listens unless [machines] says otherwise."""
        spec = self._spec(node)
        profile = spec.profile
        if profile is None or (profile.disk is None and profile.deploy is None and profile.os is None):
            self._store.record(node.mac, "nothing-to-provision", {"profile": profile.name if profile else None})
            return None
        if node.host_key is None or node.ip is None:
            raise BootserverError(f"{node.mac} has not phoned home: no pinned host key")
        host, port = self._endpoint(spec, node, ssh_port)
        hostname = self._hostname(node.mac)
        return Job(mac=node.mac, access=NodeAccess(host, port, node.host_key), hostname=hostname, ips=(node.ip,),
                   disk=profile.disk, wipe=bool(profile.disk and profile.disk.wipe) or node.reprovision,
                   deployment=profile.deploy, context=self.job_context(node.mac, spec.group, profile.name, hostname),
                   os=self._system(profile.os, node.reprovision), address=self._static_address(spec))

    def _static_address(self, spec: BootSpec) -> StaticAddress | None:
        """A reserved address ([machines] ip) on the subnet our full DHCP serves becomes the installed OS's
        static address, with that subnet's router and DNS; anything else boots on DHCP."""
        dhcp = self._config.dhcp
        ip = spec.machine.ip if spec.machine else None
        if ip is None or dhcp.mode != "full" or dhcp.network is None:
            return None
        return StaticAddress(f"{ip}/{dhcp.network.prefixlen}", str(dhcp.router) if dhcp.router else None,
                             tuple(str(server) for server in dhcp.dns))

    def _system(self, system: OperatingSystem | None, reprovision: bool) -> OsInstall | ImageInstall | None:
        """What goes onto the disk: a rootfs onto the profile's layout, or an image over the whole disk."""
        if system is None:
            return None
        path = self._config.assets[system.source]
        if system.rootfs:
            return OsInstall(path, system.cmdline)
        assert system.device is not None
        return ImageInstall(path, system.device, cache=self._config.server.data_dir / "cache" / "images",
                            sha256=system.sha256, grow=system.grow, root=system.root,
                            wipe=system.wipe or reprovision)

    def health_job(self, node: Node, ssh_port: int) -> HealthJob:
        """The health checks of the OS `node` booted from its disk, against the host key pinned at install."""
        spec = self._spec(node)
        if node.os_host_key is None or node.ip is None:
            raise BootserverError(f"{node.mac} has no installed OS to check: no host key was pinned at install")
        host, port = self._endpoint(spec, node, ssh_port)
        health = spec.profile.health if spec.profile else None
        checks = HealthChecks(commands=health.commands if health else (), urls=health.urls if health else (),
                              minutes=self._config.server.running_minutes)
        return HealthJob(NodeAccess(host, port, node.os_host_key), checks, spec.profile.name if spec.profile else "")

    def job_source(self, mac: str) -> str | None:
        """The address a job counts against: the one it phoned home from. A machine whose SSH endpoint the
        operator configured ([machines] ssh) counts against none: that address is not the caller's choice."""
        machine = self._config.machines.get(mac)
        if machine is not None and machine.ssh is not None:
            return None
        node = self._store.node(mac)
        return node.ip if node else None

    def job_context(self, mac: str, group: str | None, profile: str, hostname: str) -> dict[str, Any]:
        """Template context for a machine's config files: the machine and every member of its group (a Raft peer
        list). Members are the machines configured under [machines] and those admitted by an accepted phone-home:
        a MAC that only asked for files, as anyone on the boot network may, is no member of anything."""
        members = self._groups.members(group, self._store.members(), self._hostname)
        me = next(m for m in members if m["mac"] == mac)
        return {"node": me, "group": members, "group_name": group, "profile": profile, "hostname": hostname}

    def _spec(self, node: Node) -> BootSpec:
        return self._groups.spec(node.mac, selector_facts(node.facts))

    def _endpoint(self, spec: BootSpec, node: Node, ssh_port: int) -> tuple[str, int]:
        ssh = spec.machine.ssh if spec.machine else None
        assert node.ip is not None
        return (ssh.host, ssh.port) if ssh else (node.ip, ssh_port)
