"""Secure Boot on real firmware: OVMF's Secure Boot build with Microsoft's keys enrolled, on the lab's VDE switch,
netboots through Debian's signed shim and GRUB (`bootserver image secureboot`) to the agent's phone-home, over its
own PXE (TFTP) and over its own HTTP boot, and to `running`: the installed Debian boots with Secure Boot on, through
the shim and signed GRUB on its own ESP.

Needs root, vde2, qemu-system-x86, ovmf and Debian's package lists (the signed binaries are downloaded with
apt-get download, as the agent image's packages are); a missing one fails the test.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.lab import MAC, after_last_reboot, lab_for_test, report, served, timeline, wait_phoned_home

from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm


async def test_the_firmware_refuses_unsigned_ipxe_and_the_events_show_where_the_chain_stopped(
        tmp_path: Path, agent_image: AgentImage, timing):
    """The same Secure Boot VM, its machine not marked secure_boot: it is told to boot Debian's unsigned ipxe.efi,
    which the firmware refuses to run. Its last event is that file, served in full; no script is ever asked for."""
    with lab_for_test(tmp_path) as lab:
        lab.write_config(agent_image.kernel.parent, provision=False)
        lab.start_server()
        started = time.monotonic()
        lab.start_vm(1, firmware="uefi-secureboot")
        serial = lab.serial_log(1)
        deadline = time.monotonic() + 180
        while "Access Denied" not in serial.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no refusal from the firmware in 180 s{report(lab, 1)}"
            await asyncio.sleep(0.5)
        timing("OVMF with Secure Boot given unsigned ipxe.efi (VDE): QEMU start to the firmware's refusal",
               time.monotonic() - started)
        events = timeline(lab)
        served = [e.detail for e in events if e.kind == "file-served"]
        # (The firmware may go on to try the network again: then it gets the same file again.)
        assert served and {(f["file"], f["protocol"], f["bytes"] == f["size"]) for f in served} == \
            {("ipxe.efi", "tftp", True)}, served
        assert not [e for e in events if e.kind == "script-served"], "the refused binary asked for a script"
        assert [e.kind for e in events if e.kind != "dhcp"][-1] == "file-served", [e.kind for e in events]


async def test_a_secure_boot_vm_netboots_through_shim_and_grub_over_its_pxe(tmp_path: Path, agent_image: AgentImage,
                                                                               timing):
    """`bootserver lab up --firmware uefi-secureboot`: the firmware's own PXE -> shim -> GRUB and its configuration
    over TFTP -> signed kernel and initrds over HTTP to the agent, which reports Secure Boot on."""
    with lab_for_test(tmp_path) as lab:
        lab.write_config(agent_image.kernel.parent, machines=1, provision=False, firmware="uefi-secureboot")
        lab.start_server()
        started = time.monotonic()
        lab.start_vm(1, firmware="uefi-secureboot")
        took = await wait_phoned_home(lab, 1, started, timeout=300)
        timing("OVMF with Secure Boot, its own PXE -> shim -> GRUB -> signed kernel (VDE): QEMU start to phone-home",
               took)
        events = timeline(lab)
        dhcp = [e.detail for e in events if e.kind == "dhcp"]
        assert dhcp[0]["bootfile"] == "shimx64.efi" and "Secure Boot" in dhcp[0]["answer"], dhcp
        script = next(e.detail for e in events if e.kind == "script-served")
        assert script["loader"] == "grub" and script["transport"] == "tftp", script
        # The chain's files, each served in full to this machine (known by its lease), in order.
        assert served(events)[:2] == [("shimx64.efi", "tftp", True), ("grubx64.efi", "tftp", True)], served(events)
        # The kernel and initrds over HTTP: GRUB 2.12 reads its initrds seconds after opening them (Booter).
        assert {(name, whole) for name, protocol, whole in served(events) if protocol == "http"} == \
            {("agent-kernel", True), ("agent-initrd", True), ("bootserver.cpio", True)}, served(events)
        phoned = next(e.detail for e in events if e.kind == "phoned-home")
        assert phoned["secure_boot"] is True, phoned  # what the agent read from the firmware's SecureBoot variable


async def test_a_secure_boot_lab_vm_boots_over_http_and_runs_its_installed_os(
        tmp_path: Path, agent_image: AgentImage, os_image, timing):
    """`bootserver lab up --firmware uefi-secureboot-http`, from a server without TFTP: the firmware's own HTTP boot
    -> shim -> GRUB (which reads its configuration, kernel and initrds over HTTP) -> signed kernel to the agent, which
    reports Secure Boot on and installs Debian with shim (as BOOTX64.EFI) and its signed GRUB on the ESP. After the
    reboot the firmware's HTTP boot gets the shim again, whose GRUB is sent on to the disk (its local-disk
    configuration starts the disk's signed GRUB), and the installed system boots with Secure Boot on (the firmware
    would refuse an unsigned piece), reports it, and runs the lab's service."""
    with lab_for_test(tmp_path) as lab:
        lab.write_config(agent_image.kernel.parent, machines=1, os_image=os_image.tarball,
                         firmware="uefi-secureboot-http", tftp=False)
        lab.start_server()
        started = time.monotonic()
        lab.start_vm(1, firmware="uefi-secureboot-http")
        took = await wait_phoned_home(lab, 1, started, timeout=300)
        timing("OVMF with Secure Boot, its own HTTP boot -> shim -> GRUB -> signed kernel (VDE, no TFTP): "
               "QEMU start to phone-home", took)
        events = timeline(lab)
        dhcp = [e.detail for e in events if e.kind == "dhcp"]
        assert dhcp[0]["client_arch"] == [16] and dhcp[0]["vendor_class"].startswith("HTTPClient"), dhcp[0]
        assert dhcp[0]["bootfile"] == "http://10.100.0.1:80/secureboot/shimx64.efi", dhcp[0]
        script = next(e.detail for e in events if e.kind == "script-served")
        assert script["loader"] == "grub" and script["transport"] == "http", script
        assert served(events)[:2] == [("shimx64.efi", "http", True), ("grubx64.efi", "http", True)], served(events)
        phoned = next(e.detail for e in events if e.kind == "phoned-home")
        assert phoned["secure_boot"] is True, phoned  # what the agent read from the firmware's SecureBoot variable

        try:
            await asyncio.to_thread(lab.wait_running, 1, 600)
        except Exception as exc:
            raise AssertionError(f"{exc}{report(lab, 1)}") from exc
        timing("lab, 1 OVMF VM with Secure Boot over its own HTTP boot, our full DHCP, VDE: QEMU start to running",
               time.monotonic() - started)
        events = timeline(lab)
        assert next(e.detail for e in events if e.kind == "installed")["platform"] == "efi"
        after = [e for e in after_last_reboot(events) if e.kind in ("script-served", "booted")]
        assert after and after[-1].kind == "booted", [e.kind for e in events]
        assert {(e.detail["profile"], e.detail.get("loader")) for e in after[:-1]} == {("local-disk", "grub")}, after
        booted = after[-1].detail
        assert booted["secure_boot"] is True, booted  # the installed OS read its firmware's SecureBoot variable
        assert {protocol for _, protocol, _ in served(events)} == {"http"}, served(events)
        assert "TFTP on (off)" in (lab.dir / "server.log").read_text(), "the server ran without TFTP"
        machine = next(m for m in lab.status_json()["machines"] if m["mac"] == MAC)
        assert machine["facts"]["secure_boot"] == "true", machine
        serial = lab.serial_log(1).read_text(errors="replace")
        assert serial.count("Secure boot enabled") >= 2, report(lab, 1)  # the agent's kernel, then the disk's
