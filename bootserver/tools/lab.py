"""A boot lab on one machine: QEMU VMs on a VDE switch, netbooting from bootserver as their DHCP server.

    bootserver lab up --vms 3 [--firmware bios|uefi|uefi-http|uefi-secureboot|uefi-secureboot-http] [--bmc ipmi|redfish]
    bootserver lab status [--json]                      # processes, machine states, the peer matrix
    bootserver lab down                                 # stop everything, remove the namespace

Layout: a network namespace (nothing in it can reach the host's real interfaces) holds the switch's tap
(10.100.0.1/24 by default), bootserver (`serve`: full DHCP on the tap, TFTP on 69, HTTP on 80) and a
small router-advertisement sender (tools/advertise.py: iPXE would wait ~16 s for a router). Each VM has a
real BMC inside it too: OpenIPMI's ipmi_sim (tools/labbmc.py) at 10.100.0.(200+N):623 on the tap, which runs
the VM's QEMU (plugged into the switch by its socket) and powers it off and resets it through QEMU's
ipmi-bmc-extern device; the config gives bootserver each one as [machines."MAC".bmc]. With `--bmc redfish`
each VM is instead a libvirt domain of the lab's own libvirtd, powered through one sushy-tools Redfish emulator
at 10.100.0.200:8000 (tools/labredfish.py). Each VM installs Debian and runs tools/labnode.py.

Everything the lab started is recorded in `DIR/lab.json` (pids, with the command-line text that
identifies each, so `down` never signals a recycled pid); logs, disks and serial consoles stay in DIR.
Needs root (namespaces, taps), vde2, qemu-system-x86, ovmf for UEFI, curl, the agent image and the OS image.
Over 400 lines as one thing: the lab's processes, its state file and the reading of its machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from ..errors import BootserverError
from ..provision.pki import encrypt_secret
from . import labnode, labredfish
from .image import default_cache_dir
from .labbmc import IPMI_SIM, SimBmc
from .labredfish import LabLibvirt, RedfishBmc
from .secureboot import fetch_secure_boot_files

NAMESPACE = "bootserver-lab"
TAP = "lab0"
ADDRESS = IPv4Interface("10.100.0.1/24")
QEMU = "qemu-system-x86_64"
# OVMF as a machine has it: read-only code, and a variable store of its own (boot entries, boot order) that
# persists across reboots and runs, made from the template on first use.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# OVMF's Secure Boot build, and a variable store with Microsoft's keys enrolled (as machines ship): it runs
# Debian's shim (signed by Microsoft's UEFI CA) and refuses anything unsigned, such as Debian's iPXE.
OVMF_SECBOOT_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_MS_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
FIRMWARES = ("bios", "uefi", "uefi-http", "uefi-secureboot", "uefi-secureboot-http")
SECURE_BOOT = ("uefi-secureboot", "uefi-secureboot-http")
VM_MAC = "52:54:00:00:10:{:02x}"
VM_DISK_BYTES = 2 << 30  # sparse: costs nothing until written
TOOLS = {"ip": "iproute2", "vde_switch": "vde2", QEMU: "qemu-system-x86", "curl": "curl", IPMI_SIM: "openipmi"}
BMC_HOST = 200  # lab N's BMC answers IPMI at the switch network's .(200+N), port 623
BMC_VM_PORT = 9100  # ... and listens for its VM's ipmi-bmc-extern link on the namespace's 127.0.0.1:(9100+N)
STOP_SECONDS = 10.0
REDFISH_PORT = 8000  # --bmc redfish: the lab's one emulator at the switch network's .200, port 8000
REDFISH_PLUG_PORT = 9200  # lab N's vde_plug listens on the namespace's 127.0.0.1:(9200+N) (UDP) ...
REDFISH_VM_PORT = 9300  # ... and its domain's NIC on 127.0.0.1:(9300+N)


# What `lab up` provisions onto every VM: Debian from `bootserver image os debian` on a GPT disk that boots on
# BIOS and UEFI, and a demo member of a small cluster (tools/labnode.py) that checks its peers over the switch.
DEMO_PROFILE = """[profiles.agent.disk]
device = "/dev/vda"
wipe = true
[[profiles.agent.disk.partitions]]
label = "bios"
size = "1MiB"
type = "bios"
[[profiles.agent.disk.partitions]]
label = "esp"
size = "64MiB"
type = "esp"
mount = "/boot/efi"
[[profiles.agent.disk.partitions]]
label = "root"
size = "rest"
mount = "/"
[profiles.agent.os]
rootfs = "debian"
[profiles.agent.deploy]
check = "test -x $TARGET/usr/local/bin/lab-node"
[[profiles.agent.deploy.files]]
source = "lab/lab-node"
dest = "/usr/local/bin/lab-node"
mode = "0755"
[[profiles.agent.deploy.templates]]
source = "lab/peers.toml.j2"
dest = "/etc/lab-node/peers.toml"
[profiles.agent.deploy.tls]
dir = "/etc/lab-node/tls"
[[profiles.agent.deploy.units]]
source = "lab/lab-node.service"
[profiles.agent.health]
commands = ["systemctl is-active lab-node"]
urls = ["http://{ip}:7000/health"]
"""
DEMO_FILES = {
    "lab/lab-node": Path(labnode.__file__).read_text(),
    "lab/peers.toml.j2": ('me = "{{ node.hostname }}"\n{% for peer in group %}[[peer]]\n'
                          'name = "{{ peer.hostname }}"\nip = "{{ peer.ip }}"\n{% endfor %}'),
    "lab/lab-node.service": ("[Unit]\nDescription=lab cluster member\nAfter=network-online.target\n"
                             "Wants=network-online.target\n\n[Service]\nExecStart=/usr/local/bin/lab-node\n"
                             "Restart=always\n\n[Install]\nWantedBy=multi-user.target\n"),
}
VM_MEMORY = 1024  # MiB: the installed Debian with systemd; the agent alone fits in 256


class LabError(BootserverError):
    """The lab cannot be started or stopped; the message says what is missing."""


@dataclass
class Lab:
    dir: Path
    namespace: str = NAMESPACE
    address: IPv4Interface = ADDRESS
    tap: str = TAP
    processes: dict[str, dict[str, object]] = field(default_factory=dict)  # name -> {pid, marker[, by_marker]}
    bmcs: dict[str, dict[str, object]] = field(default_factory=dict)  # "N" -> lab N's BMC (its status_json)
    bmc_driver: str = "ipmi"  # ipmi: an ipmi_sim per VM; redfish: libvirt domains and one sushy-emulator
    redfish: dict[str, object] = field(default_factory=dict)  # its credentials, the mount points it made

    # -- paths --------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / "lab.json"

    @property
    def switch_socket(self) -> Path:
        return self.dir / "switch"

    @property
    def config_path(self) -> Path:
        return self.dir / "bootserver.toml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def serial_log(self, index: int) -> Path:
        return self.dir / f"vm{index}.serial.log"

    # -- state ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, dir: Path) -> Lab:
        try:
            state = json.loads((dir / "lab.json").read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {dir} (no lab.json): start one with `bootserver lab up`") from None
        return cls(Path(state["dir"]), state["namespace"], IPv4Interface(state["address"]), state["tap"],
                   state["processes"], state.get("bmcs", {}), state.get("bmc_driver", "ipmi"), state.get("redfish", {}))

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"dir": str(self.dir), "namespace": self.namespace, "address": str(self.address), "tap": self.tap,
                 "processes": self.processes, "bmcs": self.bmcs, "bmc_driver": self.bmc_driver,
                 "redfish": self.redfish}
        self.state_path.write_text(json.dumps(state, indent=2) + "\n")

    # -- bringing it up -------------------------------------------------------------------------

    def up(self, vms: int, firmware: str, image_dir: Path) -> None:
        """Network, server and `vms` VMs; on any failure, whatever was started is stopped again."""
        if self.state_path.exists():
            raise LabError(f"a lab is recorded in {self.state_path} already: `bootserver lab down` first")
        check_tools(uefi=firmware != "bios", redfish=self.bmc_driver == "redfish")
        try:
            self.start_network()
            self.write_config(image_dir, machines=vms, firmware=firmware)
            self.start_server()
            for index in range(1, vms + 1):
                self.start_vm(index, firmware)
        except BaseException:
            self.down()
            raise

    def start_network(self) -> None:
        """The namespace, the switch with its tap inside it, our address on the tap, the RA sender."""
        run("ip", "netns", "add", self.namespace)
        self.save()  # from here on, `down` has something to remove
        self._in_namespace("ip", "link", "set", "lo", "up")
        pidfile = self.dir / "switch.pid"
        pidfile.unlink(missing_ok=True)
        self._in_namespace("vde_switch", "--sock", str(self.switch_socket), "--tap", self.tap, "--daemon",
                           "--pidfile", str(pidfile))
        pid = int(_wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), 5, "vde_switch's pidfile"))
        self._remember("switch", pid, str(self.switch_socket))
        # No duplicate-address detection on a switch of our own: the link-local address the RAs are sent
        # from is usable at once instead of "tentative" for a second or two.
        self._in_namespace("sysctl", "-q", "-w", f"net.ipv6.conf.{self.tap}.accept_dad=0")
        self._in_namespace("ip", "addr", "add", str(self.address), "dev", self.tap)
        self._in_namespace("ip", "link", "set", self.tap, "up")
        self.spawn("advertiser", [sys.executable, "-m", "bootserver.tools.advertise", self.tap],
                   marker=f"bootserver.tools.advertise {self.tap}", namespace=self.namespace)

    def write_config(self, image_dir: Path, mode: str = "full", machines: int = 8, provision: bool = True,
                     os_image: Path | None = None, firmware: str = "bios", tftp: bool = True) -> Path:
        """A config that boots the agent image to every machine; DHCP `mode` full or proxy on the tap.

        With `provision`, every lab machine is then made a member of a small cluster: its disk partitioned (GPT
        that boots on BIOS and UEFI), Debian installed from `os_image` (default: beside the agent image, as
        `bootserver image os debian` writes it), and the demo peer service deployed with a peer list of the
        whole group, a TLS certificate and an enabled unit; `lab up` ends when every machine is running it.
        Without `provision` machines stop at phone-home. Full mode reserves lab N's address (.10+N). `firmware`:
        the VMs' (FIRMWARES), the mode of a Redfish BMC's one-time network boot; with uefi-secureboot or
        uefi-secureboot-http every machine boots through the signed shim and GRUB (fetched into the data directory by
        `bootserver image secureboot`'s code when missing). Without `tftp` the server has no TFTP at all (for
        firmware that boots over HTTP only).
        """
        kernel, initrd = image_dir / "vmlinuz", image_dir / "initrd.img"
        for path in (kernel, initrd):
            if not path.is_file():
                raise LabError(f"{path} is missing: run `bootserver image build` (or give --image-dir)")
        os_image = os_image or image_dir.parent / "os" / "debian-bookworm.tar.zst"
        if provision and not os_image.is_file():
            raise LabError(f"{os_image} is missing: run `bootserver image os debian` (the OS the lab installs)")
        hosts = list(self.address.network.hosts())
        dhcp = [f'mode = "{mode}"', f'interface = "{self.tap}"', f'server_address = "{self.address.ip}"']
        if mode == "full":
            pool = [h for h in hosts[99:199] if h != self.address.ip] or [h for h in hosts if h != self.address.ip]
            dhcp += [f'pool = "{pool[0]}-{pool[-1]}"', f'netmask = "{self.address.netmask}"', "lease_seconds = 600"]
        lines = [
            "# Written by `bootserver lab up`.",
            "[server]", 'http = "0.0.0.0:80"', f'tftp = "{"0.0.0.0:69" if tftp else "off"}"',
            f'data_dir = "{self.data_dir}"',
            "[assets]", f'agent-kernel = "{kernel}"', f'agent-initrd = "{initrd}"',
            *([f'debian = "{os_image}"'] if provision else []),
            "[profiles.agent]", 'kernel = "agent-kernel"', 'initrd = ["agent-initrd"]',
            'cmdline = "console=tty0 console=ttyS0"',
            *(self._demo_cluster() if provision else []),
            "[groups.default]", 'profile = "agent"',
            *(["secure_boot = true"] if firmware in SECURE_BOOT else []),
            "[dhcp]", *dhcp,
        ]
        for index in range(1, machines + 1):
            lines += [f'[machines."{VM_MAC.format(index)}"]', f'hostname = "lab{index}"']
            if mode == "full":
                lines.append(f'ip = "{self.reserved_ip(index)}"')
            lines += self._bmc_section(index, firmware)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")
        if firmware in SECURE_BOOT and not (self.data_dir / "secureboot" / "shimx64.efi").is_file():
            fetch_secure_boot_files(self.data_dir / "secureboot", default_cache_dir(), lambda line: None)
        return self.config_path

    def bmc(self, index: int) -> SimBmc | RedfishBmc:
        """Lab N's BMC: its address and port, and credentials made once (kept in lab.json)."""
        if self.bmc_driver == "redfish":
            return self.redfish_bmc(index)
        known = self.bmcs.get(str(index))
        address = str(self.address.network.network_address + BMC_HOST + index)
        bmc = SimBmc(self.dir / f"bmc{index}", address, 623, vm_port=BMC_VM_PORT + index,
                     **({"password": str(known["password"])} if known else {}))
        if not known:
            self.bmcs[str(index)] = bmc.status_json()
            self.save()
        return bmc

    def redfish_bmc(self, index: int) -> RedfishBmc:
        """Lab N's Redfish BMC: the lab's one emulator (one password for the lab) and N's domain's UUID."""
        known = self.bmcs.get(str(index))
        username, password = self._redfish_credentials()
        bmc = RedfishBmc(self.redfish_url, REDFISH_PORT, str(known["system"]) if known else str(uuid.uuid4()),
                         username, password)
        if not known:
            self.bmcs[str(index)] = bmc.status_json()
            self.save()
        return bmc

    @property
    def redfish_url(self) -> str:
        return f"http://{self.address.network.network_address + BMC_HOST}:{REDFISH_PORT}"

    def _redfish_credentials(self) -> tuple[str, str]:
        """The lab's one emulator's username and password, made once (kept in lab.json)."""
        if not self.redfish.get("password"):
            self.redfish.update(username=labredfish.USERNAME, password=secrets.token_urlsafe(12))
            self.save()
        return str(self.redfish["username"]), str(self.redfish["password"])

    def _bmc_section(self, index: int, firmware: str = "bios") -> list[str]:
        """[machines."MAC".bmc] of lab N, its password encrypted with the server's secret key (data_dir's)."""
        bmc = self.bmc(index)
        password = encrypt_secret(self.data_dir / "secret.key", bmc.password)
        lines = [f'[machines."{VM_MAC.format(index)}".bmc]', f'driver = "{bmc.status_json()["driver"]}"',
                 f'address = "{bmc.address}"', f"port = {bmc.port}", f'username = "{bmc.username}"',
                 f'password = "{password}"']
        if isinstance(bmc, RedfishBmc):  # the emulator switches the domain's firmware to the mode asked
            lines += [f'system = "{bmc.system}"', f'firmware = "{"bios" if firmware == "bios" else "uefi"}"']
        return lines

    def reserved_ip(self, index: int) -> IPv4Address:
        return self.address.network.network_address + 10 + index

    def _demo_cluster(self) -> list[str]:
        """The agent profile's disk and deploy sections, and the files they deploy (under data_dir)."""
        for relative, text in DEMO_FILES.items():
            path = self.data_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return DEMO_PROFILE.splitlines()

    def start_server(self, timeout: float = 30.0) -> None:
        """`bootserver serve` in the namespace; returns once it listens, or raises with its log."""
        log = self.dir / "server.log"
        log.write_text("")
        command = [sys.executable, "-m", "bootserver", "--config", str(self.config_path), "serve"]
        pid = self.spawn("server", command, marker=str(self.config_path), namespace=self.namespace, log=log)

        def listening() -> bool:
            if not _alive(pid):
                raise LabError(f"bootserver exited at start-up; its log ({log}):\n{log.read_text()[-3000:]}")
            return "serving HTTP on" in log.read_text()

        _wait_for(listening, timeout, f"bootserver to listen (log: {log})")

    def start_vm(self, index: int, firmware: str = "bios", native_pxe: bool = False,
                 memory: int = VM_MEMORY, powered: bool = True) -> int:
        """VM number `index` (MAC 52:54:00:00:10:NN) netbooting from the switch; its disk and serial log in DIR.
        Its BMC (ipmi_sim, in the namespace) runs it: powered on now, or (`powered` false) when asked over IPMI.
        Returns the BMC's pid (QEMU's changes with every power-on).

        native_pxe: no iPXE option ROM on the NIC (`romfile=`): UEFI firmware uses its own PXE client.
        firmware "uefi-http": OVMF's own UEFI HTTP boot client (no iPXE ROM, its PXE and IPv6 stacks off): it
        asks our DHCP as an `HTTPClient` and fetches its boot file over HTTP; nothing goes over TFTP.
        firmware "uefi-secureboot": OVMF with Secure Boot on and Microsoft's keys, always its own PXE client (the
        ROM's unsigned iPXE would run first otherwise), on a q35 machine with SMM as that OVMF build needs.
        firmware "uefi-secureboot-http": the same, its own HTTP boot client instead of PXE (as uefi-http's).
        """
        if firmware not in FIRMWARES:
            raise LabError(f"firmware {firmware!r}: one of {', '.join(FIRMWARES)}")
        native_pxe = native_pxe or firmware in ("uefi-http", *SECURE_BOOT)
        if native_pxe and firmware == "bios":
            raise LabError("native_pxe needs UEFI: SeaBIOS has no PXE client of its own")
        if self.bmc_driver == "redfish":
            if native_pxe:
                raise LabError("native_pxe (and uefi-http, uefi-secureboot...) is for the IPMI lab's VMs only")
            return self.start_domain(index, firmware, memory, powered)
        disk = self.dir / f"vm{index}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(VM_DISK_BYTES)
        serial = self.serial_log(index)
        serial.write_bytes(b"")
        nic = f"virtio-net-pci,netdev=n0,mac={VM_MAC.format(index)},bootindex=1" + (",romfile=" if native_pxe else "")
        command = [
            QEMU, "-accel", "tcg", "-m", str(memory), "-display", "none", "-monitor", "none",
            "-name", f"bootserver-lab-vm{index}",
            "-serial", f"file:{serial}",
            # Debian's QEMU 7.2 has the vde backend, though `-netdev help` does not list it.
            "-netdev", f"vde,id=n0,sock={self.switch_socket}",
            "-device", nic,
            # After the NIC in the boot order: a machine told to boot its disk (iPXE `exit`) falls through to it.
            "-drive", f"file={disk},if=none,id=disk0,format=raw", "-device", "virtio-blk-pci,drive=disk0,bootindex=2",
        ]  # fmt: skip
        if firmware in ("uefi", "uefi-http"):
            netboot = "http" if firmware == "uefi-http" else "pxe" if native_pxe else "ipxe"
            command += uefi_flash(self.dir / f"vm{index}.ovmf-vars.fd", netboot=netboot)
        if firmware in SECURE_BOOT:
            command += secure_boot_flash(self.dir / f"vm{index}.ovmf-ms-vars.fd", http=firmware.endswith("-http"))
        bmc = self.bmc(index)
        command += bmc.qemu_args()
        script = self.dir / f"vm{index}.start"
        script.write_text(f"#!/bin/sh\n# ipmi_sim's startcmd: how lab{index}'s BMC powers it on\n"
                          f"exec {shlex.join(command)} >>{shlex.quote(str(self.dir / f'vm{index}.qemu.log'))} 2>&1\n")
        script.chmod(0o755)
        self._in_namespace("ip", "addr", "add", f"{bmc.address}/{self.address.network.prefixlen}", "dev", self.tap)
        pid = self.spawn(f"bmc{index}", bmc.write(startcmd=script, start_now=powered), marker=str(bmc.dir),
                         namespace=self.namespace, log=self.dir / f"bmc{index}.log")
        # QEMU itself, whatever its pid is now: stopped by `down` (ipmi_sim leaves it running when it exits).
        self.processes[f"vm{index}"] = {"pid": 0, "marker": str(serial), "by_marker": True}
        self.save()
        return pid

    # -- --bmc redfish: libvirt domains, one emulator -----------------------------------------------

    @property
    def libvirt(self) -> LabLibvirt:
        return LabLibvirt(self.dir / "libvirt")

    def domain_name(self, index: int) -> str:
        return f"{self.namespace}-vm{index}"

    def start_domain(self, index: int, firmware: str, memory: int, powered: bool) -> int:
        """VM N as a libvirt domain of the lab's libvirtd (started with the first), its NIC plugged into the
        switch by a vde_plug; powered on now or when asked over Redfish. Returns the vde_plug's pid."""
        if "libvirtd" not in self.processes:
            self.start_libvirt()
        bmc = self.redfish_bmc(index)
        disk = self.dir / f"vm{index}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(VM_DISK_BYTES)
        plug_port, vm_port = REDFISH_PLUG_PORT + index, REDFISH_VM_PORT + index
        pid = self.spawn(f"plug{index}", labredfish.plug_command(self.switch_socket, plug_port, vm_port),
                         marker=f"->127.0.0.1:{vm_port}", namespace=self.namespace)
        self.serial_log(index).write_bytes(b"")
        name = self.domain_name(index)
        xml = self.dir / f"vm{index}.xml"
        xml.write_text(labredfish.domain_xml(
            name=name, uuid=bmc.system, memory=memory, disk=disk, serial=self.serial_log(index),
            mac=VM_MAC.format(index), firmware=firmware, vars_file=self.dir / f"vm{index}.ovmf-vars.fd",
            ovmf_code=OVMF_CODE, ovmf_vars=OVMF_VARS, plug_port=plug_port, vm_port=vm_port,
            qemu=shutil.which(QEMU) or QEMU))
        self.libvirt.define(xml)
        self.redfish["domains"] = sorted({*self.redfish.get("domains", []), name})
        # QEMU itself, whatever its pid is now (libvirtd starts it anew at every power-on): `down` destroys it.
        self.processes[f"vm{index}"] = {"pid": 0, "marker": f"guest={name},", "by_marker": True}
        self.save()
        if powered:
            self.libvirt.virsh("start", name)
        return pid

    def start_libvirt(self, timeout: float = 60.0) -> None:
        """The lab's own libvirtd (in its namespace, with its own directories), then the Redfish emulator."""
        libvirt = self.libvirt
        self.redfish["made"] = [*self.redfish.get("made", []), *libvirt.prepare()]
        log = self.dir / "libvirtd.log"
        pid = self.spawn("libvirtd", libvirt.daemon_command(), marker=str(libvirt.config), namespace=self.namespace,
                         log=log)

        def answering() -> bool:
            if not _alive(pid):
                raise LabError(f"libvirtd exited at start-up; its log ({log}):\n{log.read_text()[-3000:]}")
            return libvirt.answering()

        _wait_for(answering, timeout, f"libvirtd to answer (log: {log})")
        username, password = self._redfish_credentials()
        address = str(self.address.network.network_address + BMC_HOST)
        self._in_namespace("ip", "addr", "add", f"{address}/{self.address.network.prefixlen}", "dev", self.tap)
        emulator = labredfish.emulator_path()
        if emulator is None:
            raise LabError(f"missing: {labredfish.EMULATOR} (pip install sushy-tools libvirt-python)")
        workdir = self.dir / "redfish"
        config = labredfish.emulator_files(workdir, libvirt.uri, username, password, OVMF_CODE, OVMF_VARS)
        log = self.dir / "redfish.log"
        # TMPDIR: where the emulator keeps state of its own between requests.
        pid = self.spawn("redfish", ["env", f"TMPDIR={workdir}", emulator, "--config", str(config), "--libvirt-uri",
                                     libvirt.uri, "-i", address, "-p", str(REDFISH_PORT)],
                         marker=str(config), namespace=self.namespace, log=log)

        def emulator_answering() -> bool:
            if not _alive(pid):
                raise LabError(f"{labredfish.EMULATOR} exited at start-up; its log ({log}):\n{log.read_text()[-3000:]}")
            systems = self._get(f"{self.redfish_url}/redfish/v1/Systems", auth=(username, password))
            return systems is not None and "Members" in systems  # answering, and to these credentials

        _wait_for(emulator_answering, 30, f"{labredfish.EMULATOR} to answer (log: {log})")

    def spawn(self, name: str, command: list[str], *, marker: str, namespace: str | None = None,
              log: Path | None = None) -> int:
        """Start a process that outlives this one (its own session), in `namespace` if given, and record it."""
        if namespace:
            command = ["ip", "netns", "exec", namespace, *command]  # `ip` execs: the pid is the command's
        out = open(log or self.dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_package_root()),
                                                                          os.environ.get("PYTHONPATH")]))}
        with out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=env)
        self._remember(name, process.pid, marker)
        return process.pid

    # -- taking it down ---------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every recorded process (newest first), remove the namespace; what was done, as lines."""
        done = []
        if "libvirtd" in self.processes and _pids(self.processes["libvirtd"]):
            for name in self.redfish.get("domains", []):
                done += self.libvirt.remove(str(name))
        for name in reversed(list(self.processes)):
            for pid in _pids(self.processes[name]):
                _stop(pid)
                done.append(f"stopped {name} (pid {pid})")
            del self.processes[name]
        if self.namespace in namespaces():
            run("ip", "netns", "del", self.namespace)
            done.append(f"removed network namespace {self.namespace}")
        for made in reversed(self.redfish.get("made", [])):  # libvirtd's mount points, empty on the host
            with contextlib.suppress(OSError):
                Path(str(made)).rmdir()
                done.append(f"removed {made} (made for the lab's libvirtd)")
        self.state_path.unlink(missing_ok=True)
        return done

    # -- looking at it ----------------------------------------------------------------------------

    def status(self) -> str:
        """Processes, then each machine: its state and address, and which peers its lab-node reaches."""
        lines = [f"lab in {self.dir}: namespace {self.namespace} "
                 f"({'present' if self.namespace in namespaces() else 'MISSING'}), {self.tap} {self.address}"]
        for name, entry in self.processes.items():
            pids = _pids(entry)
            lines.append(f"  {name:<10} pid {' '.join(map(str, pids)) or '-':<7} {'running' if pids else 'GONE'}")
        for machine in self.machines():
            lines.append(f"  {machine['mac']}  {machine['hostname'] or '-':<8} {machine['state']:<14} "
                         f"{machine['ip'] or '-'}")
            for peer in machine.get("peers") or []:
                mark = "reachable" if peer.get("reachable") else "NOT reachable"
                lines.append(f"      -> {peer.get('hostname')} {peer.get('ip')}: {mark}")
        return "\n".join(lines)

    def wait_running(self, vms: int, timeout: float, progress: Callable[[str], None] = lambda line: None) -> None:
        """Until lab1..labN are all running (state changes told to `progress`); LabError naming any that failed."""
        wanted = {VM_MAC.format(index) for index in range(1, vms + 1)}
        deadline, seen = time.monotonic() + timeout, {}
        while True:
            states = {m["mac"]: m["state"] for m in self.machines() if m["mac"] in wanted}
            for mac, state in sorted(states.items()):
                if seen.get(mac) != state:
                    progress(f"  {mac} {state}")
            seen = states
            failed = sorted(mac for mac, state in states.items() if state in ("failed", "interrupted"))
            if failed:
                raise LabError(f"{', '.join(failed)} failed: see `bootserver show MAC` or the status pages")
            if len(states) == vms and all(state == "running" for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise LabError(f"not all running after {timeout:.0f} s: {states}")
            time.sleep(2)

    def status_json(self) -> dict[str, object]:
        return {"dir": str(self.dir), "namespace": self.namespace, "address": str(self.address),
                "processes": {name: {"pid": (_pids(entry) or [entry["pid"]])[0], "running": bool(_pids(entry))}
                              for name, entry in self.processes.items()},
                "machines": self.machines()}

    def machines(self) -> list[dict[str, object]]:
        """Every machine as the lab's server reports it (its API, from inside the namespace), with the peer list
        of its lab-node once it is running."""
        listing = self._get(f"http://{self.address.ip}/api/v1/machines?limit=1000")
        machines = []
        for machine in (listing or {}).get("machines", []):
            entry = {key: machine.get(key) for key in ("mac", "hostname", "ip", "state", "facts", "profile", "power")}
            index = next((i for i in self.bmcs if VM_MAC.format(int(i)) == machine.get("mac")), None)
            entry["bmc"] = self.bmcs.get(index) if index else None
            if machine.get("state") == "running" and machine.get("ip"):
                report = self._get(f"http://{machine['ip']}:{labnode.PORT}/peers")
                entry["peers"] = (report or {}).get("peers")
            machines.append(entry)
        return machines

    def _get(self, url: str, auth: tuple[str, str] | None = None) -> dict | None:
        """GET `url` from inside the lab's namespace; its JSON, or None when nothing usable answered."""
        if self.namespace not in namespaces():
            return None
        user = ["--user", f"{auth[0]}:{auth[1]}"] if auth else []
        result = subprocess.run(["ip", "netns", "exec", self.namespace, "curl", "-s", "--max-time", "5", *user, url],
                                capture_output=True, text=True)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            return None

    # -- helpers ------------------------------------------------------------------------------------

    def _in_namespace(self, *command: str) -> None:
        run("ip", "netns", "exec", self.namespace, *command)

    def _remember(self, name: str, pid: int, marker: str) -> None:
        self.processes[name] = {"pid": pid, "marker": marker}
        self.save()


# OVMF's settings (fw_cfg) that leave its HTTP boot over IPv4 as its only network boot.
HTTP_BOOT_ONLY = ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no",
                  "-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=no"]


