"""What the agent image carries from the extracted packages: kernel modules, programs, libraries.

Modules come with their dependency closure (modules.dep, made by `depmod` on the extracted tree);
programs with every shared library they need, found by reading their ELF headers with pyelftools
(PT_INTERP and DT_NEEDED, transitively), at the paths the packages give them.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from ..errors import BootserverError
from .apt import run

# Drivers the agent loads so that it finds its NIC and disks under QEMU and on common hardware,
# and the filesystems it formats and mounts (ext4, vfat: FAT_DEFAULT_IOCHARSET is "ascii", so
# nls_ascii too). Names as in modules.dep (dashes and underscores are the same to the kernel).
# crc32c_generic comes before ext4 and jbd2: they ask the crypto API for "crc32c" (a softdep
# that modules.dep does not show), and nothing would load it for them.
AGENT_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_net", "e1000",
    "virtio_blk", "ahci", "sd_mod", "nvme",
    "crc32c_generic", "ext4", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8",
    "efivarfs",  # the firmware's variables: whether Secure Boot is on
)  # fmt: skip

# The programs the agent carries besides busybox: package -> {path in the package: names in
# /bin}. The first name is the file, the others symlinks to it; a name busybox also has (fdisk,
# mke2fs, mkdosfs, partprobe) is the real program. /sbin, /usr/bin and /usr/sbin are /bin.
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
    # OS tarballs and disk images are unpacked by pipe (`zstd -dc | tar -x`): busybox has no zstd,
    # and xz-utils reads every .xz (busybox's unxz is a minimal decoder); gzip is busybox's own
    "zstd": {"usr/bin/zstd": ("zstd", "unzstd", "zstdcat")},
    "xz-utils": {"usr/bin/xz": ("xz", "unxz", "xzcat")},
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


# --- kernel modules -------------------------------------------------------------------------


def modules_root(work: Path) -> Path:
    for candidate in (work / "lib" / "modules", work / "usr" / "lib" / "modules"):
        if candidate.is_dir():
            return candidate
    raise BootserverError("the kernel package has no lib/modules directory")


def kernel_version(work: Path) -> str:
    versions = sorted(p.name for p in modules_root(work).iterdir() if p.is_dir())
    if len(versions) != 1:
        raise BootserverError(f"expected one kernel in the package, found {versions}")
    return versions[0]


def module_name(relpath: str) -> str:
    """The name the kernel knows a module by: kernel/net/core/fail-over.ko.xz -> fail_over."""
    return PurePosixPath(plain(relpath)).name.removesuffix(".ko").replace("-", "_")


def _modules_dep(work: Path, version: str) -> dict[str, list[str]]:
    """modules.dep, made by depmod: module path -> the paths of every module it needs."""
    run(["depmod", "-b", str(work), version], what="depmod")
    dep_file = modules_root(work) / version / "modules.dep"
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
    by_name = {module_name(module): module for module in deps}
    builtin_file = modules_root(work) / version / "modules.builtin"
    builtin = {module_name(line) for line in builtin_file.read_text().split()} if builtin_file.is_file() else set()

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


def plain(relpath: str) -> str:
    """The module's path once decompressed: foo.ko.xz -> foo.ko."""
    return re.sub(r"\.ko\.(xz|gz|zst)$", ".ko", relpath)


def read_module(path: Path) -> bytes:
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


# --- programs and their libraries -----------------------------------------------------------


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


def in_tree(work: Path, relpath: str, package: str | None) -> str:
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
            source = _add_path(work, in_tree(work, path, package), AgentFiles())
            out.files[f"bin/{names[0]}"] = work / source
            out.programs.update(dict.fromkeys(names, f"bin/{names[0]}"))
            out.links.update({f"bin/{alias}": names[0] for alias in names[1:]})
    _add_sftp_server(work, out)
    for path in AGENT_CONFIG_FILES:
        out.files[path] = work / in_tree(work, path, None)
    _add_libraries(work, out, list(dict.fromkeys(out.programs.values())))
    return out


def _add_sftp_server(work: Path, out: AgentFiles) -> None:
    """sftp-server at its own path, and a link to it where dropbear looks for it."""
    sftp = _add_path(work, in_tree(work, SFTP_SERVER, SFTP_PACKAGE), out)
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
