"""OS install from a whole-disk image: write it over the disk, verify it, grow it, make it this machine.

The image (raw or qcow2, optionally gz, xz or zst compressed) is streamed from the server over the pinned
SSH session into `dd` on the node, so neither side holds it in memory. A half-written or unverified image
must never boot, so the disk's boot area (its first and last MiB: MBR, GPT and its backup, GRUB's
embedding area) is zeroed before writing, and the image's own first MiB is kept aside on the node and
written last, once the SHA-256 of what was sent matches the expected one. Any failure after the disk was
touched zeroes the boot area again.

A raw image goes as it is stored: compressed ones as they are, an uncompressed one through `zstd -1` on
the server (zeros cost nothing on the wire). A qcow2 image cannot be read from a pipe, so the server
verifies it, converts it to raw once with `qemu-img` into `cache` (by digest), and streams that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

from ..errors import BootserverError
from . import disk
from .install import STEP, Identity, InstallError, Report, find_kernel, firmware, personalize, piped
from .ssh import STREAM_CHUNK, FileSource, Progress, Runner, Source, StepFailed

BOOT_AREA = 1 << 20  # bytes at each end of the disk that make it bootable (or not)
HEAD = "/tmp/bootserver-image-head"  # the image's first MiB, on the node until the image is verified
COMPRESSIONS = {".gz": "gzip -dc", ".xz": "xz -dc", ".zst": "zstd -dc"}
GROWABLE = {"ext2", "ext3", "ext4"}


@dataclass(frozen=True)
class ImageInstall:
    """A whole-disk image (on the server), where it goes, and what to check and do with it."""

    image: Path
    device: str
    cache: Path  # qcow2 images converted to raw, by digest
    sha256: str | None = None  # expected; None: the first word of the file IMAGE.sha256
    grow: bool = True
    root: int | None = None  # the partition number of "/"; None: the last partition on the disk
    wipe: bool = False  # may overwrite a disk that holds partitions or data


@dataclass(frozen=True)
class ImageFormat:
    container: str  # raw | qcow2
    compression: str | None  # .gz | .xz | .zst | None

    @classmethod
    def of(cls, path: Path) -> ImageFormat:
        name, compression = path.name, None
        for suffix in COMPRESSIONS:
            if name.endswith(suffix):
                name, compression = name.removesuffix(suffix), suffix
        return cls("qcow2" if name.endswith(".qcow2") else "raw", compression)


def expected_digest(spec: ImageInstall) -> str:
    """The image's SHA-256 as the config gives it, or its .sha256 file (`sha256sum` output)."""
    if spec.sha256:
        return spec.sha256
    sums = spec.image.with_name(spec.image.name + ".sha256")
    try:
        words = sums.read_text().split()
    except OSError:
        raise InstallError(f"image {spec.image.name} has no digest to verify it against: set sha256 in its "
                           f"profile's [os] table, or put `sha256sum` output in {sums}") from None
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        raise InstallError(f"{sums} does not start with a SHA-256 digest (64 hexadecimal digits)")
    return words[0].lower()


async def install_image(runner: Runner, spec: ImageInstall, identity: Identity, target: str,
                        progress: Progress) -> Report:
    """Write `spec`'s image over its disk, verify, grow, mount its root at `target` and make it this machine."""
    started = time.monotonic()
    platform = await firmware(runner)
    async with written(runner, spec, target, progress) as (digest, grown):
        try:
            version = await find_kernel(runner, target)
        except InstallError:
            version = ""  # a /boot of its own partition: the image's boot loader knows where
        await personalize(runner, identity, target, [])
    return Report(spec.image.name, version, platform, (), round(time.monotonic() - started, 1),
                  sha256=digest, grown=grown)


