"""OS install: unpack a root filesystem onto the mounted disk and make it boot on its own.

The rootfs tarball is streamed from the server over the pinned SSH session into `tar` on the node, so
neither side holds it in memory. The installed system is then given what it needs to come up as this
machine and no other: fstab by filesystem UUID, its hostname, an empty machine-id (systemd makes one on
first boot), a network file for the boot NIC by MAC, an SSH host key the server made and pinned (no trust
on first use), the server's key for root, a one-shot unit that reports the first boot, and GRUB installed
from the rootfs's own packages for the firmware the machine has (both, when the layout allows).
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import DiskLayout
from ..errors import BootserverError
from .disk import partition_path
from .ssh import FileSource, Progress, Runner

STEP = "install"
# How each tarball suffix is decompressed on the node (busybox tar reads only plain tar from a pipe).
DECOMPRESS = {".tar": "cat", ".tar.gz": "gzip -dc", ".tgz": "gzip -dc", ".tar.zst": "zstd -dc",
              ".tar.xz": "xz -dc"}
DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200"
REPORT_UNIT = "bootserver-report.service"
REPORT_DIR = "/etc/bootserver"


class InstallError(BootserverError):
    """The OS cannot be installed as configured; the message says what to change."""


@dataclass(frozen=True)
class OsInstall:
    """What a profile installs: a root filesystem tarball (on the server) and its kernel command line."""

    rootfs: Path
    cmdline: str = DEFAULT_CMDLINE


@dataclass(frozen=True)
class StaticAddress:
    """The boot NIC's address when the operator reserved one ([machines] ip, with [dhcp] mode = "full")."""

    address: str  # with its prefix length: "10.100.0.11/24"
    gateway: str | None = None
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Identity:
    """Who the installed system is: everything on its disk that belongs to this one machine."""

    mac: str
    hostname: str
    host_key: str  # OpenSSH private key, made by the server; its public half is pinned in the store
    authorized_key: str  # the server's provisioning key, for root
    report_path: str  # where the first boot reports, under the URL the agent booted with (bootserver.url=)
    report_token: str  # a one-time token for that report, not the agent's
    address: StaticAddress | None = None  # None: DHCP on the boot NIC


@dataclass(frozen=True)
class Report:
    """What the install found out, for the install's event."""

    source: str  # the asset's file name
    kernel: str  # the installed kernel's version ("" when an image keeps it where we do not look)
    platform: str  # the firmware the machine booted: efi or pcbios
    boot_loaders: tuple[str, ...]  # the GRUB targets we installed (an image brings its own: none)
    seconds: float
    sha256: str | None = None  # an image's verified digest
    grown: str | None = None  # an image's last partition grown to the disk: "/dev/vda3: 1.5 GiB -> 3.0 GiB"


def decompressor(rootfs: Path) -> str:
    for suffix, command in sorted(DECOMPRESS.items(), key=lambda item: -len(item[0])):
        if rootfs.name.endswith(suffix):
            return command
    raise InstallError(f"{rootfs}: a rootfs must be one of {', '.join(DECOMPRESS)}")


def unpack_command(rootfs: Path, target: str) -> str:
    """Decompress stdin into tar under `target`."""
    return piped(decompressor(rootfs), f"tar -x -C {shlex.quote(target)}", "decompressing the rootfs")


def piped(producer: str, consumer: str, what: str) -> str:
    """`producer | consumer`, failing if either side fails (POSIX sh has no `pipefail`): `what` names the
    producer in its failure."""
    status = "/tmp/bootserver-pipe.$$"
    return (f"{{ {producer}; echo $? > {status}; }} | {consumer} && "
            f"read rc < {status} && rm -f {status} && "
            f"{{ [ \"$rc\" = 0 ] || {{ echo \"{what} failed (status $rc)\" >&2; exit 1; }}; }}")


