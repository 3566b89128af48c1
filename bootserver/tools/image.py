"""Build the default netboot "agent" image: Debian's kernel plus a small busybox initramfs.

The agent is what a machine runs when the server has nothing else for it, and what the server
provisions machines with: it brings up its network with DHCP, starts an SSH server (dropbear,
with a host key made in RAM at every boot), reports to the server ("phones home", below), and
then waits for the server to log in, partition and format the disks, copy files over SFTP and
finally `reboot -f`.

Everything comes from Debian packages fetched with the host's own apt (`apt-get download`), so
a Debian (or derivative) host with up-to-date apt lists is required:

1. the kernel is the package `linux-image-amd64` currently depends on, plus `busybox-static`,
   the packages of AGENT_PROGRAMS (dropbear, sftp-server, sfdisk, parted, mke2fs, mkfs.fat, blkid,
   openssl...) and the closure of their library dependencies (libc6 included, so the host's own
   libraries never matter); the .debs are cached in `cache_dir/debs` and only downloaded again when the
   candidate changes or the cached file fails its SHA256 check;
2. the initramfs holds busybox (with one symlink per applet), those programs with every shared
   library they need (found by reading their ELF headers with pyelftools: PT_INTERP and
   DT_NEEDED, transitively) at the paths the packages give them, `/init` and udhcpc's event
   script (bootserver/tools/agent/init.sh and udhcpc.sh), and the NIC/disk/filesystem modules of
   AGENT_MODULES with their dependency closure (computed with `depmod` on the extracted kernel
   tree), loaded by `/init` with `insmod` in dependency order;
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
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

from ..errors import BootserverError
from .apt import KERNEL_META_PACKAGE, current_kernel_package, fetch_debs, library_closure, run
from .contents import (
    AGENT_MODULES,
    AGENT_PROGRAMS,
    SFTP_PACKAGE,
    agent_files,
    in_tree,
    kernel_version,
    module_closure,
    module_name,
)
from .initramfs import write_initramfs

BUSYBOX_PACKAGE = "busybox-static"


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
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_package, debs = _fetch_packages(cache_dir / "debs", progress)

    with tempfile.TemporaryDirectory(prefix="image-build-", dir=cache_dir) as tmp:
        work = Path(tmp) / "root"
        progress(f"extracting {len(debs)} packages")
        for deb in debs:
            run(["dpkg", "-x", str(deb), str(work)], what=f"dpkg -x {deb.name}")
        version = kernel_version(work)
        progress(f"kernel version: {version}")
        vmlinuz = work / "boot" / f"vmlinuz-{version}"
        if not vmlinuz.is_file():
            raise BootserverError(f"{kernel_package} has no boot/vmlinuz-{version}")
        _build_initrd(out_dir / "initrd.img", work, version, progress)
        progress("copying vmlinuz")
        with _replacing(out_dir / "vmlinuz") as part:
            shutil.copyfile(vmlinuz, part)

    with _replacing(out_dir / "version") as part:
        part.write_text(version + "\n")
    image = AgentImage(kernel=out_dir / "vmlinuz", initrd=out_dir / "initrd.img", version=version)
    progress(
        f"agent image {version} ready in {out_dir}: vmlinuz {image.kernel.stat().st_size} bytes, "
        f"initrd.img {image.initrd.stat().st_size} bytes"
    )
    return image


def _fetch_packages(debs_dir: Path, progress: Callable[[str], None]) -> tuple[str, list[Path]]:
    """The kernel package's name, and the .debs of every package the image is made of."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    progress(f"finding the kernel package that {KERNEL_META_PACKAGE} depends on")
    kernel_package = current_kernel_package()
    progress(f"kernel package: {kernel_package}")
    packages = [kernel_package, BUSYBOX_PACKAGE, *library_closure([*AGENT_PROGRAMS, SFTP_PACKAGE])]
    progress(f"{len(packages)} packages: {', '.join(packages)}")
    return kernel_package, fetch_debs(packages, debs_dir, progress)


def _build_initrd(dest: Path, work: Path, version: str, progress: Callable[[str], None]) -> None:
    """Write the initramfs of the packages extracted into work to dest."""
    busybox = work / in_tree(work, "bin/busybox", BUSYBOX_PACKAGE)
    progress(f"computing the module closure of {', '.join(AGENT_MODULES)}")
    modules = module_closure(work, version, AGENT_MODULES)
    progress("modules: " + (", ".join(module_name(m) for m in modules) or "(all built in)"))
    files = agent_files(work)
    progress(f"programs: {', '.join(sorted(files.programs))}")
    progress(f"libraries: {', '.join(sorted(PurePosixPath(p).name for p in files.libraries))}")
    progress("writing initrd.img (gzip cpio newc)")
    with _replacing(dest) as part:
        write_initramfs(part, work, version, busybox, modules, files)


@contextlib.contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """A temporary file beside dest that replaces it (mode 0644) if the block succeeds: a reader
    never sees a half-written file."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    part = Path(name)
    try:
        yield part
        part.chmod(0o644)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
