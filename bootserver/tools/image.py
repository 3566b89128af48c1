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
import ctypes
import glob
import gzip
import hashlib
import itertools
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

import libarchive
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment
from libarchive import ffi
from libarchive.entry import ArchiveEntry, FileType
from libarchive.write import ArchiveWrite

from ..errors import BootserverError

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
    # the node's TLS key is made on the node (genpkey) and only its request (req) goes to the server.
    # There is no /usr/lib/ssl/openssl.cnf: the server passes `openssl req` a config of its own.
    "openssl": {"usr/bin/openssl": ("openssl",)},
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

# The agent's shell scripts, kept as files beside this module (shellchecked by the tests):
# path in the archive -> file in bootserver/tools/agent/.
AGENT_DIR = Path(__file__).with_name("agent")
AGENT_SCRIPTS: dict[str, str] = {"init": "init.sh", "etc/udhcpc/default.script": "udhcpc.sh"}

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
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_package, debs = _fetch_packages(cache_dir / "debs", progress)

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
    return kernel_package, _fetch_debs(packages, debs_dir, progress)


def _build_initrd(dest: Path, work: Path, version: str, progress: Callable[[str], None]) -> None:
    """Write the initramfs of the packages extracted into work to dest."""
    busybox = work / _in_tree(work, "bin/busybox", BUSYBOX_PACKAGE)
    progress(f"computing the module closure of {', '.join(AGENT_MODULES)}")
    modules = module_closure(work, version, AGENT_MODULES)
    progress("modules: " + (", ".join(_module_name(m) for m in modules) or "(all built in)"))
    files = agent_files(work)
    progress(f"programs: {', '.join(sorted(files.programs))}")
    progress(f"libraries: {', '.join(sorted(PurePosixPath(p).name for p in files.libraries))}")
    progress("writing initrd.img (gzip cpio newc)")
    with _replacing(dest) as part:
        write_initramfs(part, work, version, busybox, modules, files)


# --- apt --------------------------------------------------------------------------------------


def _run(cmd: list[str], *, what: str, check: bool = True) -> str:
    """cmd's stdout; a BootserverError if it is missing or (with check) fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise BootserverError(
            f"{what}: {cmd[0]} not found; building the agent image needs a Debian host with apt, dpkg and kmod"
        ) from e
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BootserverError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _apt_records(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each package's candidate record from `apt-cache show`, as field -> value."""
    if not packages:
        return {}
    # not checked: apt-cache fails when it lacks any of them, and saying which is more useful
    text = _run(["apt-cache", "show", "--no-all-versions", *packages], what="apt-cache show", check=False)
    records: dict[str, dict[str, str]] = {}
    record: dict[str, str] = {}
    key = None
    for line in [*text.splitlines(), ""]:
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


def _dependencies(record: dict[str, str]) -> list[str]:
    """The packages record (Pre-)Depends on, without versions or architectures; of
    alternatives ("a | b") the first."""
    names = []
    for key in ("Pre-Depends", "Depends"):
        for dep in record.get(key, "").split(","):
            name = dep.split("|")[0].strip().split(" ")[0].split(":")[0]
            if name:
                names.append(name)
    return names


def current_kernel_package() -> str:
    """The linux-image-VERSION package that linux-image-amd64's candidate depends on."""
    record = _apt_records([KERNEL_META_PACKAGE])[KERNEL_META_PACKAGE]
    for name in _dependencies(record):
        if re.fullmatch(r"linux-image-\d.*", name):
            return name
    raise BootserverError(
        f"{KERNEL_META_PACKAGE} {record['Version']} depends on no linux-image-VERSION package "
        f"(Depends: {record.get('Depends', '')!r})"
    )


def library_closure(packages: Iterable[str]) -> list[str]:
    """packages plus, transitively, the library packages (lib*, zlib1g) they (Pre-)Depend on:
    what the programs' shared libraries come from. Other dependencies (openssh-client, logsave,
    dmsetup...) are left out."""
    order: list[str] = []
    todo = list(dict.fromkeys(packages))
    while todo:
        records = _apt_records(todo)
        order += todo
        found = (dep for name in todo for dep in _dependencies(records[name]))
        libraries = (dep for dep in found if dep.startswith("lib") or dep == "zlib1g")
        todo = [dep for dep in dict.fromkeys(libraries) if dep not in order]
    return order


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _deb_name(record: dict[str, str]) -> str:
    # apt-get download's own naming: the epoch's colon is URL-quoted
    version = record["Version"].replace(":", "%3a")
    return f"{record['Package']}_{version}_{record.get('Architecture', 'amd64')}.deb"


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
    _prune_cache(packages, debs, debs_dir, progress)
    return debs