@contextlib.asynccontextmanager
async def written(runner: Runner, spec: ImageInstall, target: str,
                  progress: Progress) -> AsyncIterator[tuple[str, str | None]]:
    """The image written over the disk, verified, grown (unless spec.grow is false) and its root partition
    mounted at `target`: (its digest, how it grew). When this or the body fails after the disk was touched,
    the disk's boot area is zeroed: whatever is on it now is not this machine's verified system."""
    if not spec.image.is_file():
        raise InstallError(f"image {spec.image} does not exist on the server: fix [assets] or the profile's "
                           f"[os] image")
    expected = expected_digest(spec)
    await runner.run(STEP, disk.guard(spec.device, spec.wipe))
    if spec.wipe:
        await runner.run(STEP, disk.release(spec.device))
    disk_bytes = await _disk_bytes(runner, spec.device)
    source = await _source(spec, ImageFormat.of(spec.image), expected)  # a qcow2 is verified here
    if source.image_bytes is not None and source.image_bytes > disk_bytes:
        raise InstallError(f"image {spec.image.name} is {_gib(source.image_bytes)} but {spec.device} holds only "
                           f"{_gib(disk_bytes)}: use a larger disk or a smaller image")
    try:
        await _write(runner, spec, source, expected, disk_bytes, progress)
        grown = await _grow(runner, spec.device) if spec.grow else None
        await _mount_root(runner, spec, target)
        yield expected, grown
    except Exception:
        if not runner.lost:
            with contextlib.suppress(BootserverError, OSError, asyncssh.Error):
                await runner.run(STEP, _zero_boot_area(spec.device, disk_bytes))
        raise


async def _write(runner: Runner, spec: ImageInstall, source: ImageSource, expected: str, disk_bytes: int,
                 progress: Progress) -> None:
    """Zero the boot area, stream the image past its first MiB, verify, then write the first MiB."""
    dev = shlex.quote(spec.device)
    await runner.run(STEP, _zero_boot_area(spec.device, disk_bytes))
    keep_head = (f"{{ dd of={HEAD} bs={BOOT_AREA} count=1 iflag=fullblock && "
                 f"dd of={dev} bs={BOOT_AREA} seek=1 conv=notrunc && [ -s {HEAD} ]; }}")
    try:
        await runner.stream(STEP, piped(source.decompress, keep_head, f"decompressing {spec.image.name}"),
                            source, progress)
    except StepFailed as exc:
        if "No space left" in exc.stderr_tail:
            raise InstallError(f"image {spec.image.name} is larger than {spec.device} ({_gib(disk_bytes)}): "
                               f"use a larger disk or a smaller image") from None
        raise
    sent = source.digest()
    if sent != expected:
        raise InstallError(f"image {spec.image.name} has SHA-256 {sent}, expected {expected}: it was not booted, "
                           f"and the disk's boot sectors were zeroed")
    await runner.run(STEP, f"dd if={HEAD} of={dev} bs={BOOT_AREA} count=1 conv=notrunc 2>/dev/null && "
                           f"rm -f {HEAD} && sync && partprobe {dev}")


async def _grow(runner: Runner, device: str) -> str | None:
    """Grow the disk's last partition to its end, and its filesystem (ext2/3/4) with it."""
    table = await _table(runner, device)
    partitions = table.get("partitions") or []
    if not partitions:
        return None
    last = max(partitions, key=lambda p: int(p["start"]))
    number, dev = _number(last["node"]), shlex.quote(device)
    if table.get("label") == "gpt":
        await runner.run(STEP, f"sfdisk --relocate gpt-bak-std {dev}")  # the backup table to the disk's end
    await runner.run(STEP, f"sfdisk --no-reread -N {number} {dev}", input=", +\n")
    await runner.run(STEP, f"partprobe {dev}")
    path = disk.partition_path(device, number)
    await _wait_for(runner, path)
    after = next(p for p in (await _table(runner, device))["partitions"] if _number(p["node"]) == number)
    sector = int(table.get("sectorsize", 512))
    change = f"{path}: {_gib(int(last['size']) * sector)} -> {_gib(int(after['size']) * sector)}"
    fstype = await _fstype(runner, path)
    if fstype not in GROWABLE:
        return f"{change} (its {fstype or 'unknown'} filesystem not grown)"
    q = shlex.quote(path)
    # e2fsck exits 1 when it corrected something: still a clean filesystem for resize2fs.
    await runner.run(STEP, f"e2fsck -f -y {q} >/dev/null; [ $? -le 1 ] && resize2fs {q}")
    return change


