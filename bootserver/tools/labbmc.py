"""A real BMC for a lab VM: OpenIPMI's `ipmi_sim` (Debian package openipmi) answering IPMI over LAN.

ipmi_sim runs the VM itself: its `startcmd` (a script that execs QEMU) is how it powers the VM on, and QEMU's
`ipmi-bmc-extern` device, connected to ipmi_sim's "VM" serial port, is how it powers it off and resets it
(measured: off ends QEMU within 0.1 s, on starts its firmware within 0.1 s). ipmi_sim refuses a boot override
when it runs a startcmd (IPMI "invalid data field"); with a `chassis_control` program it accepts one, but never
marks it valid, so reading it back shows no override: the case a read-back exists for.

Beware: ipmi_sim accepts cipher suite 0 (no authentication) whatever the password: it listens only inside the
lab's network namespace, or on loopback in the tests.

    bmc = SimBmc(dir, "10.100.0.201", 623, vm_port=9101)
    command = bmc.write(startcmd=script)       # lan.conf, bmc.emu; the ipmi_sim command to run
    qemu_args = bmc.qemu_args()                # the VM's side of the link
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

IPMI_SIM = "ipmi_sim"
USERNAME = "admin"
# The BMC's management controller: IPMB address 0x20, device id 0, IPMI 2.0 with chassis support.
EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02
mc_enable 0x20
"""


@dataclass(frozen=True)
class SimBmc:
    dir: Path  # its config, state and log
    address: str  # where it answers IPMI over LAN (UDP)
    port: int
    vm_port: int  # where it listens (127.0.0.1, TCP) for its VM's ipmi-bmc-extern chardev
    username: str = USERNAME
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))

    def write(self, *, startcmd: Path | None = None, chassis_control: Path | None = None,
              start_now: bool = False) -> list[str]:
        """Write lan.conf and bmc.emu into `dir`; the command that runs ipmi_sim on them (in the foreground).

        `startcmd`: a script that execs the VM (powered on now when `start_now`); `chassis_control`: a program
        that keeps the chassis' power and boot device instead (OpenIPMI's `DEVICE get|set PARM [VALUE]`)."""
        state = self.dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        lines = [
            'name "bootserver-lab"',
            "set_working_mc 0x20",
            "  startlan 1",
            f"    addr {self.address} {self.port}",
            "    priv_limit admin",
            "    allowed_auths_callback md5",
            "    allowed_auths_user md5",
            "    allowed_auths_operator md5",
            "    allowed_auths_admin md5",
            f"    guid {secrets.token_hex(16)}",
            "  endlan",
            f"  serial 15 127.0.0.1 {self.vm_port} codec VM",
            f'  user 2 true "{self.username}" "{self.password}" admin 10 md5',
        ]
        if startcmd is not None:
            lines += [f'  startcmd "{startcmd}"', f"  startnow {'true' if start_now else 'false'}",
                      "  poweroff_wait 5", "  kill_wait 5"]
        if chassis_control is not None:
            lines.append(f'  chassis_control "{chassis_control} 0x20"')
        (self.dir / "lan.conf").write_text("\n".join(lines) + "\n")
        (self.dir / "bmc.emu").write_text(EMU)
        # -n: no console on stdin (without a terminal it would abort); -s: its state directory.
        return [IPMI_SIM, "-c", str(self.dir / "lan.conf"), "-f", str(self.dir / "bmc.emu"), "-s", str(state), "-n"]

    def qemu_args(self) -> list[str]:
        """QEMU's arguments for the VM's BMC link: a KCS interface the guest sees, its BMC this ipmi_sim."""
        return ["-chardev", f"socket,id=ipmi0,host=127.0.0.1,port={self.vm_port},reconnect=10",
                "-device", "ipmi-bmc-extern,id=bmc0,chardev=ipmi0", "-device", "isa-ipmi-kcs,bmc=bmc0"]

    def status_json(self) -> dict[str, object]:
        """As `bootserver lab status --json` shows it, and as [machines."MAC".bmc] takes it."""
        return {"driver": "ipmi", "address": self.address, "port": self.port, "username": self.username,
                "password": self.password}