def _prune_cache(packages: Sequence[str], keep: list[Path], debs_dir: Path, progress: Callable[[str], None]) -> None:
    """Keep the cache bounded: older versions of these packages, and older kernels, go."""
    for package in packages:
        stale = set(debs_dir.glob(f"{glob.escape(package)}_*.deb"))
        if package.startswith("linux-image-"):
            stale |= set(debs_dir.glob("linux-image-[0-9]*.deb"))
        for old in stale - set(keep):
            progress(f"removing old {old.name} from the cache")
            old.unlink(missing_ok=True)


def _download(records: list[dict[str, str]], debs_dir: Path, progress: Callable[[str], None]) -> None:
    """The .debs of records into debs_dir, by one `apt-get download`, each checked against its SHA256."""
    total = sum(int(r.get("Size", 0)) for r in records)
    label = f"downloading {len(records)} package{'s' if len(records) > 1 else ''}"
    names = ", ".join(f"{r['Package']} {r['Version']}" for r in records)
    progress(f"{label} ({total / 1e6:.1f} MB): {names}")
    last = [-1]
    with tempfile.TemporaryDirectory(prefix="download-", dir=debs_dir) as tmp:
        _apt_get_download(records, Path(tmp), lambda done: _show_bytes(progress, label, done, total, last))
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