def uefi_flash(vars_file: Path, *, netboot: str = "ipxe") -> list[str]:
    """QEMU's arguments for OVMF with `vars_file` as its variable store (a copy of the template, made once).

    `netboot`: who boots from the network. "ipxe", the NIC's iPXE ROM: OVMF's own PXE and IPv6 stacks are
    switched off, as after iPXE's `exit` they would each try the network again and wait about a minute apiece
    before the firmware reaches the disk. "pxe": OVMF's own PXE client (a NIC without iPXE's ROM). "http": OVMF's
    own HTTP boot client over IPv4, its PXE and IPv6 stacks off, so that HTTP boot is the only network boot.
    """
    if not vars_file.exists():
        shutil.copyfile(OVMF_VARS, vars_file)
    flash = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
             "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"]
    if netboot == "pxe":
        return flash
    # Its HTTP boot over IPv4 stays on in both other cases (after iPXE's `exit` our DHCP sends it on to the disk).
    return flash + HTTP_BOOT_ONLY


def secure_boot_flash(vars_file: Path, *, http: bool = False) -> list[str]:
    """QEMU's arguments for OVMF's Secure Boot build with Microsoft's keys in `vars_file` (a copy, made once):
    a q35 machine with SMM, and flash writable only from SMM, without which that build does not start. With
    `http`, its own HTTP boot client over IPv4 is its only network boot (PXE and IPv6 off, as uefi_flash's)."""
    if not vars_file.exists():
        shutil.copyfile(OVMF_MS_VARS, vars_file)
    return ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_SECBOOT_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}", *(HTTP_BOOT_ONLY if http else [])]


