"""The agent's initramfs: a gzip-compressed cpio "newc" written by libarchive, every entry
root-owned with a fixed mtime, so two builds from the same .debs give the same bytes."""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libarchive
from libarchive import ffi
from libarchive.entry import ArchiveEntry, FileType
from libarchive.write import ArchiveWrite

from .apt import run
from .contents import AgentFiles, modules_root, plain, read_module

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
    listed = run([str(busybox), "--list"], what="busybox --list").split()
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
    src, dest = modules_root(work) / version, f"lib/modules/{version}"
    for module in modules:
        yield _file(f"{dest}/{plain(module)}", read_module(src / module))
    yield _file(MODULE_LIST, "".join(plain(m) + "\n" for m in modules).encode())
    deps = "".join(f"{plain(m)}:" + "".join(" " + plain(n) for n in needs) + "\n" for m, needs in modules.items())
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
