"""IPMI over LAN (lanplus), with pyghmi.

pyghmi keeps its sessions in a process-wide table and hangs when a second Command is made for a BMC whose
session is still logged in (1.6.19, measured against ipmi_sim): one IpmiDriver, and so one Command, per BMC,
kept by PowerControl and made again only after a call failed.
"""

from __future__ import annotations

import threading
from typing import Any

from pyghmi import exceptions as pyghmi_errors
from pyghmi.ipmi import command

from .driver import BmcError, BootOverride

DEFAULT_PORT = 623
# Our actions -> pyghmi's set_power states. "boot": on when off, a hard reset when on; either way it boots.
POWER_STATES = {"on": "on", "off": "off", "soft-off": "shutdown", "cycle": "boot"}


class IpmiDriver:
    def __init__(self, address: str, port: int | None, username: str, password: str) -> None:
        self._where = f"IPMI BMC {address}:{port or DEFAULT_PORT}"
        self._args = {"bmc": address, "port": port or DEFAULT_PORT, "userid": username, "password": password}
        self._command: command.Command | None = None
        self._lock = threading.Lock()  # one call at a time on a session: pyghmi's Command is not reentrant

    def power_state(self) -> str:
        return str(self._call("get_power")["powerstate"])

    def set_power(self, action: str) -> None:
        # wait=False: pyghmi would poll the state itself for up to 300 s; our caller reads it back when it wants.
        self._call("set_power", POWER_STATES[action], wait=False)

    def set_network_boot(self, uefi: bool) -> None:
        self._call("set_bootdev", "network", persist=False, uefiboot=uefi)

    def boot_override(self) -> BootOverride:
        # pyghmi says "default" when the BMC's boot flags are not marked valid: no override in force.
        answer = self._call("get_bootdev")
        return BootOverride(str(answer.get("bootdev")), answer.get("uefimode"), answer.get("persistent"))

    def inventory(self) -> dict[str, str]:
        return {}  # IPMI's FRU data is free text that differs by vendor: only Redfish's inventory is recorded

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            try:
                if self._command is None:
                    self._command = command.Command(keepalive=False, **self._args)
                return getattr(self._command, method)(*args, **kwargs)
            except pyghmi_errors.IpmiException as exc:
                self._command = None  # a broken session: log in again next time
                raise BmcError(f"{self._where}: {_explain(str(exc))}") from None
            except (OSError, pyghmi_errors.PyghmiException) as exc:
                self._command = None
                raise BmcError(f"{self._where}: {exc}") from None


def _explain(error: str) -> str:
    if "password" in error.lower() or "unauthorized" in error.lower():
        return f"{error}: check username and password under [machines.\"MAC\".bmc]"
    if "timeout" in error.lower() or "unreachable" in error.lower():
        return f"{error}: is the BMC's address right, and reachable from this server (UDP 623)?"
    return error
