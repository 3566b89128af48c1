"""Install flows on real firmware under QEMU TCG, from power-on: the rootfs source to `running` on SeaBIOS and
OVMF, a whole-disk image streamed by bootserver beside `wget | zstd -d | dd` inside the same kind of agent VM,
and three VMs through `bootserver lab` (VDE switch, our DHCP) to all `running`.

Times come from bootserver's own event log (each event's time minus QEMU's start), as the VM tests read them;
the VMs are tests/support's (Vm, vm_site) and the lab's (bootserver/tools/lab.py), so a benchmark boots exactly
what CI boots. Needs root (the lab's namespace), QEMU, OVMF, vde2, nginx and the agent and Debian images (built
once into ~/.cache/bootserver like the tests do). --quick: one SeaBIOS VM to `running`, a smoke run.

One VM at a time except the lab's three; every flow bounded in time, and one that does not reach its end state
fails the section.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from common import MB, ROOT, nginx, parse_args, table, workdir, write_section

sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the VM helpers CI uses

from support.agent_image import build_test_agent_image  # noqa: E402
from support.os_image import build_test_os_image  # noqa: E402
from support.qemu import DEFAULT_MAC, QEMU, Vm  # noqa: E402
from support.site import IMAGE_PROFILE, ROOTFS_PROFILE, empty_disk, install_golden, vm_site  # noqa: E402
from support.vm import wait_for_state  # noqa: E402

from bootserver.app import PROVISIONER, STORE  # noqa: E402
from bootserver.provision.ssh import NodeAccess, session  # noqa: E402
from bootserver.store import Store  # noqa: E402
from bootserver.store.records import Event  # noqa: E402
from bootserver.tools.image import AgentImage  # noqa: E402
from bootserver.tools.lab import VM_MAC, Lab, check_tools  # noqa: E402

FLOW_SECONDS = 900  # one VM from power-on to running (the VM tests allow 600 + 300)
LAB_SECONDS = 1800  # three VMs sharing two cores
LAB_VMS = 3
MILESTONES = ("phoned-home", "rebooting", "booted", "running")
GOLDEN_BYTES = 1 << 30  # the golden disk, as tests/test_vm_image.py makes it
TARGET_BYTES = 3 << 30  # the disk each VM installs onto

# The agent and nothing to provision: it phones home and waits, its SSH server up, for the peer commands.
BARE_PROFILE = """
[profiles.bare]
kernel = "agent-kernel"
initrd = ["agent-initrd"]
cmdline = "console=ttyS0"
"""


def since(events: list[Event], start: float) -> dict[str, float]:
    """Seconds from `start` (wall clock) to the first event of each kind."""
    times: dict[str, float] = {}
    for event in events:
        times.setdefault(event.kind, event.time - start)
    return times


def detail(events: list[Event], kind: str, **match: object) -> dict:
    """The detail of the last event of `kind` whose detail has the `match` values."""
    found = [e.detail for e in events if e.kind == kind and all(e.detail.get(k) == v for k, v in match.items())]
    if not found:
        raise AssertionError(f"no {kind} event{f' with {match}' if match else ''}: "
                             + ", ".join(e.kind for e in events))
    return found[-1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


# -- 1. the rootfs source, power-on to running ---------------------------------------------------------------


async def rootfs_to_running(agent: AgentImage, tarball: Path, firmware: str, scratch: Path) -> dict:
    """One VM with an empty disk, from power-on to `running` from its own disk; its milestones in seconds."""
    work = scratch / f"rootfs-{firmware}"
    work.mkdir()
    disk = empty_disk(work / "disk.img", TARGET_BYTES)
    async with (vm_site(work, agent, ROOTFS_PROFILE, {"debian": tarball}) as site,
                Vm(workdir=work, firmware=firmware, bootfile=site.bootfile, memory=1024, disk=disk,
                   hostfwd={site.ssh_port: 22}, reboot=True) as vm):
        powered_on = time.time() - vm.elapsed
        await wait_for_state(site.app, vm, "running", timeout=FLOW_SECONDS)
        events = site.app[STORE].events(DEFAULT_MAC)
    progress = detail(events, "install-progress")
    return {"times": since(events, powered_on), "install": detail(events, "installed")["seconds"],
            "stream": progress["seconds"], "stream_mb": progress["total"] / MB}


# -- 2. image streaming: bootserver beside wget | zstd -d | dd ------------------------------------------------


async def image_by_bootserver(agent: AgentImage, image: Path, scratch: Path) -> dict:
    """bootserver's install step writing `image` (a .raw.zst) onto an empty disk: the streaming command's own
    duration (its `command` event: first byte sent to the node's `dd` exiting) and the whole install step."""
    work = scratch / "image-bootserver"
    work.mkdir()
    disk = empty_disk(work / "disk.img", TARGET_BYTES)
    async with (vm_site(work, agent, IMAGE_PROFILE.format(digest=f'sha256 = "{sha256(image)}"'),
                        {"golden": image}, hostname="node2") as site,
                Vm(workdir=work, bootfile=site.bootfile, memory=1024, disk=disk, hostfwd={site.ssh_port: 22}) as vm):
        powered_on = time.time() - vm.elapsed
        await wait_for_state(site.app, vm, "rebooting", timeout=FLOW_SECONDS, exit_ok=True)
        events = site.app[STORE].events(DEFAULT_MAC)
    stream = next(e.detail for e in events if e.kind == "command" and e.detail.get("step") == "install"
                  and "zstd -dc" in e.detail["command"] and "seek=1" in e.detail["command"])
    progress = detail(events, "install-progress")
    if progress["bytes"] != image.stat().st_size:
        raise AssertionError(f"bootserver sent {progress['bytes']} of {image.stat().st_size} bytes")
    return {"stream": stream["seconds"], "install": detail(events, "installed")["seconds"],
            "rebooting": since(events, powered_on)["rebooting"]}


async def image_by_peers(agent: AgentImage, image: Path, url: str, scratch: Path) -> dict[str, float]:
    """The same image into the same kind of agent VM by the tools a user would otherwise run, over SSH to the
    agent (the server's key, the pinned host key); seconds of each command, as the host saw it run. Busybox dd
    counts records only: zstd -v says how many bytes went down the pipe, and pipefail fails any short write."""
    work = scratch / "image-peers"
    work.mkdir()
    disk = empty_disk(work / "disk.img", TARGET_BYTES)
    raw = GOLDEN_BYTES
    commands = {
        "wget": f"set -o pipefail; {{ wget -q -O- {url} | zstd -dcv 2>&3 | dd of=/dev/vda bs=4M 2>/dev/null; }} 3>&1",
        "sync": "sync",
        "download": f"wget -q -O /tmp/image.raw.zst {url}",
        "ram": "set -o pipefail; { zstd -dcv /tmp/image.raw.zst 2>&3 | dd of=/dev/vda bs=4M 2>/dev/null; } 3>&1",
        "decompress": "zstd -dc /tmp/image.raw.zst > /dev/null",
    }
    took: dict[str, float] = {}
    async with (vm_site(work, agent, BARE_PROFILE, {}) as site,
                Vm(workdir=work, bootfile=site.bootfile, memory=1024, disk=disk, hostfwd={site.ssh_port: 22}) as vm):
        store = site.app[STORE]
        deadline = time.monotonic() + FLOW_SECONDS
        while not any(e.kind == "nothing-to-provision" for e in store.events(DEFAULT_MAC)):
            if not vm.running or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not phone home{vm.report()}")
            await asyncio.sleep(0.5)
        node = store.node(DEFAULT_MAC)
        access = NodeAccess("127.0.0.1", site.ssh_port, node.host_key)
        async with session(access, site.app[PROVISIONER].keys, lambda kind, detail: None,
                           command_timeout=FLOW_SECONDS) as runner:
            for name, command in commands.items():
                started = time.monotonic()
                out = await runner.run("bench", command)
                took[name] = time.monotonic() - started
                if "dd " in command and f": {raw} bytes" not in out:  # zstd -v: the bytes it wrote out
                    raise AssertionError(f"`{command}` did not write {raw} bytes: {out.strip()}")
    return took


def host_ceilings(image: Path, golden: Path, scratch: Path) -> dict[str, float]:
    """On the host, into files: the same decompression and write, and qemu-img convert of a qcow2 of it."""
    out = scratch / "host-out.raw"
    qcow2 = scratch / "golden.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(golden), str(qcow2)], check=True)
    took = {}
    for name, command in (
        ("host-zstd", f"set -o pipefail; zstd -dc {image} | dd of={out} bs=4M status=none"),
        ("host-qemu-img", f"qemu-img convert -f qcow2 -O raw {qcow2} {out}"),
    ):
        out.unlink(missing_ok=True)
        started = time.monotonic()
        subprocess.run(["bash", "-c", command], check=True)
        took[name] = time.monotonic() - started
    out.unlink(missing_ok=True)
    return took


# -- 3. three VMs through the lab ----------------------------------------------------------------------------


def lab_to_running(agent: AgentImage, tarball: Path, scratch: Path, vms: int) -> dict:
    """`bootserver lab`'s own code path (as tests/test_vm_vde.py drives it): a namespace with a VDE switch, our
    DHCP and `bootserver serve`, `vms` SeaBIOS VMs started together; their milestones from the server's store."""
    check_tools()
    lab = Lab(scratch / "lab", namespace=f"bench-lab-{os.getpid()}")
    try:
        lab.start_network()
        lab.write_config(agent.kernel.parent, machines=vms, os_image=tarball)
        lab.start_server()
        started = time.time()
        for index in range(1, vms + 1):
            lab.start_vm(index)
        try:
            lab.wait_running(vms, LAB_SECONDS)
        except Exception:
            print(lab.status(), file=sys.stderr)
            for name in ("server.log", *(f"vm{i}.serial.log" for i in range(1, vms + 1))):
                with contextlib.suppress(OSError):
                    print(f"--- {name}:\n{(lab.dir / name).read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        machines = lab.machines()
        store = Store(lab.data_dir / "bootserver.sqlite3")
        try:
            times = {index: since(store.events(VM_MAC.format(index)), started) for index in range(1, vms + 1)}
        finally:
            store.close()
    finally:
        lab.down()
    pairs = [peer.get("reachable") for m in machines for peer in m.get("peers") or []]
    return {"times": times, "pairs": (sum(1 for p in pairs if p), vms * (vms - 1))}


# -- the section ---------------------------------------------------------------------------------------------


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return out.split("\n", 1)[0].removeprefix("QEMU emulator version ").strip()


async def measure(quick: bool) -> str:
    agent = build_test_agent_image()
    os_image = build_test_os_image()
    tarball = os_image.tarball
    firmwares = ("bios",) if quick else ("bios", "uefi")
    smoke = " (--quick: a smoke run, one SeaBIOS VM)" if quick else ""
    out = [f"## Install flows on real firmware (QEMU TCG){smoke}\n",
           f"QEMU {qemu_version()} with `-accel tcg` (KVM hangs on this nested machine), 1 GiB per VM, virtio NIC and "
           f"disk, the agent image (kernel {agent.version}) and Debian bookworm from `bootserver image os debian` "
           f"({tarball.stat().st_size / MB:.0f} MB .tar.zst). Times are seconds from QEMU's start to each event in "
           f"bootserver's event log. One VM at a time, except in the lab's part.\n"]
    with workdir("bench-install-") as scratch:
        rootfs = {fw: await rootfs_to_running(agent, tarball, fw, scratch) for fw in firmwares}
        rows = []
        for fw, r in rootfs.items():
            t = r["times"]
            rows.append([{"bios": "SeaBIOS", "uefi": "OVMF"}[fw], *(fmt(t.get(m)) for m in MILESTONES),
                         fmt(r["install"]), f"{fmt(r['stream'])} ({r['stream_mb'] / r['stream']:.1f} MB/s)"])
        out += ["### Power-on to running, rootfs source\n",
                "User-mode networking, the NIC's iPXE ROM, an empty 3 GiB disk; the profile partitions it (BIOS boot, "
                "ESP, root), unpacks the rootfs, installs GRUB for BIOS and UEFI, reboots into it; `running` is the "
                "health checks passing over SSH with the pinned host key.\n",
                table(["firmware", *(f"to `{m}` (s)" for m in MILESTONES), "install step (s)",
                       "of which the .tar.zst stream (s)"], rows), ""]
        if not quick:
            out += await image_section(agent, tarball, scratch)
            lab = await asyncio.to_thread(lab_to_running, agent, tarball, scratch, LAB_VMS)
            running = sorted(t["running"] for t in lab["times"].values())
            rows = [[f"lab{i}", fmt(t.get("phoned-home")), fmt(t.get("rebooting")), fmt(t.get("booted")),
                     fmt(t.get("running"))] for i, t in lab["times"].items()]
            out += [f"### {LAB_VMS} VMs through `bootserver lab` to all running\n",
                    f"The lab's own code path (bootserver/tools/lab.py, as `bootserver lab up --vms {LAB_VMS}` and "
                    f"tests/test_vm_vde.py run it): a network namespace with a VDE switch, bootserver as the full DHCP "
                    f"server, {LAB_VMS} SeaBIOS VMs started together on 2 cores, each installing Debian and the demo "
                    f"peer service. First `running` {running[0]:.1f} s, last (all running) {running[-1]:.1f} s; peer "
                    f"pairs reachable {lab['pairs'][0]}/{lab['pairs'][1]}.\n",
                    table(["VM", "to `phoned-home` (s)", "to `rebooting` (s)", "to `booted` (s)", "to `running` (s)"],
                          rows), ""]
    return "\n".join(out) + "\n"


async def image_section(agent: AgentImage, tarball: Path, scratch: Path) -> list[str]:
    golden_dir = scratch / "golden"
    golden_dir.mkdir()
    golden = await install_golden(agent, tarball, golden_dir, GOLDEN_BYTES)
    served = scratch / "served"
    served.mkdir()
    image = served / "golden.raw.zst"
    subprocess.run(["zstd", "-q", "-T0", str(golden), "-o", str(image)], check=True)
    wire = image.stat().st_size
    ours = await image_by_bootserver(agent, image, scratch)
    with nginx(served, scratch) as (port, _):
        peers = await image_by_peers(agent, image, f"http://10.0.2.2:{port}/{image.name}", scratch)
    host = host_ceilings(image, golden, scratch)

    def row(what: str, where: str, seconds: float, compressed: bool = True) -> list[str]:
        return [what, where, f"{seconds:.1f}", f"{GOLDEN_BYTES / MB / seconds:.1f}",
                f"{wire / MB / seconds:.1f}" if compressed else "-"]

    rows = [
        row("bootserver's install step: SSH stream -> `zstd -dc` -> `dd` (the streaming command)", "agent VM",
            ours["stream"]),
        row("`wget -O- URL \\| zstd -dc \\| dd of=/dev/vda bs=4M` (nginx on the host)", "agent VM", peers["wget"]),
        row("`zstd -dc /tmp/image \\| dd of=/dev/vda bs=4M`, the image already in the VM's RAM", "agent VM",
            peers["ram"]),
        row("`zstd -dc /tmp/image > /dev/null` (decompression alone)", "agent VM", peers["decompress"]),
        row("`zstd -dc image \\| dd of=FILE bs=4M`", "host", host["host-zstd"]),
        row("`qemu-img convert -f qcow2 -O raw` of a qcow2 of the same disk", "host", host["host-qemu-img"], False),
    ]
    return ["### Image streaming onto the disk\n",
            f"One whole-disk image: a {GOLDEN_BYTES >> 30} GiB disk with Debian installed by the rootfs path (as "
            f"tests/test_vm_image.py makes it), `zstd -3` compressed to {wire / MB:.0f} MB (raw.zst). Each writer "
            f"puts the {GOLDEN_BYTES / MB:.0f} MB onto an empty 3 GiB virtio disk of a SeaBIOS VM booted into the "
            "agent (1 GiB RAM, the agent's own busybox wget, zstd and dd); bootserver's in one VM, the peers' "
            "one after another in a second VM booted the same way with nothing to provision (run over SSH from the "
            "host), both over the same user-mode network from this host. No row includes a final `sync`. disk MB/s = "
            "raw bytes written / seconds; wire MB/s = compressed bytes / seconds.\n",
            table(["writer", "where", "seconds", "disk MB/s", "wire MB/s"], rows), "",
            f"- bootserver's whole install step (stream, SHA-256 verify, first MiB written last, grow to 3 GiB, "
            f"personalize): {ours['install']:.1f} s; power-on to `rebooting` {ours['rebooting']:.1f} s.",
            f"- In the peer VM: the download alone into RAM (`wget -O /tmp/image`) {peers['download']:.1f} s "
            f"({wire / MB / peers['download']:.1f} MB/s); `sync` after the wget pipeline {peers['sync']:.1f} s.",
            "- `qemu-img` is not in the agent image (qemu-utils and its libraries are not small, and a qcow2 cannot "
            "be read from a pipe: bootserver converts a qcow2 on the server once, by digest): measured on the host, "
            "where it writes only the qcow2's allocated clusters (a sparse file), so its rate is not comparable "
            "with the rows that write every byte. The host rows write into the page cache of a file.",
            ""]


def main() -> None:
    args = parse_args(__doc__)
    # parse_args pins a section's driver (and what it starts) to the clients' CPU; here what it starts is the
    # VMs under test, and the lab's three on one core would measure that core, not the flow (2026-12-05: 288 s
    # to all running pinned, 144 s unpinned).
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    write_section("install", asyncio.run(measure(args.quick)))


if __name__ == "__main__":
    main()