async def install(runner: Runner, spec: OsInstall, layout: DiskLayout, identity: Identity, target: str,
                  progress: Progress) -> Report:
    """Install `spec` onto the disk of `layout`, mounted at `target` on the node."""
    started = time.monotonic()
    if not spec.rootfs.is_file():
        raise InstallError(f"rootfs {spec.rootfs} does not exist on the server: build it with "
                           f"`bootserver image os debian` or fix [profiles.*.os] rootfs")
    platform = await firmware(runner)
    loaders = boot_loaders(layout, platform)  # refuses before anything is written
    q = shlex.quote(target)
    await runner.stream(STEP, unpack_command(spec.rootfs, target), FileSource(spec.rootfs), progress)
    version = await find_kernel(runner, target)
    uuids = await _uuids(runner, layout)
    await runner.run(STEP, f"cat > {q}/etc/fstab", input=fstab(layout, uuids))
    await runner.run(STEP, f"mkdir -p {q}/boot/grub && cat > {q}/boot/grub/grub.cfg",
                     input=grub_config(version, uuids[_root(layout)], spec.cmdline))
    await personalize(runner, identity, target, [_grub_install(loader, layout) for loader in loaders])
    return Report(spec.rootfs.name, version, platform, loaders, round(time.monotonic() - started, 1))


async def firmware(runner: Runner) -> str:
    """What the node booted with: efi or pcbios."""
    return (await runner.run(STEP, "if [ -d /sys/firmware/efi ]; then echo efi; else echo pcbios; fi")).strip()


async def personalize(runner: Runner, identity: Identity, target: str, chrooted: list[str]) -> None:
    """Make the system mounted at `target` this machine (see Identity), run `chrooted` in it, and enable
    its network and its first-boot report."""
    await _identity(runner, identity, await _server_url(runner) + identity.report_path, target)
    await in_chroot(runner, target, [*chrooted, f"systemctl enable systemd-networkd.service {REPORT_UNIT}"])


def boot_loaders(layout: DiskLayout, platform: str) -> tuple[str, ...]:
    """The GRUB targets to install: the machine's own firmware's (required), and the other's if the
    layout has room for it, so the disk boots on either."""
    has_bios = any(p.type == "bios" for p in layout.partitions)
    has_esp = _esp(layout) is not None
    if platform == "efi" and not has_esp:
        raise InstallError("this machine boots UEFI, but the disk layout has no EFI system partition mounted at "
                           "/boot/efi: add one (type = \"esp\", filesystem = \"vfat\", mount = \"/boot/efi\")")
    if platform == "pcbios" and not has_bios:
        raise InstallError("this machine boots BIOS, and GRUB on a GPT disk needs a BIOS boot partition: add one "
                           "(type = \"bios\", size = \"1MiB\", filesystem = \"none\") to the disk layout")
    return tuple(name for name, present in (("pcbios", has_bios), ("efi", has_esp)) if present)


def _esp(layout: DiskLayout) -> str | None:
    for p in layout.partitions:
        if p.type == "esp" and p.mount in ("/boot/efi", "/efi"):
            return p.mount
    return None


def _root(layout: DiskLayout) -> str:
    for p in layout.partitions:
        if p.mount == "/":
            return p.label
    raise InstallError("the disk layout mounts nothing at /: an OS needs a root partition (mount = \"/\")")


SIGNED_SHIM = "/usr/lib/shim/shimx64.efi.signed"  # Debian's shim-signed
SIGNED_GRUB_DIR = "/usr/lib/grub/x86_64-efi-signed"  # Debian's grub-efi-amd64-signed
SECURE_BOOT_VARIABLE = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def _grub_install(platform: str, layout: DiskLayout) -> str:
    if platform == "pcbios":
        return f"grub-install --target=i386-pc {shlex.quote(layout.device)}"
    # --removable: \EFI\BOOT\BOOTX64.EFI, found by firmware without an NVRAM entry (which we do not write).
    efi = (f"grub-install --target=x86_64-efi --efi-directory={shlex.quote(_esp(layout) or '/boot/efi')} "
           f"--removable --no-nvram")
    # A rootfs with Debian's signed shim and GRUB boots with Secure Boot on or off: shim as BOOTX64.EFI, then the
    # signed GRUB, then the signed kernel (shim runs GRUB also where Secure Boot is off).
    # Without them, a machine running with Secure Boot on would be left with a disk its firmware refuses: say so.
    refuse = (f"if [ \"$(tail -c 1 {SECURE_BOOT_VARIABLE} 2>/dev/null | od -An -tu1 | tr -d ' ')\" = 1 ]; then "
              f"echo 'this machine runs with Secure Boot on, but the rootfs has no signed shim and GRUB "
              f"(Debian: shim-signed, grub-efi-amd64-signed, which bootserver image os debian includes): "
              f"its firmware would refuse the disk' >&2; exit 1; fi")
    return (f"if [ -f {SIGNED_SHIM} ] && [ -d {SIGNED_GRUB_DIR} ]; then {efi} --uefi-secure-boot; "
            f"else {refuse}; {efi} --no-uefi-secure-boot; fi")