def check_tools(uefi: bool = False, redfish: bool = False) -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it creates a network namespace and a tap interface")
    missing = [f"{tool} (apt-get install {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if redfish:
        missing += labredfish.missing_tools()
    if uefi and not all(f.is_file() for f in (OVMF_CODE, OVMF_VARS, OVMF_SECBOOT_CODE, OVMF_MS_VARS)):
        missing.append(f"{OVMF_CODE} and its Secure Boot build (apt-get install ovmf)")
    if missing:
        raise LabError(f"missing: {', '.join(missing)}")


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LabError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def namespaces() -> set[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def _package_root() -> Path:
    return Path(__file__).resolve().parents[2]  # the directory holding the bootserver package


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of ours that exited is a zombie until reaped: not alive.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def _pids(entry: dict[str, object]) -> list[int]:
    """The live pids of a recorded process: its own, or (`by_marker`) every process whose command line holds its
    marker, for a QEMU that its BMC starts again at each power-on."""
    marker = str(entry["marker"])
    if not entry.get("by_marker"):
        pid = int(str(entry["pid"]))
        return [pid] if _is_ours(pid, marker) else []
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid() and _is_ours(int(proc.name), marker):
            found.append(int(proc.name))
    return sorted(found)


def _is_ours(pid: int, marker: str) -> bool:
    """The pid still runs the process we recorded (pids are recycled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline and _alive(pid)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_SECONDS."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _alive(pid), 5, f"pid {pid} to exit after SIGKILL")
