"""Build the default netboot "agent" image: Debian's kernel plus a small busybox initramfs.

The agent is what a machine runs when the server has nothing else for it, and what the server
provisions machines with: it brings up its network with DHCP, starts an SSH server (dropbear,
with a host key made in RAM at every boot), reports to the server ("phones home", below), and
then waits for the server to log in, partition and format the disks, copy files over SFTP and
finally `reboot -f`.

Everything comes from Debian packages fetched with the host's own apt (`apt-get download`), so
a Debian (or derivative) host with up-to-date apt lists is required:

1. the kernel is the package `linux-image-amd64` currently depends on, plus `busybox-static`,
   the packages of AGENT_PROGRAMS (dropbear, sftp-server, sfdisk, parted, mke2fs, mkfs.fat, blkid...)
   and the closure of their library dependencies (libc6 included, so the host's own libraries
   never matter); the .debs are cached in `cache_dir/debs` and only downloaded again when the
   candidate changes or the cached file fails its SHA256 check;
2. the initramfs holds busybox (with one symlink per applet), those programs with every shared
   library they need (found by reading their ELF headers: PT_INTERP and DT_NEEDED, transitively)
   at the paths the packages give them, `/init` (the shell script in INIT_SCRIPT), udhcpc's event
   script, and the NIC/disk/filesystem modules of AGENT_MODULES with their dependency closure
   (computed with `depmod` on the extracted kernel tree), loaded by `/init` with `insmod` in
   dependency order;
3. the archive is a gzip-compressed cpio "newc" written by libarchive, every entry root-owned
   with a fixed mtime, so two builds from the same .debs give the same bytes;
4. `vmlinuz`, `initrd.img` and `version` land in `out_dir`, each written to a temporary name
   and renamed into place.

The contract between /init and the server
-----------------------------------------
Settings, from the kernel command line or from `/etc/bootserver/config.json` (the command line
wins when both give one):

    bootserver.url=URL          the server's base URL, e.g. http://10.0.0.1:8080
    bootserver.mac=MAC          the MAC the machine booted from (its interface is used)
    bootserver.token=TOKEN      sent back in the phone-home body
    bootserver.hostname=NAME    the hostname (else "bootserver-agent")

The server may add a per-machine overlay initrd (a second cpio the kernel unpacks over this one;
see `bootserver.overlay`) holding

    /etc/bootserver/config.json       {"mac": ..., "hostname": ..., "url": ..., "token": ...,
                                       "authorized_keys": [...]}; /init reads only the flat string
                                       fields (mac, hostname, url, token), with sed
    /etc/bootserver/authorized_keys   OpenSSH public keys, one a line, that may log in as root

Once the network is up and dropbear listens on port 22, /init POSTs to
`URL/boot/MAC-WITH-HYPHENS/phone-home` (lower-case MAC, '-' for ':'):

    {"mac": "52:54:00:12:34:56", "ip": "10.0.2.15", "host_key": "ssh-ed25519 AAAA...",
     "token": "...", "kernel": "6.1.0-...-amd64",
     "disks": [{"name": "vda", "size_bytes": 67108864, "partitions": 0, "removable": false}]}

`disks` lists /sys/block without loop, ram, zram, sr, dm-, fd and empty devices. It retries with
backoff (1, 2, 4 ... 30 s, forever) on network errors and any answer but 2xx, 401 and 403; on 401
or 403 it prints busybox wget's error, the status line ("HTTP/1.1 403 <reason>": a server that
wants to explain itself should say so in the reason phrase), and stops. On success it prints
"bootserver agent: phoned home to URL ok". A value /init lacks is sent as "" (the token, or
host_key when dropbear could not start).

The server should pin `host_key` for its SSH client, log in as root on port 22 (public keys
only: dropbear -s), use the programs of AGENT_PROGRAMS and busybox, and SFTP (dropbear runs
OpenSSH's sftp-server). There is no udev: lsblk shows no filesystem types, blkid does. The
server ends with `reboot -f` (busybox: reboot(2) at once, after a sync).
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

import libarchive
from libarchive import ffi
from libarchive.entry import ArchiveEntry, FileType
from libarchive.write import ArchiveWrite

from .errors import BootserverError

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Drivers the agent loads so that it finds its NIC and disks under QEMU and on common hardware,
# and the filesystems it formats and mounts (ext4, vfat: FAT_DEFAULT_IOCHARSET is "ascii", so
# nls_ascii too). Names as in modules.dep (dashes and underscores are the same to the kernel).
# crc32c_generic comes before ext4 and jbd2: they ask the crypto API for "crc32c" (a softdep
# that modules.dep does not show), and nothing would load it for them.
AGENT_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_net", "e1000",
    "virtio_blk", "ahci", "sd_mod", "nvme",
    "crc32c_generic", "ext4", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8",
)  # fmt: skip

# The programs the agent carries besides busybox: package -> {path in the package: names in
# /bin}. The first name is the file, the others symlinks to it; a name busybox also has (fdisk,
# mke2fs, mkdosfs, partprobe) is the real program. /sbin, /usr/bin and /usr/sbin are /bin.
AGENT_PROGRAMS: dict[str, dict[str, tuple[str, ...]]] = {
    "dropbear-bin": {"usr/sbin/dropbear": ("dropbear",), "usr/bin/dropbearkey": ("dropbearkey",)},
    "fdisk": {"sbin/sfdisk": ("sfdisk",)},
    "parted": {"sbin/parted": ("parted",), "sbin/partprobe": ("partprobe",)},
    "e2fsprogs": {
        "sbin/mke2fs": ("mke2fs", "mkfs.ext2", "mkfs.ext3", "mkfs.ext4"),
        "sbin/e2fsck": ("e2fsck", "fsck.ext2", "fsck.ext3", "fsck.ext4"),
        "sbin/tune2fs": ("tune2fs", "e2label"),
        "sbin/resize2fs": ("resize2fs",),
    },
    "dosfstools": {"sbin/mkfs.fat": ("mkfs.fat", "mkfs.vfat", "mkdosfs"), "sbin/fsck.fat": ("fsck.fat", "fsck.vfat")},
    # Debian's busybox has no blkid applet; lsblk -J and wipefs are what a provisioner wants too
    "util-linux": {"sbin/blkid": ("blkid",), "sbin/wipefs": ("wipefs",), "bin/lsblk": ("lsblk",)},
}
# dropbear's SFTP subsystem: the program, kept at its own path; dropbear runs it by the path
# compiled into it (SFTPSERVER_PATH, /usr/lib/sftp-server on Debian), a symlink to it here.
SFTP_PACKAGE = "openssh-sftp-server"
SFTP_SERVER = "usr/lib/openssh/sftp-server"
# Configuration files the programs read, copied from their packages.
AGENT_CONFIG_FILES: tuple[str, ...] = ("etc/mke2fs.conf",)

# Where the dynamic loader looks for libraries when there is no /etc/ld.so.cache (Debian's glibc
# searches the multiarch directories first); a library elsewhere would not be found at run time.
LIBRARY_DIRS: tuple[str, ...] = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib", "lib64")

# Every archive entry gets this mtime (2024-01-01T00:00:00Z) so builds are reproducible.
FIXED_MTIME = 1704067200

# Where /init finds the modules to insmod, one path (relative to /lib/modules/VERSION) a line.
MODULE_LIST = "etc/bootserver/modules"

INIT_SCRIPT = r"""#!/bin/sh
# /init of the bootserver agent (generated by bootserver.image; its module docstring has the
# contract with the server: settings, overlay files, phone-home).
#
# Steps are shell functions so that later features can add their own; anything in
# /etc/bootserver/init.d/*.sh is sourced after the phone-home, before "ready".
# /init must never exit: the kernel panics when PID 1 does.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

