"""Who gets a phone-home token and who may phone home: provisioning windows, approvals, claims.

The core asks here before a boot script carries a token (Booter.machine_script) and before it accepts a
phone-home (Booter.phone_home); operators open windows here (approve, reprovision). Every refusal is recorded in
the machine's timeline, in words to act on. The pure rules (what a window is, which addresses and UUIDs we
believe) are in admission.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from . import tokens
from .admission import canonical_uuid, same_uuid, strict_ip, window
from .config import Config
from .errors import BadRequest, Forbidden, NotFound, Unauthorized
from .facts import boot_report, disks, host_key, kernel, secure_boot
from .lifecycle import FROM_DISK, IN_PROGRESS, State
from .store import Node, Store


@dataclass(frozen=True)
class NoToken:
    """Why a boot gets no token (recorded already): it waits and asks again, or it boots nothing from us."""

    reason: str
    wait: bool = False


@dataclass(frozen=True)
class Enrollment:
    config: Config
    store: Store
    signer: tokens.Signer

    def token_refusal(self, mac: str, node: Node | None, facts: dict[str, str], transport: str,
                      client_ip: str | None) -> NoToken | None:
        """Why this boot may not carry a token, or None when it may.

        Only while the machine's provisioning window is open, and only to one address at a time: a second address
        claiming the MAC while the first one's token is live is a conflict, refused and shown, never a silent
        winner (with enroll = "open" the first claimant keeps its token; otherwise both claims are held).
        """
        if node is not None and node.state in IN_PROGRESS:
            reason = f"{mac} is being provisioned ({node.state}): a script asked for now is not its own boot"
            self.store.record(mac, "no-boot", {"reason": reason, "transport": transport, "from": client_ip})
            return NoToken(reason)
        opened = window(self.config, mac, node)
        if not opened.open:
            self._wait(mac, node, facts, transport, opened.reason)
            return NoToken(opened.reason, wait=True)
        live = self.store.live_token(mac)
        here = tokens.client_address(client_ip)
        if live is not None and live.ip is not None and here is not None and live.ip != here:
            return NoToken(self._conflict(mac, live.ip, here, live.id, transport))
        return None

    def _wait(self, mac: str, node: Node | None, facts: dict[str, str], transport: str, reason: str) -> None:
        """No window: the machine waits and asks again. Recorded once per wait, not once per poll."""
        if node is not None and node.state == State.NEW:
            self.store.touch(mac, facts)
        else:
            state = State.NEW if node is None or node.state not in FROM_DISK else None
            self.store.record(mac, "waiting", {"reason": reason, "transport": transport}, facts=facts, state=state)

    def _conflict(self, mac: str, first: str, second: str, token_id: str, transport: str) -> str:
        detail = {"first": first, "second": second, "live_token": token_id, "transport": transport}
        if self.config.server.enroll == "open":
            reason = (f"{second} claimed {mac} while {first} holds this boot's token: refused; with [server] enroll "
                      f"\"open\" the first claimant keeps it")
            self.store.record(mac, "claim-conflict", {**detail, "held": False, "reason": reason})
        else:
            reason = f"{first} and {second} both claimed {mac}"
            self.store.hold(mac, reason, {**detail, "held": True, "reason": f"{reason}: both claims held"})
        return reason

    # -- phone-home -------------------------------------------------------------------------------------

    def phone_home(self, mac: str, report: dict[str, Any], client_ip: str | None) -> Node:
        """Check a booted node's one-time token, pin its host key, queue its job; the node as it is now.

        `client_ip`: the address the call came from, which is where provisioning will connect (the reported
        `ip` is only recorded). Refusals (missing, unknown, expired, replayed or another machine's token, a call
        from another address than the one that fetched the boot script or than the one leased to the MAC, held
        claims, a UUID other than the firmware's) change nothing but the event log, and raise Unauthorized,
        Forbidden or BadRequest.
        """
        node = self.store.node(mac)
        try:
            peer = strict_ip(client_ip, "the caller's address")
            token = tokens.check(report.get("token"), mac, self.signer, self.store.token, ip=peer)
            if node is not None and node.held:
                raise Forbidden(f"{mac}'s claims are held ({node.held}): an operator must approve it")
            (key, fingerprint) = host_key(report.get("host_key"))
            reported_ip = strict_ip(report["ip"]) if report.get("ip") is not None else None
            self._check_lease(mac, peer)
            smbios = self._check_uuid(mac, token.uuid, report.get("uuid"))
        except (Unauthorized, Forbidden, BadRequest) as exc:
            if node is not None:  # a refusal for a MAC never seen makes no machine row
                self.store.record(mac, "refused", {"what": "phone-home", "reason": str(exc), "from": client_ip})
            raise
        detail = {"ip": peer, "reported_ip": reported_ip, "uuid": smbios, "fingerprint": fingerprint,
                  "kernel": kernel(report.get("kernel", "")), "disks": disks(report.get("disks")),
                  "secure_boot": secure_boot(report.get("secure_boot"))}
        if not self.store.phoned_home(token, peer, key, detail, _read_facts(detail)):
            reason = "this token was used already (a concurrent phone-home won), or the machine's claims are held"
            self.store.record(mac, "refused", {"what": "phone-home", "reason": reason, "from": client_ip})
            raise Forbidden(reason)
        node = self.store.node(mac)
        assert node is not None
        return node

    def os_booted(self, mac: str, report: dict[str, Any], client_ip: str | None) -> Node:
        """The installed OS reports its first boot with the one-time token the install put on its disk (its own
        kind: an agent's token cannot report a boot): the machine is `booted` and its health-check job queued.
        Refused like a phone-home: the event log says why, nothing else changes."""
        node = self.store.node(mac)
        try:
            peer = strict_ip(client_ip, "the caller's address")
            token = tokens.check(report.get("token"), mac, self.signer, self.store.token, purpose="report")
            self._check_lease(mac, peer)
        except (Unauthorized, Forbidden, BadRequest) as exc:
            if node is not None:
                self.store.record(mac, "refused", {"what": "boot report", "reason": str(exc), "from": client_ip})
            raise
        detail = {"ip": peer, **boot_report(report)}
        if not self.store.os_reported(token.id, mac, peer, detail, _read_facts(detail)):
            reason = "this report token was used already (a concurrent report won)"
            self.store.record(mac, "refused", {"what": "boot report", "reason": reason, "from": client_ip})
            raise Forbidden(reason)
        node = self.store.node(mac)
        assert node is not None
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

    # -- operators --------------------------------------------------------------------------------------

    def reprovision(self, mac: str) -> None:
        """Send a machine through the whole flow on its next boot; its disk may be wiped. Opens its window."""
        self._seen(mac)
        self.store.open_window(mac, self._window_end(), "reprovision-requested", self._window_detail(),
                               state=State.REPROVISION, reprovision=True)

    def approve(self, mac: str) -> None:
        """Open the machine's provisioning window for `[server] window_minutes` (seen or not yet), and let go
        of held claims: its next boot gets a token, its first accepted phone-home closes the window."""
        self.store.open_window(mac, self._window_end(), "approved", self._window_detail())

    def boot_from_disk(self, mac: str) -> None:
        """Boot the machine's local disk from its next boot on, as if deployed; nothing is provisioned."""
        self._seen(mac)
        self.store.set_reprovision(mac, False)
        self.store.record(mac, "boot-from-disk-requested", {}, state=State.DEPLOYED)

    def _seen(self, mac: str) -> None:
        if self.store.node(mac) is None:
            raise NotFound(f"no machine {mac} has booted from this server")

    def _window_end(self) -> float:
        return time.time() + self.config.server.window_minutes * 60

    def _window_detail(self) -> dict[str, Any]:
        return {"window_minutes": self.config.server.window_minutes}


def _read_facts(detail: dict[str, Any]) -> dict[str, str]:
    """What the agent or the installed OS read on the machine that becomes one of its facts (shown on its page,
    in the API and `lab status --json`): Secure Boot on or off, when the firmware said."""
    return {} if detail.get("secure_boot") is None else {"secure_boot": str(detail["secure_boot"]).lower()}
