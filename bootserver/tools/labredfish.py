"""Redfish BMCs for the lab's VMs (`bootserver lab up --bmc redfish`): sushy-tools' emulator with its libvirt
driver, one for the whole lab, each VM a libvirt domain and a Redfish system (its id the domain's UUID).

The lab runs a libvirtd of its own inside its network namespace, in a mount namespace where /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are the lab's directories (DIR/libvirt/):
its config (qemu.conf: QEMU as root, no cgroups, no namespaces, QEMU's output to files so no virtlogd), its socket,
its domains' state and logs. The host's libvirt configuration is neither read nor changed, and a system libvirtd,
if one runs, is not in the way. libvirt 9.0 still looks up Debian's QEMU user `libvirt-qemu` (and its group) at
start even when told to run QEMU as root: ./setup test adds them (Debian's libvirt-daemon-system would, but it
wants systemd).

Domains are TCG (`<domain type='qemu'>`). libvirt has no VDE interface: each domain's NIC is `<interface
type='udp'>` on the namespace's loopback, joined to the lab's switch by a `vde_plug` (measured by hand: DHCPACK
5.7 s after a Redfish power-on, benchmarks/results/2026-12-05-redfish-libvirt-by-hand.md).

    libvirt = LabLibvirt(dir / "libvirt")
    libvirt.prepare()                 # its config files and directories; the mount points it needs
    command = libvirt.daemon_command()   # run inside the lab's namespace
    libvirt.define(domain_xml(...)); libvirt.virsh("start", name)
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..errors import BootserverError

EMULATOR = "sushy-emulator"
LIBVIRTD = "libvirtd"
VIRSH = "virsh"
VDE_PLUG = "vde_plug"
QEMU_USER = "libvirt-qemu"  # Debian's libvirt looks it up at start, whatever qemu.conf says
TOOLS = {LIBVIRTD: "libvirt-daemon", VIRSH: "libvirt-clients", VDE_PLUG: "vde2", "unshare": "util-linux"}
USERNAME = "admin"
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
# Where the lab's libvirtd keeps things, each bound to a directory of the lab in its own mount namespace.
MOUNTS = {"etc": Path("/etc/libvirt"), "run": Path("/run/libvirt"), "lib": Path("/var/lib/libvirt"),
          "log": Path("/var/log/libvirt"), "cache": Path("/var/cache/libvirt")}
QEMU_CONF = """# Written by `bootserver lab up --bmc redfish`: the lab's own libvirtd, in its own namespaces.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """# Written by `bootserver lab up --bmc redfish`: only root, on the unix socket.
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
"""


@dataclass(frozen=True)
class RedfishBmc:
    """A lab VM's BMC: the lab's one emulator, and the system that is this VM."""

    address: str  # the emulator's URL, as [machines."MAC".bmc] address takes it
    port: int
    system: str  # the domain's UUID: the Redfish system's id
    username: str
    password: str

    def status_json(self) -> dict[str, object]:
        """As `bootserver lab status --json` shows it, and as [machines."MAC".bmc] takes it."""
        return {"driver": "redfish", "address": self.address, "port": self.port, "username": self.username,
                "password": self.password, "system": self.system}


@dataclass(frozen=True)
class LabLibvirt:
    dir: Path  # DIR/libvirt: etc, run, lib, log, cache

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "libvirt-sock"

    @property
    def config(self) -> Path:
        return self.dir / "etc" / "libvirtd.conf"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def prepare(self) -> list[str]:
        """Its config and directories; the mount points that were missing on the host, made now (empty: `down`
        removes them again)."""
        for name in MOUNTS:
            (self.dir / name).mkdir(parents=True, exist_ok=True)
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        self.config.write_text(LIBVIRTD_CONF)
        made = []
        for target in MOUNTS.values():
            if not target.exists():
                target.mkdir(parents=True)
                made.append(str(target))
        return made

    def daemon_command(self) -> list[str]:
        """libvirtd in the foreground, in a mount namespace of its own with the lab's directories bound in."""
        binds = "".join(f"mount --bind {shlex.quote(str(self.dir / name))} {target}; "
                        for name, target in MOUNTS.items())
        # The host's paths of its config and pid file (the lab's directory is not hidden): its command line
        # names this lab, so that `down` knows it as ours.
        script = (f"set -e; {binds}exec {LIBVIRTD} --config {shlex.quote(str(self.config))} "
                  f"--pid-file {shlex.quote(str(self.dir / 'run' / 'libvirtd.pid'))}")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise BootserverError(f"`virsh {' '.join(args)}` failed: {result.stderr.strip()}")
        return result

    def answering(self) -> bool:
        return self.socket.exists() and self.virsh("version", check=False).returncode == 0

    def define(self, xml_path: Path) -> None:
        self.virsh("define", str(xml_path))

    def remove(self, name: str) -> list[str]:
        """Destroy (if running) and undefine a domain; what was done."""
        done = []
        if self.virsh("destroy", name, check=False).returncode == 0:
            done.append(f"destroyed domain {name}")
        # --nvram removes a UEFI domain's variable store with it (and is refused for a domain without one).
        if (self.virsh("undefine", name, "--nvram", check=False).returncode == 0
                or self.virsh("undefine", name, check=False).returncode == 0):
            done.append(f"undefined domain {name}")
        return done