CONFIG=/etc/bootserver/config.json
HOST_KEY_FILE=/etc/dropbear/dropbear_ed25519_host_key

log() { echo "bootserver agent: $*"; }

mount_basics() {
    mkdir -p /proc /sys /dev /run /tmp
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts  # dropbear's ptys
    mount -t tmpfs -o mode=0755 tmpfs /run
    # the cpio's /dev/console is hidden under devtmpfs now: reopen the real one
    exec 0</dev/console 1>/dev/console 2>&1
    echo 4 > /proc/sys/kernel/printk 2>/dev/null  # only warnings and worse on the console
}

cmdline_arg() {  # cmdline_arg NAME: the value of NAME=VALUE on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "$1"=*) echo "${word#*=}"; return 0 ;;
        esac
    done
    return 1
}

config_field() {  # config_field NAME: the string field NAME of config.json (flat fields only)
    [ -f "$CONFIG" ] || return 1
    sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$CONFIG" | head -n 1
}

setting() {  # setting NAME: bootserver.NAME from the kernel command line, else NAME of config.json
    cmdline_arg "bootserver.$1" || config_field "$1"
}

read_settings() {
    [ -f "$CONFIG" ] && log "reading $CONFIG"
    URL=$(setting url)
    TOKEN=$(setting token)
    HOST_NAME=$(setting hostname)
    MAC=$(setting mac | tr 'A-F-' 'a-f:')
    if [ -n "$MAC" ] && ! echo "$MAC" | grep -qE '^([0-9a-f]{2}:){5}[0-9a-f]{2}$'; then
        log "ignoring mac $MAC: not a MAC address"
        MAC=
    fi
}

set_hostname() {
    if [ -n "$HOST_NAME" ] && ! echo "$HOST_NAME" | grep -qE '^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$'; then
        log "ignoring hostname $HOST_NAME: not a host name"
        HOST_NAME=
    fi
    HOST_NAME=${HOST_NAME:-bootserver-agent}
    hostname "$HOST_NAME"
    echo "$HOST_NAME" > /etc/hostname
    printf '127.0.1.1\t%s\n' "$HOST_NAME" >> /etc/hosts
}

load_modules() {
    kver=$(uname -r)
    [ -f /etc/bootserver/modules ] || return 0
    while read -r module; do
        [ -n "$module" ] || continue
        insmod "/lib/modules/$kver/$module" || log "insmod $module failed"
    done < /etc/bootserver/modules
}

