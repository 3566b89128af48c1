"""The agent image: what the initramfs holds, and that it really boots and reports home.

The image comes from the session fixture `agent_image` (conftest.py), built once into a cache
directory that survives runs. The `vm` tests boot it under QEMU (TCG) with user-mode networking,
so the guest's 10.0.2.2:PORT is this process's 127.0.0.1:PORT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import stat
from pathlib import Path

import libarchive
import pytest
from aiohttp import web
from qemu import DEFAULT_MAC, Vm

from bootserver import image
from bootserver.errors import BootserverError
from bootserver.image import AGENT_MODULES, AgentImage


def read_initramfs(path: Path) -> dict[str, dict]:
    entries = {}
    with libarchive.file_reader(str(path)) as archive:
        for entry in archive:
            entries[entry.pathname] = {
                "type": stat.S_IFMT(entry.mode),
                "perm": stat.S_IMODE(entry.mode),
                "uid": entry.uid,
                "gid": entry.gid,
                "size": entry.size,
                "link": entry.linkpath if entry.issym else None,
                "rdev": (entry.rdevmajor, entry.rdevminor),
                "data": b"".join(entry.get_blocks()) if entry.isreg and entry.size < 100_000 else None,
            }
        # known once a header has been read
        assert archive.format_name == b"ASCII cpio (SVR4 with no CRC)", archive.format_name  # newc
        assert archive.filter_names == [b"gzip"], archive.filter_names
    return entries


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert image.default_cache_dir() == tmp_path / "bootserver"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert image.default_cache_dir() == tmp_path / "home" / ".cache" / "bootserver"


def test_empty_apt_lists_say_run_apt_get_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "apt-cache"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'E: No packages found' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(BootserverError, match="run apt-get update"):
        image.build_agent_image(tmp_path / "out", cache_dir=tmp_path / "cache", progress=lambda _: None)


def test_image_files(agent_image: AgentImage) -> None:
    assert agent_image.kernel.name == "vmlinuz" and agent_image.initrd.name == "initrd.img"
    assert (agent_image.kernel.parent / "version").read_text().strip() == agent_image.version
    assert agent_image.version.endswith("-amd64")
    assert agent_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert agent_image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip


def test_initramfs_contents(agent_image: AgentImage) -> None:
    entries = read_initramfs(agent_image.initrd)
    reg, lnk = stat.S_IFREG, stat.S_IFLNK

    init = entries["init"]
    assert init["type"] == reg and init["perm"] == 0o755
    assert init["data"].startswith(b"#!/bin/sh\n")
    assert b"bootserver.url" in init["data"] and b"/booted" in init["data"]

    busybox = entries["bin/busybox"]
    assert busybox["type"] == reg and busybox["perm"] == 0o755 and busybox["size"] > 1_000_000
    assert entries["bin/sh"] == {**entries["bin/sh"], "type": lnk, "link": "busybox"}
    for applet in ("udhcpc", "wget", "insmod", "ip", "setsid", "cttyhack", "timeout", "mount"):
        assert entries[f"bin/{applet}"]["link"] == "busybox", applet
    # every symlink has a target (libarchive-c alone writes them empty) and none loops to itself
    for path, entry in entries.items():
        if entry["type"] == lnk:
            assert entry["link"] and entry["link"] != path.rsplit("/", 1)[-1], path

    script = entries["etc/udhcpc/default.script"]
    assert script["type"] == reg and script["perm"] == 0o755
    assert entries["dev/console"]["type"] == stat.S_IFCHR and entries["dev/console"]["rdev"] == (5, 1)
    assert entries["tmp"]["perm"] == 0o1777
    assert all(e["uid"] == 0 and e["gid"] == 0 for e in entries.values())

    # the modules, uncompressed, and a load order with dependencies first
    moddir = f"lib/modules/{agent_image.version}/"
    order = entries["etc/bootserver/modules"]["data"].decode().split()
    names = [m.rsplit("/", 1)[-1].removesuffix(".ko") for m in order]
    for wanted in AGENT_MODULES:
        assert wanted in names, (wanted, names)
    for module in order:
        entry = entries[moddir + module]
        assert entry["type"] == reg and entry["size"] > 0, module
        assert module.endswith(".ko")
    for before, after in (("virtio_ring", "virtio"), ("virtio", "virtio_pci"), ("virtio", "virtio_net"),
                          ("failover", "net_failover"), ("net_failover", "virtio_net")):  # fmt: skip
        assert names.index(before) < names.index(after), (before, after, names)
    assert moddir + "modules.dep" in entries


async def serve_booted(reports: list[dict], arrived: asyncio.Event, extra_routes=()):
    """A tiny server on 127.0.0.1:0 recording POST /boot/{mac}/booted; returns (runner, port)."""

    async def booted(request: web.Request) -> web.Response:
        reports.append({"mac_path": request.match_info["mac"], "body": await request.json()})
        arrived.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/boot/{mac}/booted", booted)
    app.router.add_routes(list(extra_routes))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def check_report(reports: list[dict], vm: Vm, version: str) -> None:
    assert len(reports) >= 1, vm.report()
    report = reports[0]
    assert report["mac_path"] == DEFAULT_MAC.replace(":", "-"), vm.report()
    body = report["body"]
    assert body["mac"] == DEFAULT_MAC, (body, vm.report())
    assert ipaddress.ip_address(body["ip"]) in ipaddress.ip_network("10.0.2.0/24"), (body, vm.report())
    assert body["kernel"] == version, body


@pytest.mark.vm
async def test_agent_boots_and_reports_home(agent_image: AgentImage, tmp_path: Path) -> None:
    reports: list[dict] = []
    arrived = asyncio.Event()
    runner, port = await serve_booted(reports, arrived)
    vm = Vm(
        workdir=tmp_path,
        kernel=agent_image.kernel,
        initrd=agent_image.initrd,
        # panic=-1 reboots on a panic, and -no-reboot then ends QEMU: a failure shows at once
        append=f"console=ttyS0 panic=-1 bootserver.url=http://10.0.2.2:{port} bootserver.mac={DEFAULT_MAC}",
    )
    try:
        await vm.start()
        await vm.wait_until(arrived, timeout=90, what="POST /boot/.../booted")
        took = vm.elapsed
        check_report(reports, vm, agent_image.version)
        await vm.wait_for_serial(r"bootserver agent: reported to \S+ ok", timeout=20)
        print(f"call home {took:.1f} s after QEMU started")
    finally:
        await vm.stop()
        await runner.cleanup()


def test_compressed_modules_are_unpacked(tmp_path: Path) -> None:
    import gzip
    import lzma

    elf = b"\x7fELF" + bytes(range(256)) * 4
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "c.ko").write_bytes(elf)
    for name in ("a.ko.xz", "b.ko.gz", "c.ko"):
        assert image._read_module(tmp_path / name) == elf, name
    assert image._plain("kernel/drivers/net/virtio_net.ko.xz") == "kernel/drivers/net/virtio_net.ko"
    assert image._module_name("kernel/net/core/fail-over.ko.zst") == "fail_over"