async def _mount_root(runner: Runner, spec: ImageInstall, target: str) -> None:
    number = spec.root or _number(max((await _table(runner, spec.device))["partitions"],
                                      key=lambda p: int(p["start"]))["node"])
    path = disk.partition_path(spec.device, number)
    await _wait_for(runner, path)
    fstype = await _fstype(runner, path)
    if not fstype:
        raise InstallError(f"partition {number} of image {spec.image.name} ({path}) holds no filesystem: set "
                           f"root = N in the profile's [os] table to the partition holding \"/\"")
    q = shlex.quote(target)
    await runner.run(STEP, f"mkdir -p {q} && mount -t {shlex.quote(fstype)} {shlex.quote(path)} {q}")
    if not (await runner.run(STEP, f"[ -d {q}/etc ] && echo yes || true")).strip():
        raise InstallError(f"partition {number} of image {spec.image.name} ({path}) has no /etc: it is not a root "
                           f"filesystem; set root = N in the profile's [os] table")


async def _table(runner: Runner, device: str) -> dict:
    out = await runner.run(STEP, f"sfdisk -J {shlex.quote(device)}")
    try:
        return json.loads(out)["partitiontable"]
    except (ValueError, KeyError):
        raise InstallError(f"{device} holds no partition table sfdisk can read after writing the image") from None


def _number(node: str) -> int:
    return int(re.search(r"([0-9]+)$", node).group(1))  # type: ignore[union-attr]


async def _fstype(runner: Runner, path: str) -> str:
    return (await runner.run(STEP, f"blkid -s TYPE -o value {shlex.quote(path)} || true")).strip()


async def _wait_for(runner: Runner, path: str) -> None:
    q = shlex.quote(path)
    await runner.run(STEP, f"n=0; until [ -b {q} ]; do n=$((n+1)); [ $n -le 10 ] || "
                           f"{{ echo {q} did not appear >&2; exit 1; }}; sleep 1; done")


async def _disk_bytes(runner: Runner, device: str) -> int:
    name = shlex.quote(device.rsplit("/", 1)[-1])
    return int((await runner.run(STEP, f"cat /sys/class/block/{name}/size")).strip()) * 512


def _zero_boot_area(device: str, disk_bytes: int) -> str:
    dev, mib = shlex.quote(device), BOOT_AREA
    return (f"dd if=/dev/zero of={dev} bs={mib} count=1 conv=notrunc 2>/dev/null && "
            f"dd if=/dev/zero of={dev} bs={mib} seek={max(disk_bytes // mib - 1, 0)} count=1 conv=notrunc "
            f"2>/dev/null && sync")


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


# --- the server's side of the stream ---------------------------------------------------------


class ImageSource(Source, Protocol):
    """What goes down the wire for an image (ssh.Source), the node's command that undoes it, and the
    digest of the image file as read."""

    decompress: str
    image_bytes: int | None  # the raw disk image's size, when known before writing

    def digest(self) -> str: ...


class AsStored(FileSource):
    """A compressed raw image, sent as it is stored; the node decompresses it."""

    def __init__(self, path: Path, compression: str) -> None:
        super().__init__(path)
        self.decompress = COMPRESSIONS[compression]
        self.image_bytes = None

    def digest(self) -> str:
        return self.sha256.hexdigest()