start_ssh() {  # dropbear on port 22: root, with the keys of /etc/bootserver/authorized_keys
    mkdir -p /etc/dropbear /root/.ssh
    chmod 0700 /root /root/.ssh  # dropbear ignores keys that others could have written
    if [ -s /etc/bootserver/authorized_keys ]; then
        cp /etc/bootserver/authorized_keys /root/.ssh/authorized_keys
    else
        log "no /etc/bootserver/authorized_keys: nobody can log in with SSH"
        : > /root/.ssh/authorized_keys
    fi
    chmod 0600 /root/.ssh/authorized_keys
    if ! dropbearkey -t ed25519 -f "$HOST_KEY_FILE" >/tmp/dropbearkey.log 2>&1; then
        cat /tmp/dropbearkey.log
        log "could not make an SSH host key"
        return 1
    fi
    HOST_KEY=$(dropbearkey -y -f "$HOST_KEY_FILE" | grep '^ssh-ed25519 ' | cut -d ' ' -f 1,2)
    log "SSH host key: $HOST_KEY"
    # in the foreground (-F) of a loop that restarts it; -s: keys only; -E: log on the console
    (
        while :; do
            dropbear -F -E -s -r "$HOST_KEY_FILE" -p 22 -P /run/dropbear.pid
            log "dropbear exited ($?); restarting it"
            sleep 1
        done
    ) </dev/null &
    for i in $(seq 1 100); do
        if netstat -ltn 2>/dev/null | grep -q ':22 '; then
            log "SSH server listening on port 22"
            return 0
        fi
        sleep 0.1
    done
    log "SSH server not listening on port 22"
    return 1
}

console_shell() {  # a shell on the console, again whenever it exits
    while :; do
        setsid cttyhack sh -l
        sleep 1
    done
}

find_interface() {  # the interface with MAC $1 if given, else the first ethernet one
    want=$(echo "$1" | tr 'A-F' 'a-f')
    for i in $(seq 1 50); do
        first=
        for dir in /sys/class/net/*; do
            name=${dir##*/}
            [ "$name" = lo ] && continue
            [ "$(cat "$dir/type" 2>/dev/null)" = 1 ] || continue  # ARPHRD_ETHER
            if [ -n "$want" ] && [ "$(cat "$dir/address")" = "$want" ]; then
                echo "$name"; return 0
            fi
            [ -n "$first" ] || first=$name
        done
        if [ -n "$first" ] && { [ -z "$want" ] || [ "$i" -ge 10 ]; }; then
            echo "$first"; return 0
        fi
        sleep 0.2
    done
    return 1
}

bring_up_network() {
    ip link set lo up
    IFACE=$(find_interface "$MAC")
    if [ -z "$IFACE" ]; then
        log "no ethernet interface found"
        return 1
    fi
    ip link set "$IFACE" up
    [ -n "$MAC" ] || MAC=$(cat "/sys/class/net/$IFACE/address")
    log "DHCP on $IFACE ($MAC)"
    if ! udhcpc -i "$IFACE" -n -q -t 10 -T 2 -s /etc/udhcpc/default.script \
            -x "hostname:$HOST_NAME" >/tmp/udhcpc.log 2>&1; then
        cat /tmp/udhcpc.log
        log "DHCP on $IFACE failed"
        return 1
    fi
    IP=$(ip -4 -o addr show dev "$IFACE" | sed -n 's/.* inet \([0-9.]*\).*/\1/p' | head -n 1)
    log "network up: $IFACE $IP"
}

json_string() {  # json_string TEXT: TEXT as a JSON string, quotes included
    printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

disks_json() {  # the disks worth provisioning, as a JSON array
    list=
    for dir in /sys/block/*; do
        [ -f "$dir/size" ] || continue
        name=${dir##*/}
        case "$name" in loop*|ram*|zram*|sr*|dm-*|fd*) continue ;; esac
        sectors=$(cat "$dir/size")  # always 512-byte units
        [ "${sectors:-0}" -gt 0 ] || continue
        parts=0
        for part in "$dir/$name"*; do
            [ -f "$part/partition" ] && parts=$((parts + 1))
        done
        removable=false
        [ "$(cat "$dir/removable" 2>/dev/null)" = 1 ] && removable=true
        disk="{\"name\": \"$name\", \"size_bytes\": $((sectors * 512)),"
        disk="$disk \"partitions\": $parts, \"removable\": $removable}"
        list="${list:+$list, }$disk"
    done
    echo "[$list]"
}

phone_home() {  # POST what the server needs to provision us; retry until it answers
    if [ -z "$URL" ]; then
        log "no bootserver.url (kernel command line or $CONFIG); not phoning home"
        return 1
    fi
    mac_path=$(echo "$MAC" | tr ':A-F' '-a-f')
    target="${URL%/}/boot/$mac_path/phone-home"
    delay=1
    while :; do
        # made again at every try: a slow disk may have shown up since
        body="{\"mac\": \"$MAC\", \"ip\": \"$IP\", \"host_key\": $(json_string "$HOST_KEY"),"
        body="$body \"token\": $(json_string "$TOKEN"), \"kernel\": \"$(uname -r)\","
        body="$body \"disks\": $(disks_json)}"
        # not wget -T: busybox 1.35's wget crashes with it (SIGSEGV, every time)
        if timeout 20 wget -q -O /tmp/phone-home.out --header 'Content-Type: application/json' \
                --post-data "$body" "$target" 2>/tmp/phone-home.err; then
            log "phoned home to $target ok"
            return 0
        fi
        error=$(grep . /tmp/phone-home.err | tail -n 1)
        error=${error#wget: }
        # busybox wget says "wget: server returned error: HTTP/1.1 403 Forbidden"
        status=$(sed -n 's/.*server returned error: HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' /tmp/phone-home.err)
        case "$status" in
            401|403)
                log "phone-home to $target refused: $error"
                log "not trying again: the server does not accept this machine (its token?)"
                return 1
                ;;
        esac
        log "phone-home to $target failed: ${error:-no answer}; retrying in ${delay}s"
        sleep "$delay"
        delay=$((delay * 2))
        [ "$delay" -le 30 ] || delay=30
    done
}

run_hooks() {
    for hook in /etc/bootserver/init.d/*.sh; do
        [ -f "$hook" ] || continue
        log "running ${hook##*/}"
        . "$hook"
    done
}

