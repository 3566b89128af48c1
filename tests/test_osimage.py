"""`bootserver image os debian`: the Debian root filesystem an install puts on the disk, what it holds, its cache,
where its packages come from, and that the agent can unpack it.

The image comes from the session fixture `os_image` (conftest.py), built once (~40 s, from the host's own Debian
mirror) into a directory that survives runs.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from support.os_image import build_test_os_image, os_image_dir, tar_members

from bootserver.cli import main
from bootserver.errors import BootserverError
from bootserver.tools import osimage
from bootserver.tools.image import AgentImage
from bootserver.tools.osimage import AptSource, OsImage, OsRecipe, build_os_image, debian_recipe


@pytest.fixture(scope="module")
def members(os_image: OsImage):
    return tar_members(os_image.tarball)


def test_the_image_boots_with_its_own_kernel_and_initrd(os_image: OsImage, members) -> None:
    kernel = os_image.manifest["kernel"]
    assert kernel.endswith("-cloud-amd64"), kernel
    for name in (f"boot/vmlinuz-{kernel}", f"boot/initrd.img-{kernel}"):
        assert members[name].type == tarfile.REGTYPE and members[name].size > 5_000_000, name
    assert f"lib/modules/{kernel}/modules.dep" in members or f"usr/lib/modules/{kernel}/modules.dep" in members


def test_the_image_carries_grub_for_bios_and_efi_but_installs_no_boot_loader(members) -> None:
    for program in ("grub-install", "grub-mkconfig", "update-grub"):
        assert f"usr/sbin/{program}" in members, program
    assert "usr/lib/grub/i386-pc/normal.mod" in members and "usr/lib/grub/i386-pc/boot.img" in members
    assert "usr/lib/grub/x86_64-efi/normal.mod" in members
    assert not any(name.startswith("boot/grub/") or name.startswith("boot/efi/") for name in members)


def test_sshd_without_host_keys(members) -> None:
    assert members["usr/sbin/sshd"].mode & 0o111
    assert "etc/ssh/sshd_config" in members
    assert not [name for name in members if name.startswith("etc/ssh/ssh_host_")]


def test_every_machine_gets_its_own_identity(members) -> None:
    assert members["etc/machine-id"].type == tarfile.REGTYPE and members["etc/machine-id"].data == b""
    dbus_id = members.get("var/lib/dbus/machine-id")
    assert dbus_id is None or dbus_id.link == "/etc/machine-id"
    assert members["etc/hostname"].data == b"debian\n"  # not the build host's name
    assert b"localhost" in members["etc/hosts"].data
    root = next(line for line in members["etc/shadow"].data.decode().splitlines() if line.startswith("root:"))
    assert root.split(":")[1].startswith("!"), root  # locked
    assert not any(name.startswith("etc/.resolv.conf") for name in members)


def test_networkd_and_resolved_are_enabled(members) -> None:
    wants = "etc/systemd/system/{}.wants/{}"
    networkd = members[wants.format("multi-user.target", "systemd-networkd.service")]
    assert networkd.type == tarfile.SYMTYPE and networkd.link.endswith("/systemd-networkd.service")
    assert members[wants.format("sockets.target", "systemd-networkd.socket")].type == tarfile.SYMTYPE
    assert members[wants.format("sysinit.target", "systemd-resolved.service")].type == tarfile.SYMTYPE
    assert members["etc/resolv.conf"].link == "../run/systemd/resolve/stub-resolv.conf"
    assert members["usr/sbin/init"].link.endswith("lib/systemd/systemd")  # systemd-sysv


def test_no_documentation_but_copyrights(members) -> None:
    assert not [name for name in members if name.startswith("usr/share/man/man")]
    assert "usr/share/doc/systemd/copyright" in members and "usr/share/doc/systemd/README.Debian" not in members


def test_manifest_sha256_and_sources(os_image: OsImage) -> None:
    manifest = json.loads(os_image.manifest_path.read_text())
    assert manifest == os_image.manifest
    with os_image.tarball.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    assert os_image.sha256 == digest == manifest["sha256"]
    sums = osimage.sha256_path(os_image.tarball).read_text()
    assert sums == f"{digest}  {os_image.tarball.name}\n"  # sha256sum -c reads it
    assert manifest["size_bytes"] == os_image.tarball.stat().st_size
    assert manifest["suite"] == "bookworm" and manifest["distribution"] == "debian"
    assert manifest["sources"][0].startswith("deb ") and manifest["sources"][0].endswith(" bookworm main")
    for package in osimage.OS_PACKAGES:
        assert manifest["packages"].get(package), package  # with its version
    assert 100 < len(manifest["packages"]) < 400
    assert manifest["build_seconds"] > 0 and 200e6 < manifest["unpacked_bytes"] < 1e9
    assert manifest["input_hash"] == debian_recipe("bookworm").input_hash()


def test_the_same_inputs_are_a_cache_hit(os_image: OsImage, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    again = build_test_os_image()
    assert time.monotonic() - started < 1
    assert again.cached and again.tarball == os_image.tarball and again.sha256 == os_image.sha256
    assert "cached" in capsys.readouterr().out


def test_cli_reports_the_cached_image_as_an_asset(os_image: OsImage, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["image", "os", "debian", "--suite", "bookworm", "--out", str(os_image_dir())]) == 0
    assert time.monotonic() - started < 1
    out = capsys.readouterr().out
    assert "cached" in out and os_image.sha256 in out
    assert f'[assets] debian-bookworm = "{os_image.tarball}"' in out


def test_a_suite_the_mirror_lacks_is_a_clear_error_before_building(tmp_path: Path) -> None:
    recipe = debian_recipe("nosuchsuite")
    started = time.monotonic()
    with pytest.raises(BootserverError, match=r"has no suite 'nosuchsuite'.*check --suite"):
        build_os_image(recipe, tmp_path / "out", progress=lambda _: None)
    assert time.monotonic() - started < 15  # the mirror said so; mmdebstrap never ran
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suite", ["../etc", "Bookworm", "", "bookworm main"])
def test_a_suite_must_be_a_name(suite: str) -> None:
    with pytest.raises(BootserverError, match="not a Debian suite name"):
        debian_recipe(suite)


def test_changed_inputs_are_a_new_build() -> None:
    base = OsRecipe("bookworm", "http://mirror.example/debian", None, updates=False)
    variants = [
        OsRecipe("trixie", base.mirror, None, updates=False),
        OsRecipe("bookworm", "http://other.example/debian", None, updates=False),
        OsRecipe("bookworm", base.mirror, "http://security.example/debian-security", updates=False),
        OsRecipe("bookworm", base.mirror, None, updates=True),
        OsRecipe("bookworm", base.mirror, None, updates=False, packages=(*osimage.OS_PACKAGES, "vim")),
    ]
    hashes = {base.input_hash(), *(variant.input_hash() for variant in variants)}
    assert len(hashes) == 1 + len(variants)
    assert OsRecipe("bookworm", base.mirror, None, updates=False).input_hash() == base.input_hash()


# --- where the packages come from ---------------------------------------------------------------------------


def test_host_apt_sources_both_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian/ bookworm main\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian bookworm-updates main contrib # trailing\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "# disabled\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n"
    )
    (tmp_path / "sources.list.d" / "vendor.list.disabled").write_text("deb http://vendor.example/apt stable main\n")
    assert osimage.host_apt_sources(tmp_path) == [
        AptSource("http://mirror.example/debian", ("bookworm",), ("main",)),
        AptSource("http://mirror.example/debian", ("bookworm-updates",), ("main", "contrib")),
        AptSource("http://security.example/debian-security", ("bookworm-security",), ("main",)),
    ]


HOST_SOURCES = [
    AptSource("https://vendor.example/apt", ("cloud-sdk-bookworm",), ("main",)),
    AptSource("http://mirror.example/debian", ("bookworm", "bookworm-updates"), ("main",)),
    AptSource("http://security.example/debian-security", ("bookworm-security",), ("main",)),
]


def test_the_hosts_mirrors_by_default() -> None:
    recipe = debian_recipe("trixie", sources=HOST_SOURCES, codename="bookworm")
    assert recipe.sources() == [
        "deb http://mirror.example/debian trixie main",
        "deb http://mirror.example/debian trixie-updates main",
        "deb http://security.example/debian-security trixie-security main",
    ]


def test_mirrors_from_the_command_line() -> None:
    recipe = debian_recipe("bookworm", "http://local.example/debian/", "none", sources=HOST_SOURCES,
                           codename="bookworm")
    assert recipe.sources() == ["deb http://local.example/debian bookworm main",
                                "deb http://local.example/debian bookworm-updates main"]
    only_main = [AptSource("http://mirror.example/debian", ("bookworm",), ("main",))]
    assert debian_recipe("bookworm", sources=only_main, codename="bookworm").sources() == [
        "deb http://mirror.example/debian bookworm main"]


def test_a_host_without_a_debian_mirror_is_told_to_pass_one() -> None:
    with pytest.raises(BootserverError, match=r"no Debian mirror for its own suite 'jammy'.*pass --mirror URL"):
        debian_recipe("bookworm", sources=HOST_SOURCES, codename="jammy")


def test_suites_a_mirror_does_not_publish_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    published = {("http://m.example/debian", "sid"): True, ("http://m.example/debian", "sid-updates"): False,
                 ("http://s.example/debian-security", "sid-security"): False}
    monkeypatch.setattr(osimage, "_suite_published", lambda mirror, suite: published[(mirror, suite)])
    said: list[str] = []
    recipe = osimage.published_only(OsRecipe("sid", "http://m.example/debian", "http://s.example/debian-security",
                                             updates=True), said.append)
    assert recipe.sources() == ["deb http://m.example/debian sid main"]
    assert len(said) == 2 and "sid-updates" in said[0] and "sid-security" in said[1]


def test_missing_mmdebstrap_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(osimage, "_suite_published", lambda mirror, suite: None)
    with pytest.raises(BootserverError, match="apt-get install mmdebstrap"):
        build_os_image(OsRecipe("bookworm", "http://m.example/debian", None, updates=False), tmp_path / "out",
                       progress=lambda _: None)


def test_customize_hook_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install shellcheck")
    result = subprocess.run([shellcheck, str(osimage.CUSTOMIZE_HOOK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- the agent unpacks it -----------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner, size, link target and device."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, size, link, st.st_rdev,
                                                  st.st_nlink)
    return found


def test_the_agent_unpacks_the_image_as_gnu_tar_does(agent_image: AgentImage, os_image: OsImage,
                                                     tmp_path: Path) -> None:
    """The agent's own zstd and busybox tar, in a chroot of its initramfs, unpack the tarball exactly as GNU tar
    does (owners, modes with setuid bits, links, hard links, devices, long names); the rootfs's grub-install runs
    in a chroot from there, and the agent has every other tool an install uses."""
    if os.geteuid() != 0:
        pytest.fail("needs root: the agent's tar restores owners and device nodes (CI runs as root)")
    agent = tmp_path / "agent"
    agent.mkdir()
    unpacked = subprocess.run(f"zcat {agent_image.initrd} | cpio -idm --quiet", shell=True, cwd=agent,
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    (agent / "os").mkdir()
    shutil.copyfile(os_image.tarball, agent / "os" / "rootfs.tar.zst")
    (agent / "os" / "hello.xz").write_bytes(lzma.compress(b"hello from xz\n"))
    script = """set -e
        for tool in chroot tar gzip zstd xz resize2fs sfdisk blkid mkfs.ext4 mount; do
            command -v "$tool" >/dev/null
        done
        xz -dc /os/hello.xz
        mkdir /target
        zstd -dc /os/rootfs.tar.zst | tar -x -C /target
        mount -t proc proc /target/proc
        chroot /target /usr/sbin/grub-install --version
        umount /target/proc
    """
    try:
        result = subprocess.run(["chroot", str(agent), "/bin/env", "-i", "PATH=/bin", "/bin/sh", "-c", script],
                                capture_output=True, text=True, timeout=300)
    finally:  # a failure between mount and umount must not leave /proc mounted in tmp_path
        subprocess.run(["umount", "--lazy", str(agent / "target" / "proc")], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert "hello from xz" in result.stdout and "grub-install (GRUB)" in result.stdout

    reference = tmp_path / "gnu"
    reference.mkdir()
    subprocess.run(["tar", "-I", "zstd", "-xpf", str(os_image.tarball), "-C", str(reference)], check=True)
    ours, theirs = tree(agent / "target"), tree(reference)
    assert len(ours) > 10_000
    differ = sorted(path for path in ours.keys() | theirs.keys() if ours.get(path) != theirs.get(path))
    assert not differ, [(path, ours.get(path), theirs.get(path)) for path in differ[:10]]
    assert stat.S_IMODE(ours["usr/bin/passwd"][0]) & stat.S_ISUID

