"""The core: decides what each machine gets and records what happened to it.

Every protocol (HTTP, TFTP and DHCP) only translates its wire format into calls on one
Booter, the way Pixiecore's protocol servers all ask one Booter. Nothing here knows about sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from . import tokens
from .admission import RateLimit, canonical_uuid, same_uuid, strict_ip, window
from .config import FACT_KEYS, Config, Group, Machine, Profile
from .errors import BadRequest, Forbidden, NotFound, StoreUnavailable, TooManyRequests, Unauthorized
from .lifecycle import IN_PROGRESS, KERNEL_FROM, State
from .mac import canonical_mac, hyphenated
from .overlay import overlay_cpio
from .payload import Payload
from .provision.pki import ServerKeys
from .store import Node, Store
from .templates import Templates

log = logging.getLogger(__name__)

# What iPXE's bootstrap script reports, by query parameter. Anything else is ignored.
REPORTED_FACTS = ("platform", "arch", "uuid", "serial", "asset", "manufacturer", "product")
MAX_FACT_LENGTH = 128

# The iPXE binary a firmware gets, by DHCP option 93 client architecture (RFC 4578, IANA registry).
# 7 and 9 are both x86-64 UEFI in practice (RFC 4578 had them swapped).
FIRMWARE_BINARIES = {
    0: "undionly.kpxe",  # BIOS: uses the NIC's own UNDI driver
    7: "ipxe.efi",
    9: "ipxe.efi",
    11: "snponly-arm64.efi",  # arm64: the all-drivers build does not work there
    16: "ipxe.efi",  # x86-64 UEFI HTTP boot
}
# The per-machine overlay initrd's file name: the kernel command line names it for UEFI's stub.
OVERLAY_NAME = "bootserver.cpio"

# Every iPXE binary we hand out by name, over TFTP or HTTP, from server.ipxe_dir.
IPXE_BINARIES = frozenset(FIRMWARE_BINARIES.values()) | {"snponly.efi", "undionly.kkpxe", "ipxe.pxe"}


@dataclass(frozen=True)
class Urls:
    """Where a machine finds us: `files` over the transport it used, `api` over HTTP for its OS."""

    files: str
    api: str


@dataclass(frozen=True)
class DhcpBoot:
    """What DHCP tells one machine to boot: a TFTP file name, an http:// URL, or nothing (an address only)."""

    bootfile: str | None
    http: bool = False  # a UEFI HTTP-boot client: the reply must say option 60 "HTTPClient"
    reason: str = ""


# UEFI HTTP-boot architectures (option 93) -> the PXE architecture whose iPXE binary they get.
HTTP_BOOT_ARCHES = {15: 6, 16: 7, 19: 11}


@dataclass(frozen=True)
class BootSpec:
    """What one machine boots, and why; `profile` None means it boots nothing from us."""

    mac: str
    profile: Profile | None
    group: str | None
    reason: str
    machine: Machine | None = None
    facts: dict[str, str] = field(default_factory=dict)