stay_up() {  # the server logs in with SSH, provisions, and ends with `reboot -f`
    log "ready"
    while :; do
        sleep 3600
    done
}

mount_basics
log "starting (kernel $(uname -r))"
IFACE=
IP=
HOST_KEY=
read_settings
set_hostname
load_modules
log "modules loaded"
start_ssh
# the console is usable at once, even while the server is away
console_shell </dev/console >/dev/console 2>&1 &
bring_up_network && phone_home
run_hooks
stay_up
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script of the bootserver agent: configures $interface from the lease.
[ -n "$1" ] || exit 1
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set dev "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" \
            ${broadcast:+broadcast "$broadcast"}
        while ip route del default dev "$interface" 2>/dev/null; do :; done
        for gw in $router; do
            ip route add default via "$gw" dev "$interface" && break
        done
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for ns in $dns; do
            echo "nameserver $ns" >> /etc/resolv.conf
        done
        # the lease, for /init and hooks that want more than the address
        {
            echo "interface='$interface'"
            echo "ip='$ip'"
            echo "subnet='$subnet'"
            echo "router='$router'"
            echo "dns='$dns'"
            echo "serverid='$serverid'"
            echo "siaddr='$siaddr'"
        } > "/run/udhcpc.$interface.env"
        ;;
esac
exit 0
"""

ETC_FILES: dict[str, str] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/shadow": "root:*:19723:0:99999:7:::\n",
    "etc/shells": "/bin/sh\n",  # dropbear refuses a login shell not listed here
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/hostname": "bootserver-agent\n",
    "etc/profile": 'export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1="agent# "\n',
    "etc/resolv.conf": "",
}


@dataclass(frozen=True)
class AgentImage:
    kernel: Path  # vmlinuz
    initrd: Path  # initrd.img (gzip-compressed cpio newc)
    version: str  # kernel version string, e.g. "6.1.0-41-amd64"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bootserver, or ~/.cache/bootserver."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "bootserver"


class ConsoleProgress:
    """The default `progress` of build_agent_image: each message a line on stdout, and the
    downloads' progress one line redrawn with '\\r' on a terminal, else a line every 25 %.

    Any callable taking a message will do as `progress`; one with a `bar(label, done, total)`
    method like this one also gets the byte counts of downloads."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream  # None: sys.stdout when writing (pytest replaces it)
        self._open = False  # a '\r' line is on the screen
        self._step = -1

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def __call__(self, message: str) -> None:
        out = self.stream
        if self._open:
            out.write("\n")
            self._open = False
        out.write(message + "\n")
        out.flush()

    def bar(self, label: str, done: int, total: int) -> None:
        out = self.stream
        fraction = min(1.0, done / total) if total > 0 else 1.0
        text = f"{label}: {fraction:4.0%} ({done / 1e6:.1f} of {total / 1e6:.1f} MB)"
        if out.isatty():
            width = 30
            filled = int(fraction * width)
            out.write(f"\r{label}: [{'#' * filled}{'.' * (width - filled)}] {text[len(label) + 2 :]}\x1b[K")
            self._open = True
            if done >= total:
                out.write("\n")
                self._open = False
            out.flush()
            return
        step = int(fraction * 4)
        if step != self._step or done >= total:
            self._step = step if done < total else -1
            self(text)


console_progress = ConsoleProgress()