class Compressed:
    """An uncompressed raw image, read here and compressed on its way (`zstd -1`); the digest is the file's."""

    def __init__(self, path: Path, digest: str | None = None) -> None:
        self._path = path
        self._sha256 = hashlib.sha256()
        self._known = digest  # a converted qcow2: verified before conversion
        self.decompress = COMPRESSIONS[".zst"]
        self.image_bytes = self.total = path.stat().st_size
        self.done = 0

    def digest(self) -> str:
        return self._known or self._sha256.hexdigest()

    async def chunks(self) -> AsyncIterator[bytes]:
        zstd = await asyncio.create_subprocess_exec(_tool("zstd"), "-1", "-T0", "-q", "-c",
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert zstd.stdin is not None and zstd.stdout is not None
        feeding = asyncio.create_task(self._feed(zstd.stdin))
        try:
            while chunk := await zstd.stdout.read(STREAM_CHUNK):
                yield chunk
            await feeding
            if await zstd.wait() != 0:
                raise InstallError(f"zstd on the server failed compressing {self._path} (status {zstd.returncode})")
        finally:
            feeding.cancel()
            if zstd.returncode is None:
                zstd.kill()
                await zstd.wait()

    async def _feed(self, stdin: asyncio.StreamWriter) -> None:
        with self._path.open("rb") as file:
            while chunk := file.read(STREAM_CHUNK):
                if not self._known:
                    self._sha256.update(chunk)
                self.done += len(chunk)
                stdin.write(chunk)
                await stdin.drain()
        stdin.close()


async def _source(spec: ImageInstall, fmt: ImageFormat, expected: str) -> ImageSource:
    if fmt.container == "raw":
        return AsStored(spec.image, fmt.compression) if fmt.compression else Compressed(spec.image)
    return Compressed(await raw_from_qcow2(spec.image, fmt, expected, spec.cache), expected)


async def raw_from_qcow2(path: Path, fmt: ImageFormat, expected: str, cache: Path) -> Path:
    """The qcow2 image at `path` as a raw (sparse) file in `cache`, made once per digest. The bytes converted
    are the ones verified: one read both hashes and copies (or decompresses) the file."""
    raw = cache / f"{expected}.raw"
    if raw.is_file():
        return raw
    qemu_img = _tool("qemu-img")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        qcow2 = Path(work) / "image.qcow2"
        got = await asyncio.to_thread(_copy_hashing, path, qcow2, fmt.compression)
        if got != expected:
            raise InstallError(f"image {path.name} has SHA-256 {got}, expected {expected}: it was not written "
                               f"to the disk")
        converting = await asyncio.create_subprocess_exec(qemu_img, "convert", "-f", "qcow2", "-O", "raw",
                                                          str(qcow2), str(Path(work) / "image.raw"),
                                                          stderr=asyncio.subprocess.PIPE)
        _, stderr = await converting.communicate()
        if converting.returncode != 0:
            raise InstallError(f"qemu-img could not convert {path.name}: {stderr.decode(errors='replace')[-500:]}")
        os.replace(Path(work) / "image.raw", raw)
    return raw


def _copy_hashing(path: Path, out: Path, compression: str | None) -> str:
    """Copy `path` to `out`, decompressing it when `compression` says so; the SHA-256 of `path` as read."""
    sha256 = hashlib.sha256()
    command = COMPRESSIONS[compression].split() if compression else ["cat"]
    command[0] = _tool(command[0])
    with path.open("rb") as src, out.open("wb") as dst:
        writer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=dst)
        assert writer.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            while chunk := src.read(STREAM_CHUNK):
                sha256.update(chunk)
                writer.stdin.write(chunk)
        writer.stdin.close()
        if writer.wait() != 0:
            raise InstallError(f"{' '.join(command)} could not read image {path.name} (status {writer.returncode})")
    return sha256.hexdigest()


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        package = {"qemu-img": "qemu-utils"}.get(name, name)
        raise InstallError(f"the server needs {name} to write disk images: install it (apt install {package})")
    return found