class Booter:
    def __init__(self, config: Config, store: Store, templates: Templates, keys: ServerKeys) -> None:
        self.config = config
        self.store = store
        self.templates = templates
        self.keys = keys
        # Called with a MAC once its node has phoned home and may be provisioned (set by the App).
        self.on_phoned_home: Callable[[str], None] = lambda mac: None
        self._groups_for: Config | None = None  # the config _groups was computed from
        self._groups: dict[tuple[str, str | None, str | None], str | None] = {}
        # New machine rows one source may cause per minute: each unauthenticated request for an unseen MAC is one.
        self._new_machines = RateLimit(config.server.new_machines_per_minute)

    def reload(self, config: Config) -> None:
        """Decide from `config` from the next request on (what needs a restart was kept by the caller)."""
        if config.server.templates_dir != self.config.server.templates_dir:
            self.templates = Templates(config.server.templates_dir)
        self.config = config

    # -- deciding -------------------------------------------------------------------------------

    def boot_spec(self, mac: str, facts: dict[str, str] | None = None) -> BootSpec:
        """The most specific group whose selector the machine matches; ties go to the first listed.

        Selector keys are the machine's configured labels plus what it reports (mac, arch, platform).
        """
        facts = facts or {}
        machine = self.config.machines.get(mac)
        matching = self._matching_groups(mac, facts)
        if not matching:
            known = "a configured machine" if machine else "an unknown machine"
            return BootSpec(mac, None, None, f"{mac} is {known} and no group matches it", machine, facts)
        best = max(matching, key=lambda g: len(g.selector))  # max() keeps the first of equals
        why = (", ".join(f"{k}={v}" for k, v in sorted(best.selector.items())) or "no selector: matches all")
        others = [g.name for g in matching if g is not best]
        reason = f"group {best.name} ({why})" + (f"; also matched, less specific: {', '.join(others)}"
                                                 if others else "")
        return BootSpec(mac, self.config.profiles[best.profile], best.name, reason, machine, facts)

    def _matching_groups(self, mac: str, facts: dict[str, str]) -> list[Group]:
        machine = self.config.machines.get(mac)
        attributes = {**(machine.labels if machine else {}), **facts, "mac": mac}
        return [g for g in self.config.groups if all(attributes.get(k) == v for k, v in g.selector.items())]

    def group_of(self, mac: str, arch: str | None, platform: str | None) -> str | None:
        """boot_spec(...).group for these facts, remembered until the config changes: a job lists its
        group's members, which asks this of every machine (28 ms per job with 1,000 machines before)."""
        if self._groups_for is not self.config:
            self._groups_for, self._groups = self.config, {}
        key = (mac, arch, platform)
        if key not in self._groups:
            facts = {k: v for k, v in (("arch", arch), ("platform", platform)) if v is not None}
            matching = self._matching_groups(mac, facts)
            self._groups[key] = max(matching, key=lambda g: len(g.selector)).name if matching else None
        return self._groups[key]

    def hostname(self, mac: str) -> str:
        """The machine's name everywhere (its script, its node config, its deployment, the pages): the one under
        [machines], else one made from its MAC."""
        machine = self.config.machines.get(mac)
        return (machine.hostname if machine else None) or f"node-{hyphenated(mac).replace('-', '')}"

    def selector_facts(self, facts: dict[str, str]) -> dict[str, str]:
        """What of a machine's reported facts groups select on."""
        return {k: v for k, v in facts.items() if k in FACT_KEYS}

    def job_context(self, mac: str, group: str | None, profile: str, hostname: str) -> dict[str, Any]:
        """Template context for a machine's config files: the machine and every member of its group (a Raft peer
        list). Members are the machines configured under [machines] and those admitted by an accepted phone-home:
        a MAC that only asked for files, as anyone on the boot network may, is no member of anything."""
        members = []
        known = {m.mac: m for m in self.store.members()}
        for other in sorted(set(known) | set(self.config.machines)):
            member = known.get(other)
            if self.group_of(other, member and member.arch, member and member.platform) != group:
                continue
            machine = self.config.machines.get(other)
            members.append({"mac": other, "hostname": self.hostname(other), "ip": member.ip if member else None,
                            "labels": machine.labels if machine else {}})
        me = next(m for m in members if m["mac"] == mac)
        return {"node": me, "group": members, "group_name": group, "profile": profile, "hostname": hostname}

    @staticmethod
    def firmware_binary(client_arch: int) -> str:
        """The iPXE binary to chainload for a PXE firmware of this option-93 architecture."""
        try:
            return FIRMWARE_BINARIES[client_arch]
        except KeyError:
            raise NotFound(f"no iPXE binary for client architecture {client_arch}") from None

    def dhcp_boot(self, mac: str, client_arch: int | None, is_ipxe: bool, http_client: bool, urls: Urls, *,
                  detail: dict[str, Any] | None = None) -> DhcpBoot | None:
        """What a DHCP answer tells this machine to boot; None: it may not be answered at all.

        Firmware gets an iPXE binary by name over TFTP, a UEFI HTTP-boot client gets it as a URL, iPXE
        itself gets the bootstrap script (or it would chainload itself forever). `client_arch` None:
        not a PXE client (an OS's own DHCP client), which gets an address only. `detail` (what the client
        said: its decoded DHCP options) is recorded in the `dhcp` event beside our answer.
        """
        mac = canonical_mac(mac)
        # DHCP's sender is no address (0.0.0.0, or the relay): every unseen MAC draws on one budget. Over it
        # the client is still answered, only not recorded: a flood of invented MACs must not stop real boots.
        record = self.store.node(mac) is not None or self._new_machines.allow("dhcp")
        if self.config.dhcp.answer == "known" and mac not in self.config.machines:
            answer = None
            reason = "not answered: not in [machines] and [dhcp] answer is \"known\""
        elif is_ipxe:
            answer = DhcpBoot(f"{urls.api}/boot.ipxe", reason="iPXE: the bootstrap script")
        elif client_arch is None:
            answer = DhcpBoot(None, reason="not a PXE client: an address only")
        else:
            answer = self._firmware_answer(client_arch, http_client, urls)
        if answer is not None:
            reason = answer.reason
        if record:
            self.store.record(mac, "dhcp", {**(detail or {}), "bootfile": answer.bootfile if answer else None,
                                            "answer": reason})
        else:
            log.warning("dhcp: %s not recorded: over [server] new_machines_per_minute of unseen MACs", mac)
        return answer

    def _firmware_answer(self, client_arch: int, http_client: bool, urls: Urls) -> DhcpBoot:
        http = http_client or client_arch in HTTP_BOOT_ARCHES
        try:
            name = self.firmware_binary(HTTP_BOOT_ARCHES.get(client_arch, client_arch))
        except NotFound as exc:
            return DhcpBoot(None, reason=f"no boot file: {exc}")
        if http:
            return DhcpBoot(f"{urls.api}/ipxe/{name}", http=True, reason=f"UEFI HTTP boot: {name} over HTTP")
        return DhcpBoot(name, reason=f"PXE firmware, architecture {client_arch}: {name} over TFTP")

    # -- serving ----------------------------------------------------------------------------------

    def bootstrap(self, urls: Urls) -> Payload:
        """The script every machine fetches first; it chains to the machine's own script by MAC."""
        text = self.templates.render("bootstrap.ipxe.j2", files_url=urls.files, api_url=urls.api)
        return Payload("boot.ipxe", data=text.encode())

    def machine_script(self, mac_text: str, reported: dict[str, str], urls: Urls,
                       transport: str, client_ip: str | None = None) -> Payload:
        """The iPXE script for one machine, recorded as an event whatever it says.

        `client_ip`: the address asking, which the boot's phone-home token is bound to. A token is issued only
        while the machine's provisioning window is open, and only to one address at a time: a second address
        claiming the MAC while the first one's token is live is a conflict, refused and shown, never a silent
        winner (with enroll = "open" the first claimant keeps its token; otherwise both claims are held).
        """
        mac = canonical_mac(mac_text)
        facts = clean_facts(reported)
        node = self.store.node(mac)
        if node is None:
            self._admit_new(mac, client_ip)
        if node is not None and node.state == State.DEPLOYED and not node.reprovision:
            return self._local_disk(mac, facts, transport)
        spec = self.boot_spec(mac, self.selector_facts(facts))
        missing = self._missing_assets(spec.profile)
        if spec.profile is None or missing:
            reason = spec.reason if spec.profile is None else (
                f"profile {spec.profile.name} needs {', '.join(missing)}, which is missing on the server "
                f"(for the default agent image: run `bootserver image build`)")
            self.store.record(mac, "no-boot", {"reason": reason, "transport": transport}, facts=facts)
            # The machine itself is told the same whether or not we know it: the event log says why.
            return self._noboot(mac, f"no profile for {mac}" if spec.profile is None else reason)
        detail = {"profile": spec.profile.name, "group": spec.group, "reason": spec.reason, "transport": transport}
        token = record = None
        if spec.profile.kernel:  # a booting OS may phone home: give this boot its own one-time token
            refusal = self._no_token(mac, node, facts, transport, client_ip, urls)
            if refusal is not None:
                return refusal
            token, record = tokens.new_token(mac, self.config.server.token_minutes, client_ip,
                                             uuid=_firmware_uuid(facts))
            detail |= {"token_issued": record.id, "token_expires": record.expires}  # the id, never the secret
        self.store.record(mac, "script-served", detail, state=State.SCRIPT_SERVED, facts=facts, token=record)
        text = self.render_profile(spec, urls, token)
        return Payload(f"{hyphenated(mac)}.ipxe", data=text.encode(), mac=mac)

    async def machine_script_kept(self, mac_text: str, reported: dict[str, str], urls: Urls, transport: str,
                                  client_ip: str | None = None) -> Payload:
        """machine_script, returned once the store has kept what it recorded (the token it carries): it shares one
        COMMIT with the other requests of this event-loop turn (Store.group_commit), for the servers that can wait."""
        with self.store.group_commit() as committed:
            payload = self.machine_script(mac_text, reported, urls, transport, client_ip)
        await committed
        return payload

    def _admit_new(self, mac: str, client_ip: str | None) -> None:
        """An unseen MAC becomes a row in the store: only so many a minute from one source."""
        if not self._new_machines.allow(tokens.client_address(client_ip) or "unknown"):
            raise TooManyRequests(f"{client_ip} introduced more than {self.config.server.new_machines_per_minute} "
                                  f"new machines in a minute ([server] new_machines_per_minute): try again later")

    def _no_token(self, mac: str, node: Node | None, facts: dict[str, str], transport: str,
                  client_ip: str | None, urls: Urls) -> Payload | None:
        """Why this boot gets no token (a script that says so, recorded), or None when it may have one."""
        if node is not None and node.state in IN_PROGRESS:
            reason = f"{mac} is being provisioned ({node.state}): a script asked for now is not its own boot"
            self.store.record(mac, "no-boot", {"reason": reason, "transport": transport, "from": client_ip})
            return self._noboot(mac, reason)
        opened = window(self.config, mac, node)
        if not opened.open:
            return self._wait(mac, node, facts, transport, opened.reason, urls)
        live = self.store.live_token(mac)
        here = tokens.client_address(client_ip)
        if live is not None and live.ip is not None and here is not None and live.ip != here:
            return self._conflict(mac, live.ip, here, live.id, transport)
        return None

    def _wait(self, mac: str, node: Node | None, facts: dict[str, str], transport: str, reason: str,
              urls: Urls) -> Payload:
        """No window: the machine waits and asks again. Recorded once per wait, not once per poll."""
        if node is not None and node.state == State.NEW:
            self.store.touch(mac, facts)
        else:
            state = State.NEW if node is None or node.state != State.DEPLOYED else None
            self.store.record(mac, "waiting", {"reason": reason, "transport": transport}, facts=facts, state=state)
        text = self.templates.render("wait.ipxe.j2", mac=mac, reason=reason, files_url=urls.files)
        return Payload(f"{hyphenated(mac)}.ipxe", data=text.encode(), mac=mac)

    def _conflict(self, mac: str, first: str, second: str, token_id: str, transport: str) -> Payload:
        detail = {"first": first, "second": second, "live_token": token_id, "transport": transport}
        if self.config.server.enroll == "open":
            reason = (f"{second} claimed {mac} while {first} holds this boot's token: refused; with [server] enroll "
                      f"\"open\" the first claimant keeps it")
            self.store.record(mac, "claim-conflict", {**detail, "held": False, "reason": reason})
        else:
            reason = f"{first} and {second} both claimed {mac}"
            self.store.hold(mac, reason, {**detail, "held": True, "reason": f"{reason}: both claims held"})
        return self._noboot(mac, reason)

    def _noboot(self, mac: str, reason: str) -> Payload:
        text = self.templates.render("noboot.ipxe.j2", mac=mac, reason=reason)
        return Payload(f"{hyphenated(mac)}.ipxe", data=text.encode(), mac=mac)

    def _local_disk(self, mac: str, facts: dict[str, str], transport: str) -> Payload:
        reason = "deployed: boots its local disk (bootserver reprovision MAC to run the flow again)"
        self.store.record(mac, "script-served", {"profile": "local-disk", "reason": reason, "transport": transport},
                          facts=facts)
        text = self.templates.render("localdisk.ipxe.j2", mac=mac, platform=facts.get("platform", ""))
        return Payload(f"{hyphenated(mac)}.ipxe", data=text.encode(), mac=mac)

    def render_profile(self, spec: BootSpec, urls: Urls, token: str | None = None) -> str:
        assert spec.profile is not None
        context = {
            "mac": spec.mac,
            "mac_hyphenated": hyphenated(spec.mac),
            "hostname": self.hostname(spec.mac),
            "labels": spec.machine.labels if spec.machine else {},
            "facts": spec.facts,
            "platform": spec.facts.get("platform", ""),
            "files_url": urls.files,
            "api_url": urls.api,
            "token": token or "TOKEN",
            "overlay_name": OVERLAY_NAME,
        }
        cmdline = self.templates.render_string(spec.profile.cmdline, **context)
        return self.templates.render(spec.profile.template, profile=spec.profile, group=spec.group,
                                     cmdline=cmdline, **context)

    def boot_file(self, mac_text: str, name: str) -> Payload:
        """A kernel or initrd by asset name, for one machine."""
        mac = canonical_mac(mac_text)
        path = self.config.assets.get(name)
        if path is None:
            raise NotFound(f"no asset named {name!r}")
        if not path.is_file():
            raise NotFound(f"asset {name!r} is configured as {path}, which does not exist")
        return Payload(name, path=path, mac=mac)

    def node_config(self, mac_text: str, token: str, urls: Urls) -> dict[str, Any]:
        """What a booting node needs to be reached and to call home; only for a live token of this boot."""
        mac = canonical_mac(mac_text)
        token_id, secret = tokens.split(token)
        tokens.check(self.store.token(token_id), secret, mac)
        return {
            "mac": mac,
            "hostname": self.hostname(mac),
            "url": urls.api,
            "peers": " ".join(self.config.server.peers),  # other replicas, space-separated (a flat field for sh)
            "token": token,
            "authorized_keys": [self.keys.ssh_public, *self.config.server.ssh_keys],
        }

    def overlay(self, mac_text: str, token: str, urls: Urls) -> Payload:
        """The node config as an initrd overlay (cpio), for any Linux initramfs."""
        config = self.node_config(mac_text, token, urls)
        return Payload(OVERLAY_NAME, data=overlay_cpio(config), mac=config["mac"])

    def phone_home(self, mac_text: str, report: dict[str, Any], client_ip: str | None = None) -> Node:
        """A booted node calls back: check its one-time token, pin its host key, hand it to provisioning.

        `client_ip`: the address the call came from, which is where provisioning will connect (the reported
        `ip` is only recorded). Refusals (missing, unknown, expired, replayed or another machine's token, a call
        from another address than the one that fetched the boot script or than the one leased to the MAC, held
        claims, a UUID other than the firmware's) change nothing but the event log, and raise Unauthorized or
        Forbidden for the protocol to answer.
        """
        mac = canonical_mac(mac_text)
        node = self.store.node(mac)
        try:
            peer = strict_ip(client_ip, "the caller's address")
            token_id, secret = tokens.split(report.get("token"))
            token = tokens.check(self.store.token(token_id), secret, mac, ip=peer)
            if node is not None and node.held:
                raise Forbidden(f"{mac}'s claims are held ({node.held}): an operator must approve it")
            (host_key, fingerprint) = _host_key(report.get("host_key"))
            reported_ip = strict_ip(report["ip"]) if report.get("ip") is not None else None
            self._check_lease(mac, peer)
            smbios = self._check_uuid(mac, token.uuid, report.get("uuid"))
        except (Unauthorized, Forbidden, BadRequest) as exc:
            if node is not None:  # a refusal for a MAC never seen makes no machine row
                self.store.record(mac, "refused", {"what": "phone-home", "reason": str(exc), "from": client_ip})
            raise
        detail = {"ip": peer, "reported_ip": reported_ip, "uuid": smbios, "fingerprint": fingerprint,
                  "kernel": str(report.get("kernel", ""))[:MAX_FACT_LENGTH], "disks": _disks(report.get("disks"))}
        if not self.store.phoned_home(token_id, mac, peer, host_key, detail):
            reason = "this token was used already (a concurrent phone-home won), or the machine's claims are held"
            self.store.record(mac, "refused", {"what": "phone-home", "reason": reason, "from": client_ip})
            raise Forbidden(reason)
        self.on_phoned_home(mac)
        node = self.store.node(mac)
        assert node is not None
        return node

    async def phone_home_kept(self, mac_text: str, report: dict[str, Any], client_ip: str | None = None) -> Node:
        """phone_home, returned once the store has kept it (the spent token, the queued job): group commit."""
        with self.store.group_commit() as committed:
            node = self.phone_home(mac_text, report, client_ip)
        await committed
        return node

    def _check_lease(self, mac: str, peer: str) -> None:
        """As the segment's DHCP server we know each MAC's address: a call from any other is not that machine."""
        if self.config.dhcp.mode != "full":
            return
        lease = self.store.lease_of(mac)
        if lease is None or lease.ip != peer:
            held = f"holds {lease.ip}" if lease is not None else "holds no lease"
            raise Forbidden(f"phone-home from {peer}, but {mac} {held} from our DHCP server")

    def _check_uuid(self, mac: str, at_script: str | None, reported: object) -> str | None:
        """The SMBIOS UUID the agent read must be the one the firmware reported with its script, and the one
        pinned in [machines] if any: a MAC is easy to claim, the machine's UUID less so."""
        smbios = canonical_uuid(reported)
        machine = self.config.machines.get(mac)
        expected = [(what, value) for what, value in (("pinned in [machines]", machine and machine.uuid),
                                                      ("reported by the firmware", at_script)) if value]
        for what, value in expected:
            if smbios is None or not same_uuid(smbios, value):
                raise Forbidden(f"SMBIOS UUID {smbios or '(none)'} is not the one {what} ({value})")
        return smbios

    def reprovision(self, mac_text: str) -> None:
        """Send a machine through the whole flow on its next boot; its disk may be wiped. Opens its window."""
        mac = canonical_mac(mac_text)
        if self.store.node(mac) is None:
            raise NotFound(f"no machine {mac} has booted from this server")
        self.store.open_window(mac, self._window_end(), "reprovision-requested", self._window_detail(),
                               state=State.REPROVISION, reprovision=True)

    def approve(self, mac_text: str) -> None:
        """Open the machine's provisioning window for `[server] window_minutes` (seen or not yet), and let go
        of held claims: its next boot gets a token, its first accepted phone-home closes the window."""
        self.store.open_window(canonical_mac(mac_text), self._window_end(), "approved", self._window_detail())

    def _window_end(self) -> float:
        return time.time() + self.config.server.window_minutes * 60

    def _window_detail(self) -> dict[str, Any]:
        return {"window_minutes": self.config.server.window_minutes}

    def boot_from_disk(self, mac_text: str) -> None:
        """Boot the machine's local disk from its next boot on, as if deployed; nothing is provisioned."""
        mac = canonical_mac(mac_text)
        if self.store.node(mac) is None:
            raise NotFound(f"no machine {mac} has booted from this server")
        self.store.set_reprovision(mac, False)
        self.store.record(mac, "boot-from-disk-requested", {}, state=State.DEPLOYED)

    def ipxe_binary(self, name: str) -> Payload:
        """An iPXE binary for chainloading, from the configured iPXE directory."""
        if name not in IPXE_BINARIES:
            raise NotFound(f"{name!r} is not an iPXE binary bootserver serves")
        path = self.config.server.ipxe_dir / name
        if not path.is_file():
            raise NotFound(f"{path} is missing: install Debian's ipxe package or set server.ipxe_dir")
        return Payload(name, path=path)

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Liveness and what needs a person. `ok` is true whenever this answers at all (the process serves, so a
        supervisor must not restart it); `problems` names what does not work, in words to act on."""
        server = self.config.server
        return {
            "ok": True,
            "problems": self.problems(),
            "missing_assets": sorted(n for n, p in self.config.assets.items() if not p.is_file()),
            "ipxe_binaries": sorted(p.name for p in server.ipxe_dir.glob("*") if p.suffix in (".efi", ".kpxe")),
            "tftp_root": str(server.tftp_root) if server.tftp_root.is_dir() else None,
        }

    def problems(self) -> list[str]:
        found = []
        root = self.config.server.tftp_root
        if self.config.server.tftp is not None and not root.is_dir():
            found.append(f"tftp root {root} is missing: files under it are not served over TFTP (boot scripts, "
                         f"kernels and iPXE binaries still are); recreate it with mkdir")
        if self.store.problem is not None:
            found.append(self.store.problem)
        return found

    # -- recording ------------------------------------------------------------------------------

    def file_sent(self, payload: Payload, protocol: str, sent: int, seconds: float,
                  error: str | None = None) -> None:
        """A protocol finished sending `payload` (or gave up). Files of a machine become its events.

        The file is gone already, so a store that cannot record it is only logged (by the store).
        """
        if payload.mac is None:
            return
        with contextlib.suppress(StoreUnavailable):
            if self.store.node(payload.mac) is None:  # anyone may fetch a kernel: no machine row for that
                log.debug("%s sent for %s, a MAC that never asked for its script: not recorded", payload.name,
                          payload.mac)
                return
            self._record_file(payload, protocol, sent, seconds, error)

    def _record_file(self, payload: Payload, protocol: str, sent: int, seconds: float, error: str | None) -> None:
        assert payload.mac is not None
        detail = {"file": payload.name, "protocol": protocol, "bytes": sent, "size": payload.size,
                  "seconds": round(seconds, 3)}
        if error:
            self.store.record(payload.mac, "file-failed", {**detail, "error": error})
            return
        profile_kernel = {p.kernel for p in self.config.profiles.values()}
        state = State.KERNEL_SERVED if payload.name in profile_kernel and sent == payload.size else None
        self.store.record(payload.mac, "file-served", detail, state=state, only_from=KERNEL_FROM)

    def _missing_assets(self, profile: Profile | None) -> list[str]:
        if profile is None:
            return []
        names = ([profile.kernel] if profile.kernel else []) + list(profile.initrd)
        # os.path, not Path(...): constructing a Path per asset was a fifth of a boot script's cost.
        return [f"{n} ({self.config.assets[n]})" for n in names if not os.path.isfile(self.config.assets[n])]


def _host_key(value: object) -> tuple[str, str]:
    """The node's SSH host key as one OpenSSH line, checked to be a key, and its SHA256 fingerprint."""
    try:
        key = asyncssh.import_public_key(str(value))
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise BadRequest("host_key is not an OpenSSH public key line (ssh-ed25519 AAAA...)") from None
    return key.export_public_key("openssh").decode().strip(), key.get_fingerprint("sha256")


