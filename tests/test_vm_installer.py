"""A distribution's own installer boots from a profile and reads its per-machine files from us: Debian's
installer (the debian-installer-12-netboot-amd64 package's kernel and initrd, as assets) netboots through the NIC's
iPXE ROM in QEMU, fetches the preseed its command line names (file_url), and runs the preseed's early_command,
which fetches a second file of the machine's: proof that it read ours. The VM is stopped there, long before it
would install anything; the guest reaches nothing but this test's server (QEMU's user-mode network)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from support.installer import installer_site
from support.qemu import DEFAULT_MAC, Vm
from support.vm import events

from bootserver.app import STORE, http_address, init_app, running

pytestmark = pytest.mark.vm
INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
PRESEED = """# {{ hostname }} ({{ mac }}), profile {{ profile.name }}
d-i preseed/early_command string wget -O /tmp/proof {{ file_url('proof') }}
"""
# auto=true asks the locale and keyboard questions only after the preseed is read; priority=critical asks
# nothing it has a default for (the network is DHCP's, the hostname the installer's own).
CMDLINE = "auto=true priority=critical url={{ file_url('preseed.cfg') }} console=ttyS0,115200"


def installer_files(app, mac: str) -> list[tuple[str, str, str]]:
    """The installer files served to `mac`, in order: (file, protocol, to whom)."""
    return [(e.detail["file"], e.detail["protocol"], e.detail.get("from")) for e in app[STORE].events(mac)
            if e.kind == "file-served" and e.detail["file"].startswith("files/")]


async def test_debian_installer_reads_its_preseed_from_us(tmp_path: Path, timing):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: install qemu-system-x86 (./setup test does)")
    if not (INSTALLER / "linux").is_file() or not (INSTALLER / "initrd.gz").is_file():
        pytest.fail(f"Debian's installer is missing from {INSTALLER}: install debian-installer-12-netboot-amd64 "
                    f"(./setup test does)")
    config = installer_site(tmp_path, {"preseed.cfg": PRESEED, "proof": "read by {{ hostname }}\n"},
                            cmdline=CMDLINE, kernel=INSTALLER / "linux", initrd=INSTALLER / "initrd.gz",
                            machines=f'[machines."{DEFAULT_MAC}"]\nhostname = "installer1"\n')
    app = init_app(config)
    async with running(app):
        # The installer takes a DHCP boot file holding "://" for its preseed URL, before the command line's (and
        # stops when it is no preseed): QEMU's DHCP hands every client its bootfile, so the ROM gets a TFTP name
        # (from QEMU's own TFTP server) whose script chains to us. Our DHCP gives an OS's client no boot file.
        tftp = tmp_path / "tftp"
        tftp.mkdir()
        (tftp / "chain.ipxe").write_text(f"#!ipxe\nchain http://10.0.2.2:{http_address(app)[1]}/boot.ipxe\n")
        async with Vm(workdir=tmp_path, tftp_dir=tftp, bootfile="chain.ipxe", memory=1024) as vm:
            deadline = time.monotonic() + 300
            while len(installer_files(app, DEFAULT_MAC)) < 2:
                assert vm.running, f"QEMU exited before the installer fetched its files{vm.report()}{events(app)}"
                assert time.monotonic() < deadline, f"no preseed and proof within 300 s{vm.report()}{events(app)}"
                await asyncio.sleep(0.5)
            took = vm.elapsed
        timing("Debian's installer over http: QEMU start to the preseed's second file", took)

        # Slirp: the guest's requests come from the host's loopback, the address its boot script went to.
        assert installer_files(app, DEFAULT_MAC) == [("files/preseed.cfg", "http", "127.0.0.1"),
                                                     ("files/proof", "http", "127.0.0.1")], events(app)
        kinds = [(e.kind, e.detail.get("file")) for e in app[STORE].events(DEFAULT_MAC)]
        assert kinds.index(("file-served", "initrd")) < kinds.index(("file-served", "files/preseed.cfg")), events(app)
        assert [e.kind for e in app[STORE].events(DEFAULT_MAC) if e.kind in ("refused", "file-failed")] == []
