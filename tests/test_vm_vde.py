"""Real firmware on a real (virtual) Ethernet segment: QEMU VMs on a VDE switch, bootserver as their DHCP.

Each test builds a lab of its own (bootserver/tools/lab.py): a network namespace holding the switch's tap,
bootserver (`serve`, as its own process, on DHCP 67/4011, TFTP 69, HTTP 80) and the RA sender; VMs
plug into the switch. Everything is torn down after the test. State is read the way an operator would:
over HTTP from inside the namespace (curl), and from the store file.

    full   three VMs at once, one of each way a rack's firmware netboots (SeaBIOS with the NIC's iPXE ROM, OVMF
           with the ROM's ipxe.efi, OVMF's own HTTP boot), get their reserved addresses, install Debian, run the
           demo service and reach each other, from a server without TFTP
    proxy  dnsmasq in a second namespace on the same switch hands out addresses only; our proxyDHCP
           hands out the boot file
    uefi   OVMF's own PXE client (no iPXE ROM on the NIC) gets ipxe.efi over TFTP on port 69, then iPXE
           asks again and gets our HTTP bootstrap

Needs root, vde2, qemu-system-x86, ovmf, ipxe, dnsmasq and curl; a missing one fails the test.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from support.browser import chromium
from support.lab import (
    after_last_reboot,
    api_get,
    dhcp_events,
    lab_for_test,
    phone_home_ip,
    report,
    served,
    timeline,
    wait_phoned_home,
)

from bootserver.phases import PHASES
from bootserver.store import Store
from bootserver.tools.image import AgentImage
from bootserver.tools.lab import VM_MAC, Lab

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parent.parent
# The full-mode lab's VMs, one of each way a machine netboots.
FIRMWARES = {1: "bios", 2: "uefi", 3: "uefi-http"}



@pytest.fixture
def lab(tmp_path: Path):
    with lab_for_test(tmp_path) as lab:
        yield lab


async def test_full_mode_three_vms_to_running_and_checking_each_other(lab: Lab, agent_image: AgentImage, os_image,
                                                                     timing, tmp_path: Path):
    """`bootserver lab up --vms 3`, a rack of mixed firmware: SeaBIOS (the NIC's iPXE ROM), OVMF (the ROM's
    ipxe.efi) and OVMF's own UEFI HTTP boot get their reserved addresses from our DHCP, install Debian, boot it from
    their own disks and run the demo peer service, each reaching the other two over the switch. After the install's
    reboot each is sent on to its disk by its local-disk script (UEFI: iPXE exits with an error status), never by an
    answer without a boot file (which cost the UEFI machines a minute of DHCP retries)."""
    lab.write_config(agent_image.kernel.parent, machines=3, os_image=os_image.tarball, tftp=False)
    lab.start_server()
    started = time.monotonic()
    for index, firmware in FIRMWARES.items():
        lab.start_vm(index, firmware=firmware)
    try:
        await asyncio.to_thread(lab.wait_running, 3, 1200)
    except Exception as exc:
        raise AssertionError(f"{exc}{report(lab, 1)}{report(lab, 2)}{report(lab, 3)}") from exc
    timing("full mode over VDE, 3 VMs at once (SeaBIOS, OVMF, OVMF HTTP boot): QEMU start to all running",
           time.monotonic() - started)

    machines = {m["mac"]: m for m in lab.machines()}
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        leases = {lease.mac: lease for lease in store.leases()}
    finally:
        store.close()
    for index in (1, 2, 3):
        mac = VM_MAC.format(index)
        assert leases[mac].state == "bound" and IPv4Address(leases[mac].ip) == lab.reserved_ip(index)
        assert machines[mac]["ip"] == str(lab.reserved_ip(index)), "the installed OS got its reservation too"
        events, log = dhcp_events(lab, mac), timeline(lab, mac)
        firmware, ipxe = events[0], next(e for e in events if e.get("ipxe"))
        assert (firmware["message"], firmware["mode"]) == ("DISCOVER", "full"), firmware
        if FIRMWARES[index] == "uefi-http":  # the firmware's HTTP client fetches ipxe.efi, which asks again
            assert firmware["client_arch"] == [16], firmware
            assert firmware["vendor_class"].startswith("HTTPClient:Arch:00016"), firmware
            assert firmware["bootfile"] == "http://10.100.0.1:80/ipxe/ipxe.efi", firmware
            assert ("ipxe.efi", "http") in {(name, protocol) for name, protocol, _ in served(log)}
        else:  # the NIC's iPXE ROM: it gets the bootstrap URL straight away
            assert firmware is ipxe, firmware
        assert ipxe["bootfile"] == "http://10.100.0.1:80/boot.ipxe", ipxe
        assert any(e["answer"] == "not a PXE client: an address only" for e in events), "the agent's udhcpc"
        assert not [e for e in events if "boots its disk" in e["answer"]], events
        after_reboot = [(e.kind, e.detail["profile"] if e.kind == "script-served" else None)
                        for e in after_last_reboot(log) if e.kind in ("script-served", "booted")]
        assert after_reboot[-1] == ("booted", None) and after_reboot[:-1], after_reboot
        assert set(after_reboot[:-1]) == {("script-served", "local-disk")}, after_reboot
        assert {protocol for _, protocol, _ in served(log)} == {"http"}
    assert "TFTP on (off)" in (lab.dir / "server.log").read_text(), "the server ran without TFTP"
    # The peer matrix: every member's lab-node reaches both others over the switch (six pairs).
    pairs = {(machines[mac]["hostname"], peer["hostname"]): peer["reachable"]
             for mac in machines for peer in machines[mac]["peers"]}
    expected = {(f"lab{a}", f"lab{b}") for a in (1, 2, 3) for b in (1, 2, 3) if a != b}
    assert set(pairs) == expected and all(pairs.values()), pairs
    assert f"-> lab2 {lab.reserved_ip(2)}: reachable" in lab.status()
    await operators_view_of_the_boots(lab, list(machines), tmp_path)



async def operators_view_of_the_boots(lab: Lab, macs: list[str], tmp_path: Path) -> None:
    """The operator's views, filled by this real boot: each machine's waterfall has its phases in order, each
    starting at the event that opens it and adding up to the boot; the fleet names the slowest OS install; the
    pages (in chromium, inside the lab's namespace) show the same. Screenshots go to artifacts/lab-*.png."""
    installs = {}
    for mac in macs:
        boot = api_get(lab, f"/api/v1/machines/{mac}/waterfall")["boot"]
        names = [phase["phase"] for phase in boot["phases"]]
        assert boot["outcome"] == "running" and names == [p for p in PHASES if p in names], names
        assert {"dhcp", "script", "kernel", "phone-home", "disk", "install", "deploy", "reboot", "booted",
                "running"} <= set(names), names  # the NIC's iPXE ROM fetches no loader: no tftp phase
        events = timeline(lab, mac)
        starts = {phase["phase"]: phase["start"] for phase in boot["phases"]}
        step_started = {e.detail["step"]: e.time for e in events if e.kind == "step-started"}
        assert starts["install"] == step_started["install"] and starts["deploy"] == step_started["deploy"]
        assert starts["phone-home"] == next(e.time for e in events if e.kind == "phoned-home")
        assert starts["booted"] == next(e.time for e in events if e.kind == "booted")
        assert abs(sum(phase["seconds"] for phase in boot["phases"]) - boot["seconds"]) < 0.01
        installs[mac] = step_started["deploy"] - step_started["install"]
    slowest = max(installs, key=installs.__getitem__)
    spreads = {s["phase"]: s for s in api_get(lab, "/api/v1/fleet")["phases"]}
    assert spreads["install"]["count"] == len(macs) and spreads["install"]["slowest"][0]["mac"] == slowest

    shots = ROOT / "artifacts"
    shots.mkdir(exist_ok=True)
    base = f"http://{lab.address.ip}"
    async with chromium(lab.namespace, tmp_path) as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        await page.goto(f"{base}/machines/{slowest}")
        rows = page.locator("#waterfall tr[data-phase]")
        shown = [await row.get_attribute("data-phase") for row in await rows.all()]
        boot = api_get(lab, f"/api/v1/machines/{slowest}/waterfall")["boot"]
        assert shown == [phase["phase"] for phase in boot["phases"]], shown
        await page.screenshot(path=str(shots / "lab-waterfall.png"), full_page=True)
        await page.goto(f"{base}/fleet")
        link = page.locator('table.spreads tr[data-phase="install"] td.slowest a').first
        assert await link.inner_text() == slowest
        await page.screenshot(path=str(shots / "lab-fleet.png"), full_page=True)
        await page.goto(f"{base}/?sort=boot&order=desc")
        await page.screenshot(path=str(shots / "lab-machines.png"), full_page=True)


async def test_proxy_mode_beside_dnsmasq(lab: Lab, agent_image: AgentImage, timing):
    lab.write_config(agent_image.kernel.parent, mode="proxy", provision=False)
    lab.start_server()
    # Another DHCP server on the same segment, in its own namespace: addresses only, no boot options.
    other = f"{lab.namespace}-d"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        await _boot_beside_dnsmasq(lab, other, agent_image, timing)
    finally:
        for name in ("dnsmasq", "plug"):  # stopped before their namespace goes
            if name in lab.processes:
                subprocess.run(["kill", str(lab.processes.pop(name)["pid"])], check=False)
        await asyncio.sleep(0.5)
        subprocess.run(["ip", "netns", "del", other], check=True)


async def _boot_beside_dnsmasq(lab: Lab, other: str, agent_image: AgentImage, timing) -> None:
    lab.spawn("plug", ["vde_plug2tap", "--sock", str(lab.switch_socket), "dhcp0"], marker="dhcp0", namespace=other)
    deadline = time.monotonic() + 5
    while subprocess.run(["ip", "netns", "exec", other, "ip", "link", "show", "dhcp0"],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"vde_plug2tap made no tap dhcp0{report(lab, 1)}"
        await asyncio.sleep(0.1)
    for command in (["ip", "addr", "add", "10.100.0.2/24", "dev", "dhcp0"], ["ip", "link", "set", "dhcp0", "up"]):
        subprocess.run(["ip", "netns", "exec", other, *command], check=True)
    lab.spawn("dnsmasq", ["dnsmasq", "--keep-in-foreground", "--log-facility=-", "--port=0", "--no-resolv",
                          "--no-hosts", "--interface=dhcp0", "--bind-interfaces", "--log-dhcp",
                          "--dhcp-range=10.100.0.150,10.100.0.199,255.255.255.0,10m",
                          f"--dhcp-leasefile={lab.dir / 'dnsmasq.leases'}", f"--pid-file={lab.dir / 'dnsmasq.pid'}"],
              marker="--interface=dhcp0", namespace=other, log=lab.dir / "dnsmasq.log")
    started = time.monotonic()
    lab.start_vm(1)
    took = await wait_phoned_home(lab, 1, started)
    timing("proxy mode beside dnsmasq over VDE, BIOS: QEMU start to phone-home", took)

    mac = VM_MAC.format(1)
    ip = phone_home_ip(lab, mac)
    assert ip in IPv4Network("10.100.0.0/24") and int(ip) & 0xFF >= 150, f"{ip}: not one of dnsmasq's addresses"
    assert mac in (lab.dir / "dnsmasq.leases").read_text()
    events = dhcp_events(lab, mac)
    assert {e["mode"] for e in events} == {"proxy"}
    assert events[0]["bootfile"] == "http://10.100.0.1:80/boot.ipxe"
    assert all(e["bootfile"] for e in events), "proxyDHCP answers PXE clients only: udhcpc was dnsmasq's"
    store = Store(lab.data_dir / "bootserver.sqlite3")
    try:
        assert store.leases() == [], "in proxy mode we hand out no address"
    finally:
        store.close()


async def test_uefi_native_pxe_gets_ipxe_over_tftp(lab: Lab, agent_image: AgentImage, timing):
    lab.write_config(agent_image.kernel.parent, provision=False)
    lab.start_server()
    started = time.monotonic()
    lab.start_vm(1, firmware="uefi", native_pxe=True)
    took = await wait_phoned_home(lab, 1, started, timeout=180)
    timing("OVMF native PXE -> ipxe.efi over TFTP -> HTTP (VDE): QEMU start to phone-home", took)

    events = dhcp_events(lab, VM_MAC.format(1))
    firmware = events[0]
    assert firmware["client_arch"] == [7] and firmware["vendor_class"].startswith("PXEClient:Arch:00007")
    assert firmware["bootfile"] == "ipxe.efi" and "ipxe" not in firmware
    ipxe = next(e for e in events if e.get("ipxe"))  # ipxe.efi ran and asked again: it got there over TFTP
    assert ipxe["bootfile"] == "http://10.100.0.1:80/boot.ipxe"
    phoned = next(e.detail for e in timeline(lab, VM_MAC.format(1)) if e.kind == "phoned-home")
    assert phoned["secure_boot"] is False, phoned  # OVMF's plain build: the agent read SecureBoot = 0
