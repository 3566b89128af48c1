"""The core: decides what each machine gets and records what happened to it.

Every protocol (HTTP, TFTP and DHCP) only translates its wire format into calls on one Booter, the way
Pixiecore's protocol servers all ask one Booter; the pages, the API and the CLI read through Booter.history()
and act through its methods. Nothing here knows about sockets, and nobody else touches the store, the keys or
the config. The rules it applies live beside it: facts.py (what a machine reports), firmware.py (which iPXE
binary), enrollment.py (who gets a token, who may phone home), admission.py (what we believe), plans.py (what
provisioning means under a profile), installer.py (who may fetch a machine's installer files). Some 600 lines
as one thing: every decision a protocol or an operator asks for (power/ runs the BMC calls it decides on).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import grubcfg, installer, tokens
from .admission import RateLimit
from .config import Bmc, Config, Profile
from .enrollment import Enrollment
from .errors import BadRequest, BootserverError, Forbidden, NotFound, StoreUnavailable, TooManyRequests
from .facts import clean_facts, firmware_uuid, selector_facts
from .firmware import DhcpBoot, dhcp_answer, ipxe_binary, secure_boot_binary
from .fleet import Fleet
from .groups import BootSpec, Groups
from .history import History
from .lifecycle import FROM_DISK, KERNEL_FROM, RUNS_INSTALLED_OS, SCRIPT_FROM, State
from .mac import canonical_mac, hyphenated
from .overlay import OVERLAY_NAME, overlay_cpio
from .payload import Payload, resolve_under
from .plans import HealthJob, Plans
from .power import POWER_ACTIONS, BmcError, PowerControl, PowerState
from .power.control import BootOverrideLost
from .provision.jobs import Provisioner
from .provision.pki import ServerKeys
from .provision.steps import Job
from .recheck import FilePresence
from .settings import ProvisionSettings, WebSettings
from .siblings import Siblings
from .store import Node, Store
from .templates import Templates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loader:
    """What a machine's own script is written for: iPXE, or GRUB on the Secure Boot chain (the same decisions,
    templates of the same kinds: ipxe/KIND.ipxe.j2 and grub/KIND.cfg.j2)."""

    name: str
    suffix: str

    def template(self, kind: str) -> str:
        return f"{kind}{self.suffix}.j2"

    def profile_template(self, profile: Profile) -> str:
        if self is not GRUB:
            return profile.template
        # A profile that boots no kernel (its iPXE template hands over to the disk) does the same from GRUB.
        return profile.grub_template or self.template("linux" if profile.kernel else "localdisk")


IPXE = Loader("ipxe", ".ipxe")
GRUB = Loader("grub", ".cfg")


@dataclass(frozen=True)
class Urls:
    """Where a machine finds us: `files` over the transport it used, `api` over HTTP for its OS."""

    files: str
    api: str


@dataclass(frozen=True)
class Netboot:
    """What `reprovision --now` or `deploy --now` did to one machine through its BMC."""

    mac: str
    boot_override: str  # "kept", or why not ("lost: ...", "failed: ..."): the power cycle was sent all the same
    error: str | None = None  # the power cycle failed (None: sent)

    def to_json(self) -> dict[str, Any]:
        return {"mac": self.mac, "boot_override": self.boot_override, "error": self.error}


class JobOwner(Protocol):
    """Runs provisioning jobs and reboots: a Provisioner, or a worker's link to the owner process's."""

    def schedule(self, mac: str) -> None: ...

    def reboot_soon(self, mac: str) -> None: ...


# How long a first boot's overlay waits for the machine's first record, written behind by another process (100 ms).
FIRST_RECORD_WAIT_SECONDS = 1.0


class Booter:
    def __init__(self, config: Config, store: Store, templates: Templates, keys: ServerKeys,
                 siblings: Siblings | None = None) -> None:
        """`siblings`: the server's other processes (workers.py), whose figures /metrics and the pages count too."""
        self._store = store
        self._keys = keys
        self._signer = tokens.Signer(keys.token_key)
        self.siblings = siblings or Siblings()
        self._history = History(store, self.siblings)
        self._fleet = Fleet(self._history)  # every machine's latest boot, read from the history
        # Called with a MAC once its node has phoned home and may be provisioned (set by provisioner()).
        self._on_phoned_home: Callable[[str], None] = lambda mac: None
        self._on_reprovision: Callable[[str], None] = lambda mac: None  # reboots an installed OS (provisioner())
        # New machine rows one source may cause per minute: each unseen MAC an unauthenticated request names is one.
        self._new_machines = RateLimit(config.server.new_machines_per_minute)
        self._assets = FilePresence()  # is each profile's kernel and initrd there, asked once a second at most
        self._use(config, templates)
        server = config.server
        self._power = PowerControl(store, self._bmc, server.secret_key_path, timeout=server.bmc_timeout_seconds,
                                   concurrency=server.bmc_concurrency, siblings=self.siblings)

    def _use(self, config: Config, templates: Templates) -> None:
        self._config = config
        self._templates = templates
        self._enrollment = Enrollment(config, self._store, self._signer)
        self._web_settings = WebSettings.of(config)
        self._groups = Groups(config)
        self._plans = Plans(config, self._store, self._groups, self.hostname)
        # matching()'s answers, by filter, with the newest event id they were computed at: facts change only with
        # an event, and going over every machine's facts takes a 10,000-machine site a few hundred ms.
        self._matched: dict[tuple[str | None, str | None], tuple[int, set[str]]] = {}

    def reload(self, config: Config) -> None:
        """Decide from `config` from the next request on (what needs a restart was kept by the caller)."""
        same = config.server.templates_dir == self._config.server.templates_dir
        self._use(config, self._templates if same else Templates(config.server.templates_dir))

    def close(self) -> None:
        self._power.close()
        self._store.close()

    def provisioner(self, **options: Any) -> Provisioner:
        """The provisioner of this core's machines, on its store and keys, asking it what each job means; an
        accepted phone-home wakes it. `options`: Provisioner's, for tests."""
        provisioner = Provisioner(self._store, self._keys, self, **options)
        self.hand_jobs_to(provisioner)
        return provisioner

    def hand_jobs_to(self, owner: JobOwner) -> None:
        """Who runs what an accepted phone-home queued and an operator's reboot: this process's provisioner, or
        (in a worker process) the owner's, through workers.OwnerLink."""
        self._on_phoned_home = owner.schedule
        self._on_reprovision = owner.reboot_soon

    def figures(self) -> dict[str, Any]:
        """What this process counts in memory only, for the server's other processes (siblings.py)."""
        return {"store": self._store.figures(), "power": self._power.figures()}

    # -- what the servers around the core read ----------------------------------------------------------

    def history(self) -> History:
        """Every machine and event, read-only: for the pages, the API, the streams, /metrics and the CLI."""
        return self._history

    def fleet(self) -> Fleet:
        """Every machine's latest boot, in phases (phases.py): for the waterfall, the fleet page, /metrics, the CLI.
        Call its refresh() to read what was recorded since."""
        return self._fleet

    def web_settings(self) -> WebSettings:
        return self._web_settings

    def provision_settings(self) -> ProvisionSettings:
        return ProvisionSettings.of(self._config)

    # -- deciding -------------------------------------------------------------------------------------

    def boot_spec(self, mac: str, facts: dict[str, str] | None = None) -> BootSpec:
        """What the machine boots given these reported facts, and why (groups.py)."""
        return self._groups.spec(mac, facts)

    def spec_of(self, node: Node) -> BootSpec:
        """What a machine we have seen boots now, by what it last reported."""
        return self._groups.spec(node.mac, selector_facts(node.facts))

    def matching(self, group: str | None = None, profile: str | None = None) -> set[str] | None:
        """MACs of the machines seen whose group and profile are these now (None: no filter given). A name the
        config does not have is refused, with the names it has."""
        if group is None and profile is None:
            return None
        for what, name, known in (("group", group, [g.name for g in self._config.groups]),
                                  ("profile", profile, list(self._config.profiles))):
            if name is not None and name not in known:
                raise BadRequest(f"no {what} {name[:64]!r} in the config; it has: {', '.join(sorted(known)) or 'none'}")
        newest = self._store.last_event_id()
        cached = self._matched.get((group, profile))
        if cached is not None and cached[0] == newest:
            return cached[1]
        found = set()
        for node in self._store.nodes():
            spec = self.spec_of(node)
            if (group is None or spec.group == group) and (profile is None or (
                    spec.profile is not None and spec.profile.name == profile)):
                found.add(node.mac)
        self._matched[(group, profile)] = (newest, found)
        return found

    def hostname(self, mac: str) -> str:
        """The machine's name everywhere (its script, its node config, its deployment, the pages): the one under
        [machines], else one made from its MAC."""
        return self.configured_hostname(mac) or f"node-{hyphenated(mac).replace('-', '')}"

    def configured_hostname(self, mac: str) -> str | None:
        """The [machines] name only: what DHCP tells an OS (a made-up name would override the OS's own)."""
        machine = self._config.machines.get(mac)
        return machine.hostname if machine else None

    def dhcp_boot(self, mac: str, client_arch: int | None, is_ipxe: bool, http_client: bool, urls: Urls, *,
                  detail: dict[str, Any] | None = None) -> DhcpBoot | None:
        """What a DHCP answer tells this machine to boot (firmware.dhcp_answer); None: it may not be answered at
        all. `detail` (what the client said: its decoded DHCP options) is recorded beside our answer."""
        mac = canonical_mac(mac)
        # DHCP's sender is no address (0.0.0.0, or the relay): every unseen MAC draws on one budget. Over it
        # the client is still answered, only not recorded: a flood of invented MACs must not stop real boots.
        node = self._store.node(mac)
        record = node is not None or self._new_machines.allow("dhcp", item=mac)
        answer = None
        if self._config.dhcp.answer == "known" and mac not in self._config.machines:
            reason = "not answered: not in [machines] and [dhcp] answer is \"known\""
        else:
            secure_boot = self.boot_spec(mac).secure_boot
            answer = dhcp_answer(client_arch, is_ipxe, http_client, urls.api, secure_boot)
            reason = answer.reason
        if record:
            self._store.record(mac, "dhcp", {**(detail or {}), "bootfile": answer.bootfile if answer else None,
                                             "answer": reason})
        else:
            log.warning("dhcp: %s not recorded: over [server] new_machines_per_minute of unseen MACs", mac)
        return answer

    # -- DHCP leases (full mode): the store allocates each in one transaction, never one address twice ----

    def reserved_addresses(self) -> dict[str, str]:
        """[machines] ip by MAC: addresses DHCP hands to that machine and to no other."""
        return {m.mac: str(m.ip) for m in self._config.machines.values() if m.ip is not None}

    def offer_lease(self, mac: str, candidates: list[str], expires: float) -> str | None:
        """Hold an address for `mac`: the one it holds if a candidate, else the first free one; None: all taken."""
        lease = self._store.offer_lease(mac, candidates, expires)
        return lease.ip if lease else None

    def bind_lease(self, mac: str, ip: str, expires: float) -> bool:
        return self._store.bind_lease(mac, ip, expires)

    def release_lease(self, mac: str, ip: str | None = None) -> bool:
        return self._store.release_lease(mac, ip)

    def decline_lease(self, mac: str, ip: str, until: float) -> bool:
        return self._store.decline_lease(mac, ip, until)

    # -- serving --------------------------------------------------------------------------------------

    def bootstrap(self, urls: Urls) -> Payload:
        """The script every machine fetches first; it chains to the machine's own script by MAC."""
        text = self._templates.render("bootstrap.ipxe.j2", files_url=urls.files, api_url=urls.api)
        return Payload("boot.ipxe", data=text.encode())

    def grub_bootstrap(self) -> Payload:
        """What every Secure Boot machine's GRUB reads first ($prefix/grub.cfg): on to its own configuration."""
        return Payload("grub.cfg", data=self._templates.render(GRUB.template("bootstrap")).encode())

    def machine_script(self, mac_text: str, reported: dict[str, str], urls: Urls, transport: str,
                       client_ip: str | None = None, loader: Loader = IPXE, behind: bool = False) -> Payload:
        """The iPXE script for one machine (or its GRUB configuration, `loader` GRUB), recorded as an event whatever
        it says; its writes commit one by one, but with `behind` a script that carries a token is recorded behind
        (Store.record_behind): its signed token works without the record (tokens.py).

        `client_ip`: the address asking, which the boot's phone-home token is bound to. A token is issued only
        when enrollment allows it (Enrollment.token_refusal); otherwise the machine is told to wait or why not.
        """
        mac = canonical_mac(mac_text)
        facts = clean_facts(reported)
        node = self._store.written_node(mac) if behind else self._store.node(mac)
        if node is None:
            self._admit_new(mac, client_ip)
        if node is not None and node.state in FROM_DISK and not node.reprovision:
            return self._local_disk(mac, facts, transport, loader)
        spec = self.boot_spec(mac, selector_facts(facts))
        missing = self._missing_assets(spec.profile)
        if spec.profile is None or missing:
            reason = spec.reason if spec.profile is None else (
                f"profile {spec.profile.name} needs {', '.join(missing)}, which is missing on the server "
                f"(for the default agent image: run `bootserver image build`)")
            self._store.record(mac, "no-boot", {"reason": reason, "transport": transport}, facts=facts)
            # The machine itself is told the same whether or not we know it: the event log says why.
            told = f"no profile for {mac}" if spec.profile is None else reason
            return self._script(mac, loader, "noboot", reason=told)
        detail = {"profile": spec.profile.name, "group": spec.group, "reason": spec.reason, "transport": transport}
        if loader is GRUB:
            detail["loader"] = GRUB.name
        token = record = None
        if spec.profile.kernel:  # a booting OS may phone home: give this boot its own one-time token
            refusal = self._enrollment.token_refusal(mac, node, facts, transport, client_ip)
            if refusal is not None and refusal.wait:
                return self._script(mac, loader, "wait", reason=refusal.reason, files_url=urls.files)
            if refusal is not None:
                return self._script(mac, loader, "noboot", reason=refusal.reason)
            token, record = self._signer.issue(mac, self._config.server.token_minutes, client_ip,
                                               uuid=firmware_uuid(facts))
            detail |= {"token_issued": record.id, "token_expires": record.expires}  # the id, never the token
        if behind and record is not None:
            self._store.record_behind(mac, "script-served", detail, state=State.SCRIPT_SERVED, facts=facts,
                                      token=record, only_from=SCRIPT_FROM)
        else:
            self._store.record(mac, "script-served", detail, state=State.SCRIPT_SERVED, facts=facts, token=record)
        text = self.render_profile(spec, urls, token, loader)
        return Payload(f"{hyphenated(mac)}{loader.suffix}", data=text.encode(), mac=mac)

    async def machine_script_kept(self, mac_text: str, reported: dict[str, str], urls: Urls, transport: str,
                                  client_ip: str | None = None, loader: Loader = IPXE) -> Payload:
        """machine_script for the servers that can wait: a script with a token is recorded behind, and any other
        write shares one COMMIT with the other requests of this event-loop turn (Store.group_commit), returned once
        the store has kept it. A full write-behind queue is waited out (Store.room_behind), not written here."""
        await self._store.room_behind()
        with self._store.group_commit() as committed:
            payload = self.machine_script(mac_text, reported, urls, transport, client_ip, loader, behind=True)
        await committed
        return payload

    def _admit_new(self, mac: str, client_ip: str | None) -> None:
        """An unseen MAC becomes a row in the store: only so many a minute from one source. Counted once per MAC:
        a machine asking again before its first record is written (behind) is not a new one."""
        if not self._new_machines.allow(tokens.client_address(client_ip) or "unknown", item=mac):
            raise TooManyRequests(f"{client_ip} introduced more than {self._config.server.new_machines_per_minute} "
                                  f"new machines in a minute ([server] new_machines_per_minute): try again later")

    def _script(self, mac: str, loader: Loader, kind: str, **context: Any) -> Payload:
        """A machine's own script from one of our templates: no-boot (why not), wait, local disk."""
        text = self._templates.render(loader.template(kind), mac=mac, **context)
        return Payload(f"{hyphenated(mac)}{loader.suffix}", data=text.encode(), mac=mac)

    def _local_disk(self, mac: str, facts: dict[str, str], transport: str, loader: Loader) -> Payload:
        reason = "deployed: boots its local disk (bootserver reprovision MAC to run the flow again)"
        detail = {"profile": "local-disk", "reason": reason, "transport": transport}
        self._store.record(mac, "script-served", detail | ({"loader": GRUB.name} if loader is GRUB else {}),
                           facts=facts)
        return self._script(mac, loader, "localdisk", platform=facts.get("platform", ""))

    def render_profile(self, spec: BootSpec, urls: Urls, token: str | None = None, loader: Loader = IPXE) -> str:
        assert spec.profile is not None
        # GRUB reads the kernel and initrds over HTTP whichever way its configuration came: GRUB 2.12 opens every
        # initrd at `initrd` and reads them only when the kernel's stub asks, seconds later, by which time a TFTP
        # transfer left waiting has timed out (seen in OVMF under TCG).
        context = {**self._machine_context(spec, urls), "token": token or "TOKEN", "overlay_name": OVERLAY_NAME,
                   "grub_root": grubcfg.root(urls.api)}
        cmdline = self._templates.render_string(spec.profile.cmdline, **context)
        return self._templates.render(loader.profile_template(spec.profile), cmdline=cmdline, **context)

    def _machine_context(self, spec: BootSpec, urls: Urls) -> dict[str, Any]:
        """What a machine's script, command line and installer files are rendered with."""
        assert spec.profile is not None
        return {
            "mac": spec.mac,
            "mac_hyphenated": hyphenated(spec.mac),
            "hostname": self.hostname(spec.mac),
            "labels": spec.machine.labels if spec.machine else {},
            "facts": spec.facts,
            "platform": spec.facts.get("platform", ""),
            "profile": spec.profile,
            "group": spec.group,
            "files_url": urls.files,
            "api_url": urls.api,
            "file_url": installer.file_urls(urls.files, spec.mac, spec.profile.files),
        }

    def installer_file(self, mac_text: str, name: str, urls: Urls, transport: str,
                       client_ip: str | None = None) -> Payload:
        """One of the machine's [profiles.X.files], rendered for it, for the address its boot went to and no other
        (installer.py says why). A refusal is an event of a machine we have seen; an unseen MAC makes no row."""
        mac = canonical_mac(mac_text)
        name = installer.checked_name(name)
        node = self._store.node(mac)
        spec = self.spec_of(node) if node is not None else self.boot_spec(mac)
        if spec.profile is None or name not in spec.profile.files:
            reason = spec.reason if spec.profile is None else _no_file(spec.profile, name)
            self._refuse_file(node, name, reason, transport, client_ip)
            raise NotFound(reason)
        refusal = installer.refusal(mac, node, self._store.live_token(mac), client_ip)
        if refusal is not None:
            self._refuse_file(node, name, refusal, transport, client_ip)
            raise Forbidden(refusal)
        try:
            text = self.render_installer_file(spec, name, urls)
        except BootserverError as exc:  # the operator's to fix: shown on the machine's page, not only in the log
            self._store.record(mac, "file-failed", {"file": f"files/{name}", "protocol": transport, "bytes": 0,
                                                    "error": str(exc), "from": client_ip})
            raise
        return Payload(f"files/{name}", data=text.encode(), mac=mac, client=tokens.client_address(client_ip))

    def render_installer_file(self, spec: BootSpec, name: str, urls: Urls) -> str:
        """One of the profile's installer files as the machine gets it: served by installer_file, previewed by the
        CLI (`bootserver render MAC --file NAME`)."""
        assert spec.profile is not None
        path = spec.profile.files.get(name)
        if path is None:
            raise NotFound(_no_file(spec.profile, name))
        if not path.is_file():
            raise NotFound(f"profile {spec.profile.name}'s file {name!r} is configured as {path}, which does not exist")
        return self._templates.render_file(path, self._machine_context(spec, urls))

    def _refuse_file(self, node: Node | None, name: str, reason: str, transport: str, client_ip: str | None) -> None:
        if node is not None:  # a refusal for a MAC never seen makes no machine row
            self._store.record(node.mac, "refused", {"what": f"file {name}", "reason": reason,
                                                     "transport": transport, "from": client_ip})

    def boot_file(self, mac_text: str, name: str) -> Payload:
        """A kernel or initrd by asset name, for one machine."""
        mac = canonical_mac(mac_text)
        path = self._config.assets.get(name)
        if path is None:
            raise NotFound(f"no asset named {name!r}")
        if not path.is_file():
            raise NotFound(f"asset {name!r} is configured as {path}, which does not exist")
        return Payload(name, path=path, mac=mac)

    def ipxe_binary(self, name: str, client_ip: str | None = None) -> Payload:
        """An iPXE binary for chainloading, from the configured iPXE directory; recorded as the machine's when
        `client_ip` holds one of our leases (full DHCP mode): where a firmware's chain stopped shows then."""
        payload = ipxe_binary(name, self._config.server.ipxe_dir)
        return dataclasses.replace(payload, mac=self._leased_to(client_ip))

    def secure_boot_binary(self, name: str, client_ip: str | None = None) -> Payload:
        """The signed shim or GRUB of the Secure Boot chain; recorded as ipxe_binary is."""
        payload = secure_boot_binary(name, self._config.server.secure_boot_files)
        return dataclasses.replace(payload, mac=self._leased_to(client_ip))

    def _leased_to(self, client_ip: str | None) -> str | None:
        """The MAC our DHCP bound `client_ip` to, if it is bound now: firmware fetching its first file has no other
        name. Without our leases (proxy mode) there is none."""
        if client_ip is None or self._config.dhcp.mode != "full":
            return None
        lease = self._store.lease_at(client_ip)
        return lease.mac if lease and lease.state == "bound" and lease.expires > time.time() else None

    def tftp_file(self, path: str) -> Payload:
        """A file under the TFTP root (data_dir/tftp), by its path there; never one outside it."""
        return Payload(path, path=resolve_under(self._config.server.tftp_root, path))

    def node_config(self, mac_text: str, token: str, urls: Urls) -> dict[str, Any]:
        """What a booting node needs to be reached and to call home; only for a live token of this boot."""
        mac = canonical_mac(mac_text)
        tokens.check(token, mac, self._signer, self._store.token)
        return {
            "mac": mac,
            "hostname": self.hostname(mac),
            "url": urls.api,
            "peers": " ".join(self._config.server.peers),  # other replicas, space-separated (a flat field for sh)
            "token": token,
            "authorized_keys": [self._keys.ssh_public, *self._config.server.ssh_keys],
        }

    def overlay(self, mac_text: str, token: str, urls: Urls) -> Payload:
        """The node config as an initrd overlay (cpio), for any Linux initramfs."""
        config = self.node_config(mac_text, token, urls)
        return self._overlay(config, self._store.node(config["mac"]))

    async def overlay_kept(self, mac_text: str, token: str, urls: Urls) -> Payload:
        """overlay() for the servers that can wait. Its padding depends on the machine's platform, which a first
        boot's script recorded; another process of this server (or a replica) may have served that script, its
        record still in that process's write-behind queue (WRITE_BEHIND_SECONDS): a live token's overlay waits up
        to FIRST_RECORD_WAIT_SECONDS for the machine's row rather than guess. The token is checked first: a forged
        one does not wait."""
        config = self.node_config(mac_text, token, urls)
        node, deadline = self._store.node(config["mac"]), time.monotonic() + FIRST_RECORD_WAIT_SECONDS
        while node is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            node = self._store.node(config["mac"])
        return self._overlay(config, node)

    def _overlay(self, config: dict[str, Any], node: Node | None) -> Payload:
        return Payload(OVERLAY_NAME, data=overlay_cpio(config, after=self._initrd_bytes(node)), mac=config["mac"])

    def _initrd_bytes(self, node: Node | None) -> int:
        """Bytes of the initrds the machine's profile loads before the overlay, where they are joined unpadded: by
        UEFI's kernel stub. Under BIOS iPXE itself starts each initrd on a 4-byte boundary (so: 0)."""
        if node is None or node.facts.get("platform") != "efi":
            return 0
        profile = self.spec_of(node).profile
        sizes = (self._config.assets[name] for name in (profile.initrd if profile else ()))
        with contextlib.suppress(OSError):
            return sum(path.stat().st_size for path in sizes)
        return 0

    def phone_home(self, mac_text: str, report: dict[str, Any], client_ip: str | None = None) -> Node:
        """A booted node calls back from `client_ip`: accepted (Enrollment.phone_home: its token checked, its
        host key pinned, its job queued), it wakes the provisioner; refused, it raises for the protocol to answer."""
        node = self._enrollment.phone_home(canonical_mac(mac_text), report, client_ip)
        self._on_phoned_home(node.mac)
        return node

    async def phone_home_kept(self, mac_text: str, report: dict[str, Any], client_ip: str | None = None) -> Node:
        """phone_home, returned once the store has kept it (the spent token, the queued job): group commit."""
        with self._store.group_commit() as committed:
            node = self.phone_home(mac_text, report, client_ip)
        await committed
        return node

    def os_booted(self, mac_text: str, report: dict[str, Any], client_ip: str | None = None) -> Node:
        """An installed OS reports its first boot (Enrollment.os_booted); accepted, it wakes the provisioner, which
        runs the profile's health checks."""
        node = self._enrollment.os_booted(canonical_mac(mac_text), report, client_ip)
        self._on_phoned_home(node.mac)
        return node

    async def os_booted_kept(self, mac_text: str, report: dict[str, Any], client_ip: str | None = None) -> Node:
        with self._store.group_commit() as committed:
            node = self.os_booted(mac_text, report, client_ip)
        await committed
        return node

    # -- operators ------------------------------------------------------------------------------------

    def reprovision(self, mac_text: str) -> bool:
        """Send a machine through the whole flow on its next boot; its disk may be wiped. Opens its window. A machine
        running its installed OS is rebooted over SSH (by the provisioner, when one runs): whether it is one."""
        mac = canonical_mac(mac_text)
        node = self._store.node(mac)
        self._enrollment.reprovision(mac)
        installed = node is not None and node.state in RUNS_INSTALLED_OS and node.os_host_key is not None
        if installed:
            self._on_reprovision(mac)
        return installed

    def approve(self, mac_text: str) -> None:
        """Open the machine's provisioning window (seen or not yet) and let go of held claims."""
        self._enrollment.approve(canonical_mac(mac_text))

    def boot_from_disk(self, mac_text: str) -> None:
        """Boot the machine's local disk from its next boot on, as if deployed; nothing is provisioned."""
        self._enrollment.boot_from_disk(canonical_mac(mac_text))

    # -- power, through machines' BMCs (power/) ---------------------------------------------------------------

    def power_control(self) -> PowerControl:
        """The BMC calls' runner: its last-seen power states for the pages and /metrics."""
        return self._power

    def power_state(self, mac: str) -> PowerState | None:
        """The machine's last-seen power state; None when it has no BMC or none was read since the start."""
        return self._power.known_state(mac) if self._bmc(mac) else None

    async def power(self, mac_text: str, action: str) -> str:
        """"status" (the state, "on" or "off") or one of POWER_ACTIONS, through the machine's BMC."""
        mac = canonical_mac(mac_text)
        if action == "status":
            return await self._power.status(mac)
        if action not in POWER_ACTIONS:
            raise BadRequest(f"power action {action!r}: expected status or one of {', '.join(POWER_ACTIONS)}")
        await self._power.power(mac, action)
        return action

    async def poll_power(self) -> None:
        """Read the power state of every machine with a BMC that has booted from us (at most bmc_concurrency at
        once). Not of machines never seen: their events would make them rows of the store, and nobody looks."""
        await self._power.poll([m.mac for m in self._config.machines.values()
                                if m.bmc is not None and self._store.node(m.mac) is not None])

    async def reprovision_now(self, mac_text: str) -> Netboot:
        """reprovision, then its next boot from the network and a power cycle through its BMC. The BMC is asked
        for its power state first: one that cannot be reached or refuses us leaves the machine unmarked."""
        mac = canonical_mac(mac_text)
        await self._power.status(mac)
        self._enrollment.reprovision(mac)
        return await self._netboot(mac)

    async def deploy(self, names: Iterable[str], now: bool = False) -> list[Netboot]:
        """Send these machines (MACs, or [groups] names for their configured members) through the whole flow:
        a machine seen before is marked for reprovisioning, one never seen gets its window opened. `now`: each
        is also netbooted through its BMC (its power state read first: an unreachable one is left alone), with
        at most [server] bmc_concurrency BMC calls at once."""
        macs = self.deploy_targets(names)
        if not now:
            for mac in macs:
                self._mark_for_deploy(mac)
            return []
        return list(await asyncio.gather(*(self._deploy_now(mac) for mac in macs)))

    def deploy_targets(self, names: Iterable[str]) -> list[str]:
        """MACs as given, and for a group name every configured machine that group picks now."""
        macs: list[str] = []
        groups = {group.name for group in self._config.groups}
        for name in names:
            if name in groups:
                members = [m for m in self._config.machines if self._group_now(m) == name]
                if not members:
                    raise NotFound(f"group {name} picks none of the machines under [machines]")
                macs += members
            else:
                try:
                    macs.append(canonical_mac(name))
                except BadRequest:
                    raise NotFound(f"{name!r} is neither a MAC nor a group under [groups]") from None
        return list(dict.fromkeys(macs))

    def _group_now(self, mac: str) -> str | None:
        node = self._store.node(mac)
        return (self.spec_of(node) if node else self.boot_spec(mac)).group

    async def _deploy_now(self, mac: str) -> Netboot:
        seen = self._store.node(mac) is not None  # before the BMC's events make it a row
        try:
            await self._power.status(mac)
        except BmcError as exc:
            return Netboot(mac, "not tried", str(exc))
        self._mark_for_deploy(mac, seen)
        return await self._netboot(mac)

    def _mark_for_deploy(self, mac: str, seen: bool | None = None) -> None:
        if seen is None:
            seen = self._store.node(mac) is not None
        if seen:
            self._enrollment.reprovision(mac)
        else:
            self._enrollment.approve(mac)  # never booted from us: its first boot may be provisioned

    async def _netboot(self, mac: str) -> Netboot:
        """Next boot from the network (read back), the Redfish inventory, then a power cycle (on when off)."""
        try:
            await self._power.network_boot_once(mac, self._boots_uefi(mac))
            override = "kept"
        except BootOverrideLost as exc:
            override = f"lost: {exc}"
        except BmcError as exc:
            override = f"failed: {exc}"
        bmc = self._bmc(mac)
        if bmc is not None and bmc.driver == "redfish":
            with contextlib.suppress(BmcError):  # recorded; the inventory is a bonus, the boot is the point
                await self._power.inventory(mac)
        try:
            await self._power.power(mac, "cycle")
        except BmcError as exc:
            return Netboot(mac, override, str(exc))
        return Netboot(mac, override)

    def _boots_uefi(self, mac: str) -> bool:
        """The mode to ask the next boot in: [machines] bmc firmware, else as the machine last reported."""
        bmc = self._bmc(mac)
        if bmc is not None and bmc.firmware is not None:
            return bmc.firmware == "uefi"
        node = self._store.node(mac)
        return node is not None and node.facts.get("platform") == "efi"

    def _bmc(self, mac: str) -> Bmc | None:
        machine = self._config.machines.get(mac)
        return machine.bmc if machine else None

    # -- provisioning (asked by the Provisioner) -----------------------------------------------------------

    def provision_job(self, node: Node, ssh_port: int) -> Job | None:
        return self._plans.provision_job(node, ssh_port)

    def health_job(self, node: Node, ssh_port: int) -> HealthJob:
        return self._plans.health_job(node, ssh_port)

    def job_source(self, mac: str) -> str | None:
        return self._plans.job_source(mac)

    def job_context(self, mac: str, group: str | None, profile: str, hostname: str) -> dict[str, Any]:
        return self._plans.job_context(mac, group, profile, hostname)

    def render_file(self, path: Path, context: dict[str, Any]) -> str:
        """An operator's config-file template, deployed to a node."""
        return self._templates.render_file(path, context)

    # -- health ---------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Liveness and what needs a person. `ok` is true whenever this answers at all (the process serves, so a
        supervisor must not restart it); `problems` names what does not work, in words to act on."""
        server = self._config.server
        return {
            "ok": True,
            "problems": self.problems(),
            "missing_assets": sorted(n for n, p in self._config.assets.items() if not p.is_file()),
            "ipxe_binaries": sorted(p.name for p in server.ipxe_dir.glob("*") if p.suffix in (".efi", ".kpxe")),
            "tftp_root": str(server.tftp_root) if server.tftp_root.is_dir() else None,
        }

    def problems(self) -> list[str]:
        found = []
        root = self._config.server.tftp_root
        if self._config.server.tftp is not None and not root.is_dir():
            found.append(f"tftp root {root} is missing: files under it are not served over TFTP (boot scripts, "
                         f"kernels and iPXE binaries still are); recreate it with mkdir")
        if self._store.problem is not None:
            found.append(self._store.problem)
        return found

    # -- recording ------------------------------------------------------------------------------------

    def file_sent(self, payload: Payload, protocol: str, sent: int, seconds: float,
                  error: str | None = None) -> None:
        """A protocol finished sending `payload` (or gave up). Files of a machine become its events.

        The file is gone already, so a store that cannot record it is only logged (by the store).
        """
        if payload.mac is None:
            return
        with contextlib.suppress(StoreUnavailable):
            if self._store.node(payload.mac) is None:  # anyone may fetch a kernel: no machine row for that
                log.debug("%s sent for %s, a MAC that never asked for its script: not recorded", payload.name,
                          payload.mac)
                return
            self._record_file(payload, protocol, sent, seconds, error)

    def _record_file(self, payload: Payload, protocol: str, sent: int, seconds: float, error: str | None) -> None:
        assert payload.mac is not None
        detail = {"file": payload.name, "protocol": protocol, "bytes": sent, "size": payload.size,
                  "seconds": round(seconds, 3), **({"from": payload.client} if payload.client else {})}
        if error:
            self._store.record(payload.mac, "file-failed", {**detail, "error": error})
            return
        profile_kernel = {p.kernel for p in self._config.profiles.values()}
        state = State.KERNEL_SERVED if payload.name in profile_kernel and sent == payload.size else None
        self._store.record(payload.mac, "file-served", detail, state=state, only_from=KERNEL_FROM)

    def _missing_assets(self, profile: Profile | None) -> list[str]:
        if profile is None:
            return []
        names = ([profile.kernel] if profile.kernel else []) + list(profile.initrd)
        return [f"{n} ({self._config.assets[n]})" for n in names if not self._assets.is_file(self._config.assets[n])]


def _no_file(profile: Profile, name: str) -> str:
    return f"profile {profile.name} has no file {name!r} (it has: {', '.join(sorted(profile.files)) or 'none'})"