def _disks(value: object) -> list[dict[str, Any]]:
    """What the node reported about its disks, kept small and typed for the event log."""
    if not isinstance(value, list):
        return []
    disks = []
    for disk in value[:32]:
        if isinstance(disk, dict) and isinstance(disk.get("name"), str):
            disks.append({"name": disk["name"][:32], "size_bytes": _count(disk.get("size_bytes")),
                          "partitions": _count(disk.get("partitions"))})
    return disks


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _firmware_uuid(facts: dict[str, str]) -> str | None:
    """The UUID iPXE reported, if it is one: an older bootstrap (or iPXE's :uristring) may send garbage, which
    then counts as no UUID reported, so that only a pinned [machines] uuid is checked for this boot."""
    try:
        return canonical_uuid(facts.get("uuid"))
    except BadRequest:
        return None


def clean_facts(reported: dict[str, str]) -> dict[str, str]:
    """What a machine reported about itself, reduced to known keys and sane printable values.

    Unset iPXE variables arrive as empty strings; they are dropped, not stored.
    """
    facts = {}
    for key in REPORTED_FACTS:
        value = reported.get(key, "")
        if not value:
            continue
        if len(value) > MAX_FACT_LENGTH or not value.isprintable():
            raise BadRequest(f"reported {key} is not a printable string of at most "
                             f"{MAX_FACT_LENGTH} characters")
        facts[key] = value
    return facts
