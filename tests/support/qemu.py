"""Start and stop a QEMU virtual machine for tests that boot something for real.

    async with Vm(workdir=tmp_path, kernel=k, initrd=i, append="console=ttyS0") as vm:
        await vm.wait_for_serial("bootserver agent: ready", timeout=90)

    async with Vm(workdir=tmp_path, firmware="uefi", bootfile="http://10.0.2.2:8080/boot.ipxe"):
        ...  # the NIC's iPXE ROM netboots: DHCP from QEMU's user-mode network, then the bootfile

Networking is QEMU's user mode ("slirp"): the guest gets 10.0.2.15 by DHCP and reaches the host's
127.0.0.1:PORT as 10.0.2.2:PORT, so a test server bound to 127.0.0.1 serves the guest. Nothing
leaves the machine unless the guest itself addresses something else.

`hostfwd={host_port: guest_port}` forwards 127.0.0.1:host_port to the guest's port (e.g. its SSH
server: `port = free_port(); Vm(..., hostfwd={port: 22})`); `disk=path` attaches a raw image file
as a virtio disk (/dev/vda in the guest).

Always TCG (`-accel tcg`): KVM hangs on the machines this project runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from bootserver.tools.lab import OVMF_CODE, uefi_flash

QEMU = "qemu-system-x86_64"
DEFAULT_MAC = "52:54:00:12:34:56"


def _die_with_parent() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Vm:
    """One QEMU VM: direct kernel boot (kernel/initrd/append) or netboot (bootfile/tftp_dir).

    firmware: "bios" (SeaBIOS) or "uefi" (OVMF).
    netboot: boot from the NIC's option ROM (iPXE); implied by bootfile or tftp_dir. The slirp
        DHCP server hands out `bootfile` (a TFTP file name under `tftp_dir`, or an http:// URL
        iPXE fetches itself).
    nic: the QEMU NIC model, e.g. "virtio-net-pci" or "e1000".
    disk: a raw disk image file, attached as a virtio disk (if=virtio: /dev/vda in the guest).
    hostfwd: {host port: guest port}, TCP, the host side bound to 127.0.0.1 only.
    reboot: let a guest's reboot restart the VM (an install that then boots its own disk); by default QEMU exits.
    The serial console goes to `workdir/serial-N.log`; `serial_log` reads it.
    """

    _count = 0

    def __init__(
        self,
        *,
        workdir: Path,
        firmware: str = "bios",
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str | None = None,
        netboot: bool = False,
        bootfile: str | None = None,
        tftp_dir: Path | None = None,
        mac: str = DEFAULT_MAC,
        nic: str = "virtio-net-pci",
        memory: int = 256,
        disk: Path | None = None,
        hostfwd: dict[int, int] | None = None,
        extra_args: Sequence[str] = (),
        qemu: str = QEMU,
        uuid: str | None = None,
        reboot: bool = False,
    ) -> None:
        if firmware not in ("bios", "uefi"):
            raise ValueError(f"firmware must be 'bios' or 'uefi', not {firmware!r}")
        netboot = netboot or bootfile is not None or tftp_dir is not None
        if netboot and kernel is not None:
            raise ValueError("give either kernel (direct boot) or bootfile/tftp_dir (netboot), not both")
        if not netboot and kernel is None:
            raise ValueError("nothing to boot: give kernel=... or bootfile=.../netboot=True")
        if (initrd is not None or append is not None) and kernel is None:
            raise ValueError("initrd and append need kernel")
        self.workdir = Path(workdir)
        self.firmware = firmware
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.netboot, self.bootfile, self.tftp_dir = netboot, bootfile, tftp_dir
        self.mac, self.nic, self.memory = mac, nic, memory
        self.disk = Path(disk) if disk is not None else None
        self.hostfwd = dict(hostfwd or {})
        self.extra_args = list(extra_args)
        self.qemu = qemu
        self.uuid = uuid  # the SMBIOS system UUID its firmware and OS report
        self.reboot = reboot  # a guest's reboot restarts it (its firmware boots again); else QEMU exits
        Vm._count += 1
        self.serial_path = self.workdir / f"serial-{Vm._count}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.started_at: float | None = None

    def command(self) -> list[str]:
        netdev = "user,id=n0"
        if self.tftp_dir is not None:
            netdev += f",tftp={self.tftp_dir}"
        if self.bootfile is not None:
            netdev += f",bootfile={self.bootfile}"
        for host_port, guest_port in self.hostfwd.items():
            netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
        device = f"{self.nic},netdev=n0,mac={self.mac}"
        if self.netboot:
            # bootindex, not `-boot n`: SeaBIOS and OVMF both read it (OVMF ignores -boot order)
            device += ",bootindex=1"
        cmd = [
            self.qemu,
            "-accel", "tcg",
            "-m", str(self.memory),
            # not -nographic: that puts the monitor on stdio and the terminal in raw mode
            "-display", "none",
            "-monitor", "none",
            *([] if self.reboot else ["-no-reboot"]),
            "-serial", f"file:{self.serial_path}",
            "-netdev", netdev,
            "-device", device,
        ]  # fmt: skip
        if self.uuid is not None:
            cmd += ["-uuid", self.uuid]
        if self.disk is not None:
            # Second in the boot order, after the NIC: what a netbooted machine's firmware is set to, so that
            # iPXE's `exit` (a machine told to boot its disk) falls through to the disk on UEFI.
            cmd += ["-drive", f"file={self.disk},if=none,id=disk0,format=raw",
                    "-device", "virtio-blk-pci,drive=disk0,bootindex=2"]
        if self.firmware == "uefi":
            cmd += uefi_flash(self.workdir / f"ovmf-vars-{self.serial_path.stem.removeprefix('serial-')}.fd",
                              netboot="pxe" if "romfile=" in self.nic else "ipxe")
        if self.kernel is not None:
            cmd += ["-kernel", str(self.kernel)]
            if self.initrd is not None:
                cmd += ["-initrd", str(self.initrd)]
            if self.append is not None:
                cmd += ["-append", self.append]
        return cmd + self.extra_args

    async def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("this Vm was started already")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_path.write_bytes(b"")
        self._stderr = open(self.workdir / f"{self.serial_path.stem}.qemu-stderr", "wb")  # noqa: SIM115
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()

    async def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after 5 s); safe to call more than once."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None

    async def __aenter__(self) -> Vm:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def elapsed(self) -> float:
        """Seconds since start()."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    @property
    def serial_log(self) -> str:
        try:
            return self.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def qemu_stderr(self) -> str:
        path = self.workdir / f"{self.serial_path.stem}.qemu-stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self) -> str:
        """What to attach to a failed assertion: the command, QEMU's own output, the serial log."""
        status = "running" if self.running else f"exited {self.process.returncode if self.process else '-'}"
        return (
            f"\n--- qemu ({status}, {self.elapsed:.1f} s): {' '.join(self.command())}\n"
            f"--- qemu stderr:\n{self.qemu_stderr}\n--- serial log:\n{self.serial_log}"
        )

    async def wait_for_serial(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        """Wait until the serial log matches the regular expression; fail early if QEMU exits."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.serial_log)
            if match:
                return match
            if not self.running:
                raise AssertionError(f"QEMU exited before {pattern!r} appeared{self.report()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} did not appear within {timeout} s{self.report()}")
            await asyncio.sleep(0.2)

    async def wait_for_exit(self, timeout: float = 30.0) -> int:
        """Wait until QEMU exits (with -no-reboot, a guest's reboot ends it); its exit status."""
        if self.process is None:
            raise RuntimeError("this Vm was never started")
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"QEMU still running after {timeout} s{self.report()}") from None

    async def wait_until(self, event: asyncio.Event, timeout: float = 90.0, what: str = "the event") -> None:
        """Wait for event (set by a test server); fail early, with the logs, if QEMU exits."""
        deadline = time.monotonic() + timeout
        while not event.is_set():
            if not self.running:
                raise AssertionError(f"QEMU exited before {what}{self.report()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s{self.report()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 0.2)


def qemu_available() -> bool:
    from shutil import which

    return which(QEMU) is not None


__all__ = ["DEFAULT_MAC", "OVMF_CODE", "Vm", "qemu_available"]