def build_agent_image(
    out_dir: Path, *, cache_dir: Path | None = None, progress: Callable[[str], None] = console_progress
) -> AgentImage:
    """Build vmlinuz, initrd.img and version into out_dir and return where they are."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    debs_dir = cache_dir / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    progress(f"finding the kernel package that {KERNEL_META_PACKAGE} depends on")
    kernel_package = current_kernel_package()
    progress(f"kernel package: {kernel_package}")
    programs = [*AGENT_PROGRAMS, SFTP_PACKAGE]
    packages = [kernel_package, BUSYBOX_PACKAGE, *library_closure(programs)]
    progress(f"{len(packages)} packages: {', '.join(packages)}")
    debs = _fetch_debs(packages, debs_dir, progress)

    with tempfile.TemporaryDirectory(prefix="image-build-", dir=cache_dir) as tmp:
        work = Path(tmp) / "root"
        progress(f"extracting {len(debs)} packages")
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(work)], what=f"dpkg -x {deb.name}")

        version = _kernel_version(work)
        progress(f"kernel version: {version}")
        vmlinuz = work / "boot" / f"vmlinuz-{version}"
        if not vmlinuz.is_file():
            raise BootserverError(f"{kernel_package} has no boot/vmlinuz-{version}")
        busybox = _find_busybox(work)

        progress(f"computing the module closure of {', '.join(AGENT_MODULES)}")
        modules = module_closure(work, version, AGENT_MODULES)
        progress("modules: " + (", ".join(_module_name(m) for m in modules) or "(all built in)"))

        files = agent_files(work)
        progress(f"programs: {', '.join(sorted(files.programs))}")
        progress(f"libraries: {', '.join(sorted(PurePosixPath(p).name for p in files.libraries))}")

        progress("writing initrd.img (gzip cpio newc)")
        initrd_tmp = _temp_name(out_dir, "initrd.img")
        try:
            write_initramfs(initrd_tmp, work, version, busybox, modules, files)
            os.chmod(initrd_tmp, 0o644)
            os.replace(initrd_tmp, out_dir / "initrd.img")
        finally:
            initrd_tmp.unlink(missing_ok=True)

        progress("copying vmlinuz")
        _atomic_copy(vmlinuz, out_dir / "vmlinuz")

    _atomic_write(out_dir / "version", (version + "\n").encode())
    image = AgentImage(kernel=out_dir / "vmlinuz", initrd=out_dir / "initrd.img", version=version)
    progress(
        f"agent image {version} ready in {out_dir}: vmlinuz {image.kernel.stat().st_size} bytes, "
        f"initrd.img {image.initrd.stat().st_size} bytes"
    )
    return image


# --- apt --------------------------------------------------------------------------------------


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise BootserverError(
            f"{what}: {cmd[0]} not found; building the agent image needs a Debian host with apt, dpkg and kmod"
        ) from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BootserverError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _apt_records(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each package's candidate record from `apt-cache show`, as field -> value."""
    if not packages:
        return {}
    try:
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", *packages],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as e:
        raise BootserverError("apt-cache not found; building the agent image needs a Debian host with apt") from e
    records: dict[str, dict[str, str]] = {}
    record: dict[str, str] = {}
    key = None
    for line in [*proc.stdout.splitlines(), ""]:
        if not line.strip():
            if "Package" in record:
                records.setdefault(record["Package"], record)
            record, key = {}, None
        elif line[0] in " \t" and key:
            record[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            record[key] = value.strip()
    missing = [p for p in packages if "Version" not in records.get(p, {})]
    if missing:
        raise BootserverError(
            f"apt knows no package {', '.join(missing)}: the apt lists are empty or stale; "
            "run apt-get update (as root) and try again"
        )
    return records


def _apt_record(package: str) -> dict[str, str]:
    """The candidate version's record from `apt-cache show`, as field -> value."""
    return _apt_records([package])[package]


def current_kernel_package() -> str:
    """The linux-image-VERSION package that linux-image-amd64's candidate depends on."""
    record = _apt_record(KERNEL_META_PACKAGE)
    for dep in record.get("Depends", "").split(","):
        name = dep.strip().split(" ")[0].split(":")[0]
        if re.fullmatch(r"linux-image-\d.*", name):
            return name
    raise BootserverError(
        f"{KERNEL_META_PACKAGE} {record['Version']} depends on no linux-image-VERSION package "
        f"(Depends: {record.get('Depends', '')!r})"
    )


def _is_library_package(name: str) -> bool:
    return name.startswith("lib") or name == "zlib1g"


def library_closure(packages: Iterable[str]) -> list[str]:
    """packages plus, transitively, the library packages (lib*, zlib1g) they (Pre-)Depend on:
    what the programs' shared libraries come from. Other dependencies (openssh-client, logsave,
    dmsetup...) are left out; of alternatives ("a | b") the first is taken."""
    order: list[str] = []
    todo = list(dict.fromkeys(packages))
    while todo:
        records = _apt_records(todo)
        order += todo
        found: list[str] = []
        for name in todo:
            for field in ("Pre-Depends", "Depends"):
                for dep in records[name].get(field, "").split(","):
                    first = dep.split("|")[0].strip().split(" ")[0].split(":")[0]
                    if first and _is_library_package(first) and first not in order and first not in found:
                        found.append(first)
        todo = found
    return order


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _deb_name(record: dict[str, str]) -> str:
    # apt-get download's own naming: the epoch's colon is URL-quoted
    version = record["Version"].replace(":", "%3a")
    return f"{record['Package']}_{version}_{record.get('Architecture', 'amd64')}.deb"


def _show_bytes(progress: Callable[[str], None], label: str, done: int, total: int, last: list[int]) -> None:
    """Download progress: progress.bar if it has one, else a message every 25 %."""
    bar = getattr(progress, "bar", None)
    if callable(bar):
        bar(label, done, total)
        return
    step = 4 if done >= total else int(4 * done / total) if total else 4
    if step != last[0]:
        last[0] = step
        progress(f"{label}: {min(1.0, done / total) if total else 1.0:.0%}")


def _fetch_debs(packages: Sequence[str], debs_dir: Path, progress: Callable[[str], None]) -> list[Path]:
    """The candidate .debs of packages in debs_dir, downloaded (by one `apt-get download`)
    unless a copy that passes its SHA256 check is there already."""
    records = _apt_records(packages)
    debs: list[Path] = []
    wanted: list[dict[str, str]] = []
    for package in packages:
        record = records[package]
        deb = debs_dir / _deb_name(record)
        debs.append(deb)
        want = record.get("SHA256")
        if deb.is_file() and (want is None or _sha256(deb) == want):
            continue
        if "Filename" not in record:  # known only from dpkg's status: the apt lists lack it
            raise BootserverError(
                f"apt has no download source for {package} {record['Version']}: run apt-get update (as root)"
            )
        wanted.append(record)
    progress(f"{len(packages) - len(wanted)} packages cached, {len(wanted)} to download")
    if wanted:
        _download(wanted, debs_dir, progress)
    # keep the cache bounded: older versions of these packages, and older kernels, go
    for package in packages:
        stale = set(debs_dir.glob(f"{_glob_escape(package)}_*.deb"))
        if package.startswith("linux-image-"):
            stale |= set(debs_dir.glob("linux-image-[0-9]*.deb"))
        for old in stale - set(debs):
            progress(f"removing old {old.name} from the cache")
            old.unlink(missing_ok=True)
    return debs


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _download(records: list[dict[str, str]], debs_dir: Path, progress: Callable[[str], None]) -> None:
    total = sum(int(r.get("Size", 0)) for r in records)
    label = f"downloading {len(records)} package{'s' if len(records) > 1 else ''}"
    names = ", ".join(f"{r['Package']} {r['Version']}" for r in records)
    progress(f"{label} ({total / 1e6:.1f} MB): {names}")
    command = ["apt-get", "download", *(f"{r['Package']}={r['Version']}" for r in records)]
    last = [-1]
    with tempfile.TemporaryDirectory(prefix="download-", dir=debs_dir) as tmp:
        try:
            proc = subprocess.Popen(
                command, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except FileNotFoundError as e:
            raise BootserverError("apt-get not found; building the agent image needs a Debian host with apt") from e
        with proc:
            # apt writes into the directory as it goes: its size is the progress
            assert proc.stdout is not None
            output = io.BytesIO()
            os.set_blocking(proc.stdout.fileno(), False)
            while proc.poll() is None:
                _show_bytes(progress, label, _tree_size(Path(tmp)), total, last)
                chunk = proc.stdout.read()
                if chunk:
                    output.write(chunk)
                time.sleep(0.1)
            os.set_blocking(proc.stdout.fileno(), True)
            output.write(proc.stdout.read() or b"")
        if proc.returncode != 0:
            detail = output.getvalue().decode(errors="replace").strip()
            raise BootserverError(
                f"apt-get download failed (exit {proc.returncode}): {detail} "
                "(if the apt lists are old, run apt-get update)"
            )
        _show_bytes(progress, label, total, total, last)
        for record in records:
            got = Path(tmp) / _deb_name(record)
            if not got.is_file():
                left = sorted(p.name for p in Path(tmp).glob("*.deb"))
                raise BootserverError(f"apt-get download left no {got.name} (it left {left})")
            want = record.get("SHA256")
            if want is not None and _sha256(got) != want:
                raise BootserverError(f"{got.name}: SHA256 differs from the apt lists'")
            os.replace(got, debs_dir / got.name)


def _tree_size(path: Path) -> int:
    size = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):  # renamed under us
                size += os.lstat(os.path.join(root, name)).st_size
    return size


# --- kernel tree ------------------------------------------------------------------------------


def _modules_root(work: Path) -> Path:
    for candidate in (work / "lib" / "modules", work / "usr" / "lib" / "modules"):
        if candidate.is_dir():
            return candidate
    raise BootserverError("the kernel package has no lib/modules directory")


def _kernel_version(work: Path) -> str:
    versions = sorted(p.name for p in _modules_root(work).iterdir() if p.is_dir())
    if len(versions) != 1:
        raise BootserverError(f"expected one kernel in the package, found {versions}")
    return versions[0]


def _find_busybox(work: Path) -> Path:
    for candidate in (work / "bin" / "busybox", work / "usr" / "bin" / "busybox"):
        if candidate.is_file():
            return candidate
    raise BootserverError(f"{BUSYBOX_PACKAGE} has no bin/busybox")


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")


def module_closure(work: Path, version: str, wanted: Iterable[str]) -> dict[str, list[str]]:
    """Module paths (relative to lib/modules/VERSION) for `wanted` and everything they need,
    dependencies first, each with its modules.dep line (every module it needs, transitively).
    Modules built into the kernel are left out."""
    mod_dir = _modules_root(work) / version
    _run(["depmod", "-b", str(work), version], what="depmod")
    dep_file = mod_dir / "modules.dep"
    if not dep_file.is_file():
        # a kmod that looks under usr/lib/modules while the package ships lib/modules or back
        alt = work / "usr" / "lib" / "modules" / version / "modules.dep"
        dep_file = alt if alt.is_file() else dep_file
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
        by_name[_module_name(module)] = module
    builtin_file = mod_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_module_name(line) for line in builtin_file.read_text().split()}

    order: dict[str, list[str]] = {}
    seen: set[str] = set()

    def visit(module: str) -> None:
        if module in seen:
            return
        seen.add(module)
        for dep in deps.get(module, []):
            visit(dep)
        order[module] = deps.get(module, [])

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise BootserverError(f"kernel {version} has no module {name} and does not build it in")
    return order


