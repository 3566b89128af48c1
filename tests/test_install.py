"""OS install pieces over real SSH (tests/sshd.py on 127.0.0.1): streaming a file into a command, unpacking
a rootfs, finding its kernel; and the disk-layout rules for boot loaders. The whole install, onto a real disk
that then boots, is tests/test_vm_install.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.sshd import TestSSHServer, ssh_server

from bootserver.config import DiskLayout, Partition
from bootserver.provision import install
from bootserver.provision.pki import ServerKeys
from bootserver.provision.ssh import FileSource, NodeAccess, StepFailed, session


@pytest.fixture
def keys(tmp_path: Path) -> ServerKeys:
    return ServerKeys.load_or_create(tmp_path / "keys")


@pytest.fixture
async def sshd(keys: ServerKeys) -> AsyncIterator[TestSSHServer]:
    async with ssh_server(keys.ssh_public) as server:
        yield server


def runner_of(server: TestSSHServer, keys: ServerKeys, events: list):
    access = NodeAccess("127.0.0.1", server.port, server.host_key_line)
    return session(access, keys, lambda kind, detail: events.append((kind, detail)))


async def test_stream_sends_the_whole_file_and_reports_progress(sshd, keys, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    progress: list[tuple[int, int, float]] = []
    events: list = []
    async with runner_of(sshd, keys, events) as runner:
        sent = FileSource(source)
        out = await runner.stream("install", "sha256sum", sent, lambda *p: progress.append(p))
    assert out.split()[0] == hashlib.sha256(source.read_bytes()).hexdigest() == sent.sha256.hexdigest()
    assert progress[-1][:2] == (source.stat().st_size, source.stat().st_size)
    assert [e for e in events if e[0] == "command"][-1][1]["exit_status"] == 0


async def test_a_command_that_stops_reading_fails_the_step_with_its_stderr(sshd, keys, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(8 * 1024 * 1024))
    events: list = []
    async with runner_of(sshd, keys, events) as runner:
        with pytest.raises(StepFailed) as failed:
            await runner.stream("install", "head -c 10 >/dev/null; echo 'not a tar archive' >&2; exit 3",
                                FileSource(source),
                                lambda *p: None)
    assert failed.value.exit_status == 3
    assert "not a tar archive" in str(failed.value)


def make_rootfs(tmp_path: Path, kernels: list[str], suffix: str = ".tar.zst") -> Path:
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "etc").mkdir()
    for version in kernels:
        (tree / "boot" / f"vmlinuz-{version}").write_bytes(b"kernel")
        (tree / "boot" / f"initrd.img-{version}").write_bytes(b"initrd")
    (tree / "boot" / "vmlinuz-9.9.9-no-initrd").write_bytes(b"kernel without initrd")
    tarball = tmp_path / f"rootfs{suffix}"
    compress = {".tar.zst": ["zstd", "-q"], ".tar.gz": ["gzip"], ".tar.xz": ["xz"], ".tar": ["cat"]}[suffix]
    tar = subprocess.run(["tar", "-C", str(tree), "-c", "."], check=True, capture_output=True).stdout
    tarball.write_bytes(subprocess.run(compress, input=tar, check=True, capture_output=True).stdout)
    return tarball


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.gz", ".tar.xz", ".tar"])
async def test_rootfs_is_unpacked_and_its_newest_kernel_with_an_initrd_found(sshd, keys, tmp_path, suffix):
    rootfs = make_rootfs(tmp_path, ["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"], suffix)
    target = tmp_path / "target"
    target.mkdir()
    async with runner_of(sshd, keys, []) as runner:
        await runner.stream("install", install.unpack_command(rootfs, str(target)), FileSource(rootfs), lambda *p: None)
        assert await install.find_kernel(runner, str(target)) == "6.1.0-10-amd64"
    assert (target / "boot/initrd.img-5.10.0-30-amd64").read_bytes() == b"initrd"


async def test_a_rootfs_without_a_kernel_is_refused_with_what_to_do(sshd, keys, tmp_path):
    rootfs = make_rootfs(tmp_path, [])
    target = tmp_path / "target"
    target.mkdir()
    async with runner_of(sshd, keys, []) as runner:
        await runner.stream("install", install.unpack_command(rootfs, str(target)), FileSource(rootfs), lambda *p: None)
        with pytest.raises(install.InstallError, match="no kernel.*linux-image"):
            await install.find_kernel(runner, str(target))


def test_an_unknown_rootfs_format_is_refused():
    with pytest.raises(install.InstallError, match=r"\.tar\.zst"):
        install.decompressor(Path("root.zip"))


ROOT = Partition("root", "rest", "linux", "ext4", "/")
BIOS = Partition("bios", "1MiB", "bios", "none")
ESP = Partition("esp", "256MiB", "esp", "vfat", "/boot/efi")


@pytest.mark.parametrize(("partitions", "platform", "loaders"), [
    ((BIOS, ESP, ROOT), "pcbios", ("pcbios", "efi")),
    ((BIOS, ESP, ROOT), "efi", ("pcbios", "efi")),
    ((BIOS, ROOT), "pcbios", ("pcbios",)),
    ((ESP, ROOT), "efi", ("efi",)),
])
def test_boot_loaders_for_the_firmware_and_whatever_else_the_layout_allows(partitions, platform, loaders):
    assert install.boot_loaders(DiskLayout("/dev/vda", partitions), platform) == loaders


def test_bios_on_gpt_without_a_bios_boot_partition_is_refused():
    with pytest.raises(install.InstallError, match='type = "bios"'):
        install.boot_loaders(DiskLayout("/dev/vda", (ESP, ROOT)), "pcbios")


def test_uefi_without_an_esp_is_refused():
    with pytest.raises(install.InstallError, match="EFI system partition"):
        install.boot_loaders(DiskLayout("/dev/vda", (BIOS, ROOT)), "efi")


def test_fstab_mounts_by_uuid_and_grub_finds_root_by_uuid():
    layout = DiskLayout("/dev/vda", (BIOS, ESP, ROOT, Partition("swap", "1GiB", "swap", "swap")))
    text = install.fstab(layout, {"esp": "AAAA-BBBB", "root": "1111-root", "swap": "2222-swap"})
    assert "UUID=1111-root / ext4 errors=remount-ro 0 1" in text
    assert "UUID=AAAA-BBBB /boot/efi vfat umask=0077 0 2" in text
    assert "UUID=2222-swap none swap sw 0 0" in text
    assert "bios" not in text.split("\n", 1)[1]
    grub = install.grub_config("6.1.0-10-amd64", "1111-root", "console=ttyS0,115200")
    assert "search --no-floppy --fs-uuid --set=root 1111-root" in grub
    assert "linux /boot/vmlinuz-6.1.0-10-amd64 root=UUID=1111-root ro console=ttyS0,115200" in grub


async def test_a_corrupt_rootfs_fails_even_if_tar_got_something(sshd, keys, tmp_path):
    rootfs = make_rootfs(tmp_path, ["6.1.0-10-amd64"])
    data = rootfs.read_bytes()
    rootfs.write_bytes(data[: len(data) // 2] + bytes(64) + data[len(data) // 2:])
    target = tmp_path / "target"
    target.mkdir()
    async with runner_of(sshd, keys, []) as runner:
        with pytest.raises(StepFailed):
            await runner.stream("install", install.unpack_command(rootfs, str(target)), FileSource(rootfs),
                                lambda *p: None)


def test_the_boot_nic_gets_dhcp_or_its_reserved_static_address():
    identity = install.Identity(mac="52:54:00:12:34:56", hostname="node1", host_key="", authorized_key="",
                                report_path="/boot/x/booted", report_token="t")
    dhcp = install.network_file(identity)
    assert "[Match]\nMACAddress=52:54:00:12:34:56\n" in dhcp and dhcp.endswith("[Network]\nDHCP=yes\n")
    static = install.network_file(dataclasses.replace(identity, address=install.StaticAddress(
        "10.100.0.11/24", "10.100.0.1", ("10.100.0.1", "192.0.2.53"))))
    assert static.endswith("[Network]\nAddress=10.100.0.11/24\nGateway=10.100.0.1\nDNS=10.100.0.1\nDNS=192.0.2.53\n")
    assert "DHCP" not in static


@pytest.mark.parametrize("signed", [True, False])
def test_uefi_grub_install_takes_the_signed_chain_when_the_rootfs_has_it(tmp_path: Path, signed: bool):
    """The EFI boot loader command, run by sh with a grub-install of the test's that prints its arguments and the
    signed files' paths moved under tmp_path: shim and signed GRUB present -> --uefi-secure-boot; absent (and
    Secure Boot off here: no such EFI variable on this machine) -> --no-uefi-secure-boot."""
    command = install._grub_install("efi", DiskLayout("/dev/vda", (BIOS, ESP, ROOT)))
    shim, grub = tmp_path / "shimx64.efi.signed", tmp_path / "x86_64-efi-signed"
    command = command.replace(install.SIGNED_SHIM, str(shim)).replace(install.SIGNED_GRUB_DIR, str(grub))
    if signed:
        shim.write_bytes(b"MZ")
        grub.mkdir()
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "grub-install"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    assert not Path(install.SECURE_BOOT_VARIABLE).exists()
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    flag = "--uefi-secure-boot" if signed else "--no-uefi-secure-boot"
    assert result.stdout.split() == ["--target=x86_64-efi", "--efi-directory=/boot/efi", "--removable", "--no-nvram",
                                     flag], result.stdout