async def find_kernel(runner: Runner, target: str) -> str:
    """The newest kernel in the rootfs's /boot that has an initrd beside it."""
    q = shlex.quote(target)
    out = await runner.run(STEP, f"cd {q}/boot && for k in vmlinuz-*; do v=${{k#vmlinuz-}}; "
                                 f"[ -f \"initrd.img-$v\" ] && echo \"$v\"; done; true")
    versions = sorted(out.split(), key=_version_key)
    if not versions:
        raise InstallError("the rootfs has no kernel: /boot holds no vmlinuz-VERSION with an initrd.img-VERSION "
                           "(install a linux-image package into it)")
    return versions[-1]


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"[.-]", version)]


async def _uuids(runner: Runner, layout: DiskLayout) -> dict[str, str]:
    """Filesystem UUIDs by partition label, for the partitions that have a filesystem."""
    found = {}
    for number, p in enumerate(layout.partitions, start=1):
        if p.filesystem == "none":
            continue
        path = partition_path(layout.device, number)
        uuid = (await runner.run(STEP, f"blkid -s UUID -o value {shlex.quote(path)}")).strip()
        if not uuid:
            raise InstallError(f"{path} has no filesystem UUID: was it formatted?")
        found[p.label] = uuid
    return found


def fstab(layout: DiskLayout, uuids: dict[str, str]) -> str:
    lines = ["# written by bootserver: by filesystem UUID, so disk names may change"]
    for p in layout.partitions:
        if p.filesystem == "swap":
            lines.append(f"UUID={uuids[p.label]} none swap sw 0 0")
        elif p.mount:
            passno = 1 if p.mount == "/" else 2
            options = "umask=0077" if p.filesystem == "vfat" else "errors=remount-ro"
            lines.append(f"UUID={uuids[p.label]} {p.mount} {p.filesystem} {options} 0 {passno}")
    return "\n".join(lines) + "\n"


def grub_config(kernel: str, root_uuid: str, cmdline: str) -> str:
    """Our own grub.cfg: one entry, found by filesystem UUID, on the serial line and the screen."""
    return (f"# written by bootserver\n"
            f"serial --unit=0 --speed=115200\n"
            f"terminal_input console serial\n"
            f"terminal_output console serial\n"
            f"set timeout=1\n"
            f"insmod part_gpt\n"
            f"insmod ext2\n"
            f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
            f"menuentry 'installed by bootserver ({kernel})' {{\n"
            f"  linux /boot/vmlinuz-{kernel} root=UUID={root_uuid} ro {cmdline}\n"
            f"  initrd /boot/initrd.img-{kernel}\n"
            f"}}\n")


async def in_chroot(runner: Runner, target: str, commands: list[str]) -> None:
    """Run `commands` chrooted into `target` with /dev, /proc and /sys bound; always unbind."""
    q = shlex.quote(target)
    binds = ("dev", "proc", "sys")
    await runner.run(STEP, " && ".join(f"mount -o bind /{d} {q}/{d}" for d in binds))
    try:
        for command in commands:
            await runner.run(STEP, f"chroot {q} /bin/sh -c {shlex.quote(command)}")
    finally:
        if not runner.lost:
            await runner.run(STEP, "; ".join(f"umount {q}/{d}" for d in reversed(binds)))


async def _server_url(runner: Runner) -> str:
    """The server's URL as the agent was told it (its kernel command line): where the installed OS reports."""
    cmdline = await runner.run(STEP, "cat /proc/cmdline")
    for word in cmdline.split():
        if word.startswith("bootserver.url="):
            return word.removeprefix("bootserver.url=").rstrip("/")
    raise InstallError("the agent's kernel command line has no bootserver.url=: the installed OS would not know "
                       "where to report its first boot (boot the agent from a bootserver profile)")