def _plain(relpath: str) -> str:
    """The module's path once decompressed: foo.ko.xz -> foo.ko."""
    return re.sub(r"\.ko\.(xz|gz|zst)$", ".ko", relpath)


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes; busybox insmod wants them uncompressed."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise BootserverError(f"{path.name} is zstd-compressed; install zstd to unpack it")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return data


# --- programs and their libraries -------------------------------------------------------------


def elf_dependencies(data: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP, the DT_NEEDED names) of a 64-bit little-endian ELF file; (None, []) for a
    static one."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise BootserverError("not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    interp = None
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:  # PT_INTERP
            interp = data[p_offset : p_offset + p_filesz].split(b"\0")[0].decode()
    if dynamic is None:
        return interp, []
    needed: list[int] = []
    strtab = None
    offset, size = dynamic
    for pos in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed.append(value)
        elif tag == 5:  # DT_STRTAB, an address
            strtab = value
    if strtab is None:
        return interp, []
    for vaddr, file_offset, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            strtab = strtab - vaddr + file_offset
            break
    else:
        raise BootserverError("ELF DT_STRTAB outside every PT_LOAD segment")
    names = [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in needed]
    return interp, names


@dataclass
class AgentFiles:
    """What of the extracted packages goes into the initramfs, by path in the archive."""

    files: dict[str, Path]  # regular files -> their source in the extracted tree
    links: dict[str, str]  # symlinks -> their targets
    programs: dict[str, str]  # name in /bin -> its path in the archive
    libraries: list[str]  # every shared library (and the dynamic loader) the programs need

    def __contains__(self, path: str) -> bool:
        return path in self.files or path in self.links


