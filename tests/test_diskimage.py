"""Whole-disk images written by the install step over real SSH (tests/support/sshd.py on 127.0.0.1, commands
run on this host) onto a real loop device: each format streamed, verified, grown and its root mounted; a
flipped byte leaves the disk unbootable; too large an image is refused. The same onto a VM's disk, booted to
`running`, is tests/test_vm_image.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.sshd import TestSSHServer, ssh_server

from bootserver import config as configuration
from bootserver.errors import ConfigError
from bootserver.provision import diskimage
from bootserver.provision.diskimage import ImageFormat, ImageInstall
from bootserver.provision.install import InstallError
from bootserver.provision.pki import ServerKeys
from bootserver.provision.ssh import NodeAccess, session

MIB = 1 << 20
BIOS_GUID = "21686148-6449-6E6F-744E-656564454649"
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@pytest.fixture
def keys(tmp_path: Path) -> ServerKeys:
    return ServerKeys.load_or_create(tmp_path / "keys")


@pytest.fixture
async def sshd(keys: ServerKeys) -> AsyncIterator[TestSSHServer]:
    async with ssh_server(keys.ssh_public) as server:
        yield server


def make_image(directory: Path, size_mib: int = 48) -> Path:
    """A GPT disk image: a BIOS boot partition and an ext4 root holding /etc/hostname, the rest zeros."""
    for tool in ("sfdisk", "mkfs.ext4"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed to make a test image: ./setup test installs it")
    root = directory / "rootdir"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("golden\n")
    image = directory / "golden.raw"
    with image.open("wb") as f:
        f.truncate(size_mib * MIB)
    subprocess.run(["sfdisk", "-q", str(image)], input=f"label: gpt\nsize=1MiB, type={BIOS_GUID}\n"
                   f"type={LINUX_GUID}, name=root\n", text=True, check=True)
    part = directory / "root.ext4"
    start, end = 2 * MIB, size_mib * MIB - MIB  # the root partition: after the BIOS one, before the backup GPT
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(part), f"{(end - start) // 1024}k"],
                   check=True)
    subprocess.run(["dd", f"if={part}", f"of={image}", "bs=1M", f"seek={start // MIB}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    part.unlink()
    return image


def variant(image: Path, suffix: str) -> Path:
    """The same disk as .raw.zst, .raw.gz, .qcow2 or .qcow2.xz (qemu-img, zstd, gzip, xz as users make them)."""
    source = image
    if suffix.startswith(".qcow2"):
        source = image.with_name("golden.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(source)], check=True)
    compress = {".zst": ["zstd", "-q", "-f", "-c"], ".gz": ["gzip", "-c"], ".xz": ["xz", "-T1", "-c"]}
    ending = "." + suffix.rsplit(".", 1)[-1]
    if ending not in compress:
        return source
    out = image.with_name("golden" + suffix)
    with out.open("wb") as f:
        subprocess.run([*compress[ending], str(source)], stdout=f, check=True)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A 128 MiB loop device (with partition scanning) over a sparse file, holding a marker in its first MiB."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.fail("needs root and losetup (util-linux): CI runs as root, ./setup test installs it")
    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.write(b"previous contents")
        f.truncate(128 * MIB)
    device = subprocess.run(["losetup", "--find", "--show", "--partscan", str(backing)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)
        subprocess.run(["losetup", "-d", device], check=True)


def spec(image: Path, device: str, tmp_path: Path, **kwargs) -> ImageInstall:
    return ImageInstall(image, device, cache=tmp_path / "cache", **{"wipe": True, **kwargs})


async def write(sshd: TestSSHServer, keys: ServerKeys, job: ImageInstall, target: Path,
                progress: list | None = None) -> tuple[str, str | None]:
    access = NodeAccess("127.0.0.1", sshd.port, sshd.host_key_line)
    seen = progress if progress is not None else []
    async with (session(access, keys, lambda kind, detail: None) as runner,
                diskimage.written(runner, job, str(target), lambda *p: seen.append(p)) as result):
        assert (target / "etc/hostname").read_text() == "golden\n"  # the image's root, mounted
        subprocess.run(["umount", str(target)], check=True)
        return result


@pytest.mark.parametrize("suffix", [".raw", ".raw.zst", ".raw.gz", ".qcow2", ".qcow2.xz"])
async def test_each_format_is_streamed_verified_grown_and_its_root_mounted(sshd, keys, tmp_path, loop_disk, suffix):
    device, backing = loop_disk
    image = variant(make_image(tmp_path), suffix) if suffix != ".raw" else make_image(tmp_path)
    progress: list = []
    digest, grown = await write(sshd, keys, spec(image, device, tmp_path, sha256=sha256(image)), tmp_path / "mnt",
                                progress)
    assert digest == sha256(image)
    table = _table(device)
    assert table["label"] == "gpt" and [p["type"] for p in table["partitions"]] == [BIOS_GUID, LINUX_GUID]
    root = table["partitions"][1]
    # Grown: the partition to the disk's end (less the backup GPT), its ext4 with it.
    assert (root["start"] + root["size"]) * 512 > 127 * MIB and grown and grown.startswith(f"{device}p2: ")
    assert _ext4_bytes(root["node"]) > 120 * MIB
    assert progress and progress[-1][0] == progress[-1][1]  # all of it read, as the progress events say
    if suffix.startswith(".qcow2"):
        assert (tmp_path / "cache" / f"{digest}.raw").is_file()  # converted once, kept by digest


async def test_the_sha256_file_beside_the_image_is_used_and_grow_can_be_off(sshd, keys, tmp_path, loop_disk):
    device, _ = loop_disk
    image = make_image(tmp_path)
    image.with_name(image.name + ".sha256").write_text(f"{sha256(image)}  {image.name}\n")
    digest, grown = await write(sshd, keys, spec(image, device, tmp_path, grow=False), tmp_path / "mnt")
    assert digest == sha256(image) and grown is None
    root = _table(device)["partitions"][1]
    assert (root["start"] + root["size"]) * 512 < 48 * MIB  # as the image made it


@pytest.mark.parametrize("suffix", [".raw", ".raw.zst"])
async def test_a_flipped_byte_fails_with_both_digests_and_the_disk_cannot_boot(sshd, keys, tmp_path, loop_disk,
                                                                                suffix):
    device, backing = loop_disk
    image = make_image(tmp_path)
    good = sha256(image)
    with image.open("r+b") as f:  # one byte of the root filesystem's data
        f.seek(10 * MIB)
        byte = f.read(1)
        f.seek(10 * MIB)
        f.write(bytes([byte[0] ^ 0xFF]))
    if suffix != ".raw":
        image = variant(image, suffix)
    bad = sha256(image)
    with pytest.raises(InstallError) as failed:
        await write(sshd, keys, spec(image, device, tmp_path, sha256=good), tmp_path / "mnt")
    assert bad in str(failed.value) and good in str(failed.value), failed.value
    data = backing.read_bytes()
    assert data[:MIB] == bytes(MIB) and data[-MIB:] == bytes(MIB)  # no MBR, no GPT, no backup GPT
    assert subprocess.run(["sfdisk", "-d", str(backing)], capture_output=True).returncode != 0
    assert data[10 * MIB:12 * MIB] != bytes(2 * MIB)  # the rest was written: verified after streaming


async def test_a_qcow2_that_fails_its_digest_is_refused_before_the_disk_is_touched(sshd, keys, tmp_path, loop_disk):
    device, backing = loop_disk
    image = variant(make_image(tmp_path), ".qcow2")
    with pytest.raises(InstallError, match=f"SHA-256 {sha256(image)}, expected {'0' * 64}"):
        await write(sshd, keys, spec(image, device, tmp_path, sha256="0" * 64), tmp_path / "mnt")
    assert backing.read_bytes()[:17] == b"previous contents"
    assert not list((tmp_path / "cache").glob("*.raw"))


async def test_an_image_larger_than_the_disk_is_refused_before_writing(sshd, keys, tmp_path, loop_disk):
    device, backing = loop_disk
    image = make_image(tmp_path, size_mib=160)
    with pytest.raises(InstallError, match=r"is 0\.2 GiB but .* holds only 0\.1 GiB"):
        await write(sshd, keys, spec(image, device, tmp_path, sha256=sha256(image)), tmp_path / "mnt")
    assert backing.read_bytes()[:17] == b"previous contents"


async def test_a_compressed_image_larger_than_the_disk_fails_at_its_end_and_cannot_boot(sshd, keys, tmp_path,
                                                                                         loop_disk):
    device, backing = loop_disk
    image = variant(make_image(tmp_path, size_mib=160), ".raw.zst")  # its size unknown until written
    with pytest.raises(InstallError, match="is larger than"):
        await write(sshd, keys, spec(image, device, tmp_path, sha256=sha256(image)), tmp_path / "mnt")
    data = backing.read_bytes()
    assert data[:MIB] == bytes(MIB) and data[-MIB:] == bytes(MIB)


async def test_a_disk_holding_partitions_is_not_overwritten_without_wipe(sshd, keys, tmp_path, loop_disk):
    device, backing = loop_disk
    subprocess.run(["sfdisk", "-q", device], input="label: gpt\n,\n", text=True, check=True)
    image = make_image(tmp_path)
    with pytest.raises(Exception, match="refusing to repartition .* holds partitions"):
        await write(sshd, keys, spec(image, device, tmp_path, sha256=sha256(image), wipe=False), tmp_path / "mnt")
    assert _table(device)["partitions"][0]["start"] == 2048


async def test_a_missing_image_or_digest_is_named(sshd, keys, tmp_path, loop_disk):
    device, _ = loop_disk
    with pytest.raises(InstallError, match="does not exist on the server"):
        await write(sshd, keys, spec(tmp_path / "nope.raw", device, tmp_path), tmp_path / "mnt")
    image = make_image(tmp_path)
    with pytest.raises(InstallError, match=r"no digest to verify it against: set sha256 .*/golden\.raw\.sha256"):
        await write(sshd, keys, spec(image, device, tmp_path), tmp_path / "mnt")


def test_formats_are_read_from_the_name():
    assert ImageFormat.of(Path("a.raw")) == ImageFormat("raw", None)
    assert ImageFormat.of(Path("a.img.xz")) == ImageFormat("raw", ".xz")
    assert ImageFormat.of(Path("a.qcow2.zst")) == ImageFormat("qcow2", ".zst")
    assert ImageFormat.of(Path("a.qcow2")) == ImageFormat("qcow2", None)


@pytest.mark.parametrize(("os_table", "message"), [
    ('image = "golden"', "device: expected the disk's path"),
    ('image = "golden"\ndevice = "/dev/vda"\nsha256 = "abc"', "not a SHA-256 digest"),
    ('image = "golden"\ndevice = "vda"', "not a kernel disk name"),
    ('image = "golden"\ndevice = "/dev/vda"\ncmdline = "quiet"', "boots with its own boot loader"),
    ('rootfs = "golden"\nsha256 = "' + "a" * 64 + '"', "only a whole-disk image takes 'sha256'"),
    ('rootfs = "golden"\nimage = "golden"', "give one source"),
    ('image = "golden"\ndevice = "/dev/vda"\nroot = 0', "at least 1"),
])
def test_image_settings_are_checked(tmp_path, os_table, message):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[assets]\ngolden = "golden.raw"\n'
                    f'[profiles.p]\n[profiles.p.os]\n{os_table}\n')
    with pytest.raises(ConfigError, match=message):
        configuration.load(path)


def test_an_image_profile_has_no_disk_layout(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[assets]\ngolden = "golden.raw"\n'
                    '[profiles.p.os]\nimage = "golden"\ndevice = "/dev/vda"\n'
                    '[profiles.p.disk]\ndevice = "/dev/vda"\n[[profiles.p.disk.partitions]]\nlabel = "r"\n'
                    'size = "rest"\nmount = "/"\n')
    with pytest.raises(ConfigError, match="a whole-disk image brings its own partitions"):
        configuration.load(path)
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[assets]\ngolden = "golden.raw"\n'
                    '[profiles.p.os]\nimage = "golden"\ndevice = "/dev/vda"\n')
    system = configuration.load(path).profiles["p"].os
    assert system is not None and (system.image, system.device, system.grow, system.wipe) == (
        "golden", "/dev/vda", True, False)


def _table(device: str) -> dict:
    return json.loads(subprocess.run(["sfdisk", "-J", device], check=True, capture_output=True,
                                     text=True).stdout)["partitiontable"]


def _ext4_bytes(node: str) -> int:
    out = subprocess.run(["dumpe2fs", "-h", node], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])