async def _identity(runner: Runner, identity: Identity, report_url: str, target: str) -> None:
    def path(p: str) -> str:
        return shlex.quote(posixpath.join(target, p.lstrip("/")))

    await runner.run(STEP, f"cat > {path('/etc/hostname')}", input=f"{identity.hostname}\n")
    await runner.run(STEP, f"cat > {path('/etc/hosts')}",
                     input=f"127.0.0.1 localhost\n127.0.1.1 {identity.hostname}\n::1 localhost\n")
    # Empty, not absent: systemd makes a fresh id on first boot, so clones never share one.
    await runner.run(STEP, f": > {path('/etc/machine-id')}")
    await runner.run(STEP, f"mkdir -p {path('/etc/systemd/network')} && "
                           f"cat > {path('/etc/systemd/network/10-bootserver.network')}", input=network_file(identity))
    # Host keys a rootfs or image came with are every clone's: only the one made for this machine stays.
    await runner.run(STEP, f"rm -f {path('/etc/ssh')}/ssh_host_*")
    await runner.run(STEP, f"mkdir -p {path('/etc/ssh/sshd_config.d')} && umask 077 && "
                           f"cat > {path('/etc/ssh/ssh_host_ed25519_key')}", input=identity.host_key)
    await runner.run(STEP, f"cat > {path('/etc/ssh/sshd_config.d/10-bootserver.conf')}",
                     input="HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n")
    await runner.run(STEP, f"mkdir -p {path('/root/.ssh')} && chmod 700 {path('/root/.ssh')} && umask 077 && "
                           f"cat > {path('/root/.ssh/authorized_keys')}", input=identity.authorized_key.strip() + "\n")
    config = json.dumps({"url": report_url, "token": identity.report_token})
    await runner.run(STEP, f"mkdir -p {path(REPORT_DIR)} && umask 077 && cat > {path(REPORT_DIR + '/report.json')}",
                     input=config + "\n")
    await runner.run(STEP, f"cat > {path('/usr/local/sbin/bootserver-report')} && "
                           f"chmod 755 {path('/usr/local/sbin/bootserver-report')}", input=REPORT_SCRIPT)
    await runner.run(STEP, f"cat > {path('/etc/systemd/system/' + REPORT_UNIT)}", input=REPORT_UNIT_TEXT)


def network_file(identity: Identity) -> str:
    static = identity.address
    if static is None:
        network = "DHCP=yes\n"
    else:
        network = (f"Address={static.address}\n" + (f"Gateway={static.gateway}\n" if static.gateway else "")
                   + "".join(f"DNS={server}\n" for server in static.dns))
    return (f"# written by bootserver: the NIC this machine booted from\n"
            f"[Match]\nMACAddress={identity.mac}\n\n[Network]\n{network}")


# The first boot's report: once the system settles, POST what came up to the server, then forget the
# token (it is spent either way). Python because the rootfs has it and it writes JSON correctly.
REPORT_SCRIPT = """#!/usr/bin/python3
import json, os, subprocess, time, urllib.request

CONFIG = "/etc/bootserver/report.json"
config = json.load(open(CONFIG))
state = subprocess.run(["systemctl", "is-system-running", "--wait"], capture_output=True, text=True).stdout.strip()
failed = subprocess.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"],
                        capture_output=True, text=True).stdout.splitlines()
try:  # UEFI's SecureBoot variable: attributes, then one byte (1: on); none without UEFI
    with open("/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c", "rb") as f:
        secure_boot = f.read()[-1:] == b"\x01"
except OSError:
    secure_boot = None
body = json.dumps({
    "token": config["token"],
    "kernel": os.uname().release,
    "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
    "system_state": state,
    "failed_units": [line.split()[0] for line in failed if line.strip()],
    "secure_boot": secure_boot,
}).encode()
request = urllib.request.Request(config["url"], data=body, headers={"Content-Type": "application/json"})
for attempt in range(30):
    try:
        urllib.request.urlopen(request, timeout=10).read()
        break
    except OSError as exc:
        if getattr(exc, "code", 0) in (400, 403, 404, 409):
            break
        time.sleep(2)
os.remove(CONFIG)
"""

REPORT_UNIT_TEXT = """[Unit]
Description=Report this system's first boot to bootserver
After=network-online.target
Wants=network-online.target
ConditionPathExists=/etc/bootserver/report.json

[Service]
Type=simple
ExecStart=/usr/local/sbin/bootserver-report

[Install]
WantedBy=multi-user.target
"""