def _apt_get_download(records: list[dict[str, str]], into: Path, show: Callable[[int], None]) -> None:
    """Run `apt-get download` in the directory into, calling show with the bytes it has so far."""
    command = ["apt-get", "download", *(f"{r['Package']}={r['Version']}" for r in records)]
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(command, cwd=into, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        except FileNotFoundError as e:
            raise BootserverError("apt-get not found; building the agent image needs a Debian host with apt") from e
        with proc:
            while proc.poll() is None:
                show(_tree_size(into))  # apt writes into the directory as it goes
                time.sleep(0.1)
        if proc.returncode != 0:
            output.seek(0)
            detail = output.read().decode(errors="replace").strip()
            raise BootserverError(
                f"apt-get download failed (exit {proc.returncode}): {detail} "
                "(if the apt lists are old, run apt-get update)"
            )


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


def _module_name(relpath: str) -> str:
    """The name the kernel knows a module by: kernel/net/core/fail-over.ko.xz -> fail_over."""
    return PurePosixPath(_plain(relpath)).name.removesuffix(".ko").replace("-", "_")


def _modules_dep(work: Path, version: str) -> dict[str, list[str]]:
    """modules.dep, made by depmod: module path -> the paths of every module it needs."""
    _run(["depmod", "-b", str(work), version], what="depmod")
    dep_file = _modules_root(work) / version / "modules.dep"
    if not dep_file.is_file():
        # a kmod that looks under usr/lib/modules while the package ships lib/modules or back
        alt = work / "usr" / "lib" / "modules" / version / "modules.dep"
        dep_file = alt if alt.is_file() else dep_file
    lines = (line.partition(":") for line in dep_file.read_text().splitlines())
    return {module: rest.split() for module, _, rest in lines}


def module_closure(work: Path, version: str, wanted: Iterable[str]) -> dict[str, list[str]]:
    """Module paths (relative to lib/modules/VERSION) for `wanted` and everything they need,
    dependencies first, each with its modules.dep line (every module it needs, transitively).
    Modules built into the kernel are left out."""
    deps = _modules_dep(work, version)
    by_name = {_module_name(module): module for module in deps}
    builtin_file = _modules_root(work) / version / "modules.builtin"
    builtin = {_module_name(line) for line in builtin_file.read_text().split()} if builtin_file.is_file() else set()

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


def elf_dependencies(path: Path) -> tuple[str | None, list[str]]:
    """(PT_INTERP, the DT_NEEDED names) of an ELF file; (None, []) for a static one."""
    interp, needed = None, []
    try:
        with path.open("rb") as f:
            for segment in ELFFile(f).iter_segments():
                if isinstance(segment, InterpSegment):
                    interp = segment.get_interp_name()
                elif isinstance(segment, DynamicSegment):
                    needed = [tag.needed for tag in segment.iter_tags("DT_NEEDED")]
    except ELFError as e:
        raise BootserverError(f"{path.name}: not an ELF file we can read ({e})") from e
    return interp, needed


@dataclass
class AgentFiles:
    """What of the extracted packages goes into the initramfs, by path in the archive."""

    files: dict[str, Path] = field(default_factory=dict)  # regular files -> their source in the tree
    links: dict[str, str] = field(default_factory=dict)  # symlinks -> their targets
    programs: dict[str, str] = field(default_factory=dict)  # name in /bin -> its path in the archive
    libraries: list[str] = field(default_factory=list)  # the shared libraries (and loader) they need

    def __contains__(self, path: str) -> bool:
        return path in self.files or path in self.links


def _in_tree(work: Path, relpath: str, package: str | None) -> str:
    """relpath, or where a usr-merged (or not) package has it instead."""
    other = relpath.removeprefix("usr/") if relpath.startswith("usr/") else "usr/" + relpath
    for candidate in (relpath, other):
        if (work / candidate).is_file() or (work / candidate).is_symlink():
            return candidate
    raise BootserverError(f"{package} has no {relpath}" if package else f"no package has {relpath}")


def _add_path(work: Path, relpath: str, out: AgentFiles) -> str:
    """Add relpath (a file, or a chain of symlinks within the tree) to out; the final file's path.
    An absolute link target is taken as inside the tree, as it will be in the initramfs."""
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


def _find_library(work: Path, soname: str, needed_by: str) -> str:
    for directory in LIBRARY_DIRS:
        path = f"{directory}/{soname}"
        if (work / path).is_file():  # follows links
            return path
    raise BootserverError(f"{needed_by} needs {soname}, which none of the packages has in {', '.join(LIBRARY_DIRS)}")


def agent_files(work: Path) -> AgentFiles:
    """The programs of AGENT_PROGRAMS and sftp-server, their configuration files, and every
    shared library they need (transitively), from the packages extracted into work."""
    out = AgentFiles()
    for package, programs in AGENT_PROGRAMS.items():
        for path, names in programs.items():
            # the program itself at bin/NAME, whatever chain of links the package has to it
            source = _add_path(work, _in_tree(work, path, package), AgentFiles())
            out.files[f"bin/{names[0]}"] = work / source
            out.programs.update(dict.fromkeys(names, f"bin/{names[0]}"))
            out.links.update({f"bin/{alias}": names[0] for alias in names[1:]})
    _add_sftp_server(work, out)
    for path in AGENT_CONFIG_FILES:
        out.files[path] = work / _in_tree(work, path, None)
    _add_libraries(work, out, list(dict.fromkeys(out.programs.values())))
    return out


def _add_sftp_server(work: Path, out: AgentFiles) -> None:
    """sftp-server at its own path, and a link to it where dropbear looks for it."""
    sftp = _add_path(work, _in_tree(work, SFTP_SERVER, SFTP_PACKAGE), out)
    out.programs["sftp-server"] = sftp
    expected = dropbear_sftp_path(out.files[out.programs["dropbear"]])
    if expected is not None and expected.lstrip("/") != sftp:
        link = expected.lstrip("/")
        out.links[link] = os.path.relpath(sftp, str(PurePosixPath(link).parent))


def _add_libraries(work: Path, out: AgentFiles, elves: list[str]) -> None:
    """Add the dynamic loader and shared libraries that elves (paths in out) need, transitively."""
    seen: set[str] = set()
    while elves:
        path = elves.pop()
        if path in seen:
            continue
        seen.add(path)
        interp, needed = elf_dependencies(out.files[path])
        wanted = [interp.lstrip("/")] if interp else []
        wanted += [_find_library(work, soname, path) for soname in needed]
        for relpath in wanted:
            if relpath not in out:
                out.libraries.append(relpath)
            elves.append(_add_path(work, relpath, out))


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


def _dir(path: str, perm: int = 0o755) -> _Entry:
    return _Entry(path, FileType.DIRECTORY, perm)


def _file(path: str, data: bytes, perm: int = 0o644) -> _Entry:
    return _Entry(path, FileType.REGULAR_FILE, perm, data=data)


def _link(path: str, target: str) -> _Entry:
    return _Entry(path, FileType.AE_IFLNK, 0o777, target=target)


# The archive's skeleton; other directories come with the files in them.
SKELETON_DIRS: tuple[str, ...] = (
    "bin", "dev", "etc", "etc/bootserver", "etc/bootserver/init.d", "etc/dropbear", "etc/udhcpc",
    "lib", "lib/modules", "mnt", "proc", "run", "sys", "usr", "usr/lib", "var",
)  # fmt: skip
SKELETON_LINKS: dict[str, str] = {
    "sbin": "bin", "usr/bin": "../bin", "usr/sbin": "../bin", "var/run": "../run", "var/tmp": "../tmp",
}  # fmt: skip


def initramfs_entries(
    work: Path, version: str, busybox: Path, modules: dict[str, list[str]], files: AgentFiles
) -> Iterator[_Entry]:
    """Every entry of the agent's initramfs, parents before children."""
    return _with_parents(
        itertools.chain(
            _skeleton(version),
            _busybox_entries(busybox, files.programs),
            _package_entries(files),
            _own_entries(),
            _module_entries(work, version, modules),
        )
    )


def _with_parents(entries: Iterable[_Entry]) -> Iterator[_Entry]:
    """entries, each after the directories above it that no entry before it made."""
    made: set[str] = set()
    for entry in entries:
        parts = entry.path.split("/")
        for i in range(1, len(parts)):
            directory = "/".join(parts[:i])
            if directory not in made:
                made.add(directory)
                yield _dir(directory)
        if entry.kind == FileType.DIRECTORY:
            made.add(entry.path)
        yield entry


def _skeleton(version: str) -> Iterator[_Entry]:
    for path in (*SKELETON_DIRS, f"lib/modules/{version}"):
        yield _dir(path)
    yield _dir("root", 0o700)
    yield _dir("tmp", 0o1777)
    for path, target in SKELETON_LINKS.items():
        yield _link(path, target)
    # the kernel opens /dev/console for /init before /init can mount devtmpfs
    yield _Entry("dev/console", FileType.CHAR_DEVICE, 0o600, rdev=(5, 1))


def _busybox_entries(busybox: Path, programs: dict[str, str]) -> Iterator[_Entry]:
    """busybox, and a link to it for each applet that no real program of the agent replaces."""
    yield _file("bin/busybox", busybox.read_bytes(), 0o755)
    listed = _run([str(busybox), "--list"], what="busybox --list").split()
    # the list names busybox itself: a link busybox -> busybox would replace the binary
    for applet in sorted({a for a in listed if a != "busybox" and "/" not in a}):
        if applet not in programs:
            yield _link(f"bin/{applet}", "busybox")


def _package_entries(files: AgentFiles) -> Iterator[_Entry]:
    """The programs, their libraries and configuration, as the packages have them."""
    for path, source in sorted(files.files.items()):
        yield _file(path, source.read_bytes(), (source.stat().st_mode & 0o777) | 0o444)
    for path, target in sorted(files.links.items()):
        yield _link(path, target)


def _own_entries() -> Iterator[_Entry]:
    """/init, udhcpc's script and the few files of /etc the agent needs."""
    for path, name in AGENT_SCRIPTS.items():
        yield _file(path, (AGENT_DIR / name).read_bytes(), 0o755)
    for path, text in ETC_FILES.items():
        yield _file(path, text.encode(), 0o600 if path == "etc/shadow" else 0o644)


def _module_entries(work: Path, version: str, modules: dict[str, list[str]]) -> Iterator[_Entry]:
    """The modules, decompressed, at their usual paths; their load order for /init; and a
    modules.dep for busybox modprobe."""
    src, dest = _modules_root(work) / version, f"lib/modules/{version}"
    for module in modules:
        yield _file(f"{dest}/{_plain(module)}", _read_module(src / module))
    yield _file(MODULE_LIST, "".join(_plain(m) + "\n" for m in modules).encode())
    deps = "".join(f"{_plain(m)}:" + "".join(" " + _plain(n) for n in needs) + "\n" for m, needs in modules.items())
    yield _file(f"{dest}/modules.dep", deps.encode())
    if (src / "modules.builtin").is_file():
        yield _file(f"{dest}/modules.builtin", (src / "modules.builtin").read_bytes())


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
    path: Path, work: Path, version: str, busybox: Path, modules: dict[str, list[str]], files: AgentFiles
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