def _in_tree(work: Path, relpath: str) -> str | None:
    """relpath, or where a usr-merged (or not) package has it instead; None if none has it."""
    alternatives = [relpath, relpath.removeprefix("usr/") if relpath.startswith("usr/") else "usr/" + relpath]
    for candidate in alternatives:
        if (work / candidate).is_file() or (work / candidate).is_symlink():
            return candidate
    return None


def _resolve_in_tree(work: Path, relpath: str) -> str:
    """relpath with its symlinks followed inside the tree (an absolute target means work/...)."""
    return _add_path(work, relpath, AgentFiles(files={}, links={}, programs={}, libraries=[]))


def _add_path(work: Path, relpath: str, out: AgentFiles) -> str:
    """Add relpath (a file, or a chain of symlinks within the tree) to out; the final file's path."""
    for _ in range(20):
        if relpath in out.files:
            return relpath
        source = work / relpath
        if not source.is_symlink():
            if not source.is_file():
                raise BootserverError(f"{relpath} is missing from the extracted packages")
            out.files[relpath] = source
            return relpath
        target = os.readlink(source)
        out.links[relpath] = target
        parent = PurePosixPath(relpath).parent
        relpath = os.path.normpath(target.lstrip("/") if target.startswith("/") else str(parent / target))
    raise BootserverError(f"{relpath}: too many levels of symlinks")


def _find_library(work: Path, soname: str) -> str | None:
    for directory in LIBRARY_DIRS:
        path = f"{directory}/{soname}"
        if (work / path).is_file():  # follows links
            return path
    return None


def agent_files(work: Path) -> AgentFiles:
    """The programs of AGENT_PROGRAMS and sftp-server, their configuration files, and every
    shared library they need (transitively), from the packages extracted into work."""
    out = AgentFiles(files={}, links={}, programs={}, libraries=[])
    elves: list[str] = []
    for package, programs in AGENT_PROGRAMS.items():
        for path, names in programs.items():
            found = _in_tree(work, path)
            if found is None:
                raise BootserverError(f"{package} has no {path}")
            archive_path = f"bin/{names[0]}"
            out.files[archive_path] = work / _resolve_in_tree(work, found)
            out.programs[names[0]] = archive_path
            elves.append(archive_path)
            for alias in names[1:]:
                out.links[f"bin/{alias}"] = names[0]
                out.programs[alias] = archive_path

    sftp = _in_tree(work, SFTP_SERVER)
    if sftp is None:
        raise BootserverError(f"{SFTP_PACKAGE} has no {SFTP_SERVER}")
    sftp = _add_path(work, sftp, out)
    elves.append(sftp)
    out.programs["sftp-server"] = sftp
    expected = dropbear_sftp_path(out.files[out.programs["dropbear"]])
    if expected is not None and expected.lstrip("/") != sftp:
        link = expected.lstrip("/")
        out.links[link] = os.path.relpath(sftp, str(PurePosixPath(link).parent))

    for path in AGENT_CONFIG_FILES:
        found = _in_tree(work, path)
        if found is None:
            raise BootserverError(f"no package has {path}")
        out.files[path] = work / found

    seen: set[str] = set()
    while elves:
        path = elves.pop()
        if path in seen:
            continue
        seen.add(path)
        interp, needed = elf_dependencies(out.files[path].read_bytes())
        wanted = [interp.lstrip("/")] if interp else []
        for soname in needed:
            found = _find_library(work, soname)
            if found is None:
                raise BootserverError(
                    f"{path} needs {soname}, which none of the packages has in {', '.join(LIBRARY_DIRS)}"
                )
            wanted.append(found)
        for relpath in wanted:
            if relpath not in out:
                out.libraries.append(relpath)
            elves.append(_add_path(work, relpath, out))
    return out


def dropbear_sftp_path(dropbear: Path) -> str | None:
    """The sftp-server path compiled into dropbear (SFTPSERVER_PATH), if it names one."""
    match = re.search(rb"\0(/[\w./+-]*sftp-server)\0", dropbear.read_bytes())
    return match.group(1).decode() if match else None


# --- initramfs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: str  # inside the archive, no leading slash
    kind: int  # a FileType value
    perm: int
    data: bytes = b""
    target: str = ""  # symlinks
    rdev: tuple[int, int] = (0, 0)  # device nodes


def _busybox_applets(busybox: Path) -> list[str]:
    out = _run([str(busybox), "--list"], what="busybox --list")
    # the list names busybox itself: a link busybox -> busybox would replace the binary
    return sorted({a for a in out.split() if a and a != "busybox" and "/" not in a})