def domain_xml(*, name: str, uuid: str, memory: int, disk: Path, serial: Path, mac: str, firmware: str,
               vars_file: Path, ovmf_code: Path, ovmf_vars: Path, plug_port: int, vm_port: int,
               qemu: str) -> str:
    """A lab VM as a libvirt domain: as the IPMI lab's QEMU command (TCG, memory, virtio disk second in the boot
    order, virtio NIC first, its MAC, SeaBIOS or OVMF with a vars store of its own and OVMF's own PXE and IPv6
    stacks off), the NIC a UDP socket on loopback: QEMU at vm_port, its vde_plug at plug_port."""
    if firmware == "uefi":
        loader = (f"<loader readonly='yes' type='pflash'>{escape(str(ovmf_code))}</loader>"
                  f"<nvram template={quoteattr(str(ovmf_vars))}>{escape(str(vars_file))}</nvram>")
        sysinfo = ("<sysinfo type='fwcfg'><entry name='opt/org.tianocore/IPv4PXESupport'>no</entry>"
                   "<entry name='opt/org.tianocore/IPv6Support'>no</entry></sysinfo>")
    else:
        loader, sysinfo = f"<loader readonly='yes' type='rom'>{escape(str(SEABIOS))}</loader>", ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    {loader}
  </os>
  {sysinfo}
  <features><acpi/><apic/></features>
  <devices>
    <emulator>{escape(qemu)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
      <boot order='2'/>
    </disk>
    <interface type='udp'>
      <mac address='{mac}'/>
      <source address='127.0.0.1' port='{plug_port}'>
        <local address='127.0.0.1' port='{vm_port}'/>
      </source>
      <model type='virtio'/>
      <boot order='1'/>
    </interface>
    <serial type='file'>
      <source path={quoteattr(str(serial))}/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def plug_command(switch: Path, plug_port: int, vm_port: int) -> list[str]:
    """vde_plug joining the lab's switch to a domain's UDP NIC (it listens at plug_port, sends to vm_port), started
    again whenever it exits, each exit noted in its log. A vde_plug was seen to have exited after its domain was
    reset (a zombie, and the domain never reached DHCP again): whatever ends it, the domain stays on the switch."""
    plug = shlex.join([VDE_PLUG, f"vde://{switch}", f"udp://127.0.0.1:{plug_port}->127.0.0.1:{vm_port}"])
    return ["sh", "-c", f"trap 'kill $plug; exit 0' TERM; while :; do {plug} & plug=$!; wait $plug; "
                        f"echo \"vde_plug exited (status $?): starting it again\"; sleep 0.2; done"]


def emulator_path() -> str | None:
    """sushy-emulator: a console script beside this Python (a venv not on PATH), or on PATH."""
    return shutil.which(EMULATOR, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def emulator_files(dir: Path, uri: str, username: str, password: str, ovmf_code: Path, ovmf_vars: Path) -> Path:
    """The emulator's config (a Python file) and its users file (bcrypt, as it requires); the config's path."""
    try:
        import bcrypt  # sushy-tools' own dependency
    except ImportError:
        raise BootserverError(f"{EMULATOR} is missing: pip install sushy-tools (the test extra)") from None
    dir.mkdir(parents=True, exist_ok=True)
    users = dir / "users"
    # Cost 4: the emulator checks the password at every request (12, the default, takes ~0.3 s here).
    users.write_text(f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    users.chmod(0o600)
    loaders = {"UEFI": {"x86_64": str(ovmf_code)}, "Legacy": {"x86_64": str(SEABIOS)}}
    config = dir / "emulator.conf"
    config.write_text(f"SUSHY_EMULATOR_LIBVIRT_URI = {uri!r}\nSUSHY_EMULATOR_AUTH_FILE = {str(users)!r}\n"
                      f"SUSHY_EMULATOR_BOOT_LOADER_MAP = {loaders!r}\n"
                      f"SUSHY_EMULATOR_SECURE_BOOT_DISABLED_NVRAM = {str(ovmf_vars)!r}\n")
    return config


def missing_tools() -> list[str]:
    """What the lab's Redfish BMCs need that this machine lacks, each with how to get it."""
    missing = [f"{tool} (apt-get install {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if emulator_path() is None:
        missing.append(f"{EMULATOR} (pip install sushy-tools libvirt-python: the test extra)")
    else:
        try:
            import libvirt  # noqa: F401 (the emulator's libvirt driver imports it)
        except ImportError:
            missing.append("libvirt-python (pip install libvirt-python: the test extra)")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        missing.append(f"a system user {QEMU_USER} (libvirtd looks it up at start: ./setup test adds it)")
    return missing