def initramfs_entries(
    work: Path, version: str, busybox: Path, modules: dict[str, list[str]], files: AgentFiles | None = None
) -> Iterator[_Entry]:
    """Every entry of the agent's initramfs, parents before children."""
    d, f, link = FileType.DIRECTORY, FileType.REGULAR_FILE, FileType.AE_IFLNK
    files = agent_files(work) if files is None else files
    made: set[str] = set()

    def parents(path: str) -> Iterator[_Entry]:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in made:
                made.add(directory)
                yield _Entry(directory, d, 0o755)

    dirs = "bin dev etc etc/bootserver etc/bootserver/init.d etc/dropbear etc/udhcpc lib lib/modules mnt proc run sys"
    dirs += " usr usr/lib var"
    for path in [*dirs.split(), f"lib/modules/{version}"]:
        made.add(path)
        yield _Entry(path, d, 0o755)
    made |= {"root", "tmp"}
    yield _Entry("root", d, 0o700)
    yield _Entry("tmp", d, 0o1777)
    yield _Entry("sbin", link, 0o777, target="bin")
    yield _Entry("usr/bin", link, 0o777, target="../bin")
    yield _Entry("usr/sbin", link, 0o777, target="../bin")
    yield _Entry("var/run", link, 0o777, target="../run")
    yield _Entry("var/tmp", link, 0o777, target="../tmp")
    # the kernel opens /dev/console for /init before /init can mount devtmpfs
    yield _Entry("dev/console", FileType.CHAR_DEVICE, 0o600, rdev=(5, 1))

    yield _Entry("bin/busybox", f, 0o755, data=busybox.read_bytes())
    for applet in _busybox_applets(busybox):
        if applet not in files.programs:  # the real program wins
            yield _Entry(f"bin/{applet}", link, 0o777, target="busybox")

    # the programs, their libraries and configuration, as the packages have them
    for path in sorted(files.files):
        yield from parents(path)
        mode = (files.files[path].stat().st_mode & 0o777) | 0o444
        yield _Entry(path, f, mode, data=files.files[path].read_bytes())
    for path in sorted(files.links):
        yield from parents(path)
        yield _Entry(path, link, 0o777, target=files.links[path])

    yield _Entry("init", f, 0o755, data=INIT_SCRIPT.encode())
    yield _Entry("etc/udhcpc/default.script", f, 0o755, data=UDHCPC_SCRIPT.encode())
    for path, text in ETC_FILES.items():
        yield _Entry(path, f, 0o600 if path == "etc/shadow" else 0o644, data=text.encode())

    # modules, decompressed, at their usual paths, plus a modules.dep for busybox modprobe
    src = _modules_root(work) / version
    dep_lines = []
    for module, needs in modules.items():
        name = _plain(module)
        yield from parents(f"lib/modules/{version}/{name}")
        yield _Entry(f"lib/modules/{version}/{name}", f, 0o644, data=_read_module(src / module))
        dep_lines.append(f"{name}:" + "".join(" " + _plain(n) for n in needs) + "\n")
    yield _Entry(MODULE_LIST, f, 0o644, data="".join(_plain(m) + "\n" for m in modules).encode())
    yield _Entry(f"lib/modules/{version}/modules.dep", f, 0o644, data="".join(dep_lines).encode())
    for extra in ("modules.builtin",):
        if (src / extra).is_file():
            yield _Entry(f"lib/modules/{version}/{extra}", f, 0o644, data=(src / extra).read_bytes())


class _InitramfsWriter(ArchiveWrite):
    """libarchive-c's writer plus symlinks.

    libarchive-c 5.3 sets `linkpath` with archive_entry_update_link_utf8, which makes a *hard*
    link unless the entry already has a symlink target, so add_file_from_memory cannot write a
    symlink (python-libarchive-c issue #143): the cpio gets empty link targets and the kernel
    then fails to exec /init (EACCES). This sets the target with archive_entry_copy_symlink.
    """

    def add_symlink(self, path: str, target: str, **attributes: object) -> None:
        entry = ArchiveEntry(
            pathname=path,
            size=0,
            filetype=FileType.AE_IFLNK,
            perm=0o777,
            header_codec=self.header_codec,
            **attributes,
        )
        copy_symlink = ffi.libarchive["archive_entry_copy_symlink"]  # a fresh function object
        copy_symlink.argtypes = [ffi.c_archive_entry_p, ctypes.c_char_p]
        copy_symlink.restype = None
        copy_symlink(entry._entry_p, target.encode())
        ffi.write_header(self._pointer, entry._entry_p)
        ffi.write_finish_entry(self._pointer)


def _write_entries(archive: _InitramfsWriter, entries: Iterable[_Entry]) -> None:
    for entry in entries:
        attrs: dict = {"uid": 0, "gid": 0, "uname": "root", "gname": "root", "mtime": FIXED_MTIME}
        if entry.kind == FileType.AE_IFLNK:
            archive.add_symlink(entry.path, entry.target, **attrs)
            continue
        if entry.kind == FileType.CHAR_DEVICE:
            attrs["rdevmajor"], attrs["rdevminor"] = entry.rdev
        archive.add_file_from_memory(
            entry.path,
            len(entry.data),
            entry.data,
            filetype=entry.kind,
            permission=entry.perm,
            **attrs,
        )


def write_initramfs(
    path: Path,
    work: Path,
    version: str,
    busybox: Path,
    modules: dict[str, list[str]],
    files: AgentFiles | None = None,
) -> None:
    """Write the agent's initramfs to path as a gzip-compressed cpio newc archive."""
    # no timestamp in the gzip header, so identical inputs give identical bytes
    with libarchive.file_writer(
        str(path),
        "cpio_newc",
        "gzip",
        archive_write_class=_InitramfsWriter,
        options="gzip:!timestamp",
    ) as archive:
        _write_entries(archive, initramfs_entries(work, version, busybox, modules, files))


# --- files ------------------------------------------------------------------------------------


def _temp_name(out_dir: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    return Path(tmp)


def _atomic_write(dest: Path, data: bytes) -> None:
    tmp = _temp_name(dest.parent, dest.name)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = _temp_name(dest.parent, dest.name)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
