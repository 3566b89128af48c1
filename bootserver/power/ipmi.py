"""IPMI over LAN (lanplus), with pyghmi.

pyghmi keeps its sessions in a process-wide table, and 1.6.19 hangs when a second Command is made for a BMC whose
session is still logged in, and fails on one made after a logout (both measured against ipmi_sim). So the
drivers are process-wide too, one a BMC and its credentials (`IpmiDriver.of`): the only state of this package
outside the app, and the mirror of pyghmi's own. A driver makes its Command again only after a call failed.
"""

from __future__ import annotations

import threading
from typing import Any

from pyghmi import exceptions as pyghmi_errors
from pyghmi.ipmi import command
from pyghmi.ipmi.private import session

from .driver import BmcError, BootOverride

DEFAULT_PORT = 623
# Our actions -> pyghmi's set_power states. "boot": on when off, a hard reset when on; either way it boots.
POWER_STATES = {"on": "on", "off": "off", "soft-off": "shutdown", "cycle": "boot"}


class IpmiDriver:
    _shared: dict[tuple[str, int, str, str], IpmiDriver] = {}  # see the module's docstring
    _shared_lock = threading.Lock()

    @classmethod
    def of(cls, address: str, port: int | None, username: str, password: str) -> IpmiDriver:
        """The process's driver of this BMC with these credentials, made on first use."""
        key = (address, port or DEFAULT_PORT, username, password)
        with cls._shared_lock:
            driver = cls._shared.get(key)
            if driver is None:
                driver = cls._shared[key] = cls(address, port, username, password)
            return driver

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
        if session.iothread is not None and not session.iothread.is_alive():
            # pyghmi watches its sockets with select(): one numbered 1024 or above kills its I/O thread, and every
            # call after that would wait for its timeout. Say so instead.
            raise BmcError(f"{self._where}: pyghmi's I/O thread has stopped (its socket was opened above file "
                           f"descriptor 1023, which select() cannot watch): restart bootserver")
        with self._lock:
            logging_in = self._command is None
            try:
                if self._command is None:
                    self._command = command.Command(keepalive=False, **self._args)
                return getattr(self._command, method)(*args, **kwargs)
            except pyghmi_errors.IpmiException as exc:
                if logging_in:
                    self._forget_failed_login()
                self._drop_if_broken()
                raise BmcError(f"{self._where}: {_explain(str(exc))}") from None
            except (OSError, pyghmi_errors.PyghmiException) as exc:
                self._drop_if_broken()
                raise BmcError(f"{self._where}: {exc}") from None

    def _drop_if_broken(self) -> None:
        """Log in again next time only if the session broke: an error answer (a command the BMC refused) leaves it
        logged in, and a second Command on a logged-in session hangs (the module's docstring)."""
        if self._command is not None and getattr(self._command.ipmi_session, "broken", True):
            self._command = None


    def _forget_failed_login(self) -> None:
        """pyghmi 1.6.19 keeps a session whose login the BMC refused in its table of sessions being set up; the next
        Command for the same BMC and credentials waits on that one (8 s) and fails "Session no longer connected"
        instead of saying the password is wrong. Drop it, so that each try asks the BMC again."""
        pending = getattr(session.Session, "initting_sessions", None)
        if isinstance(pending, dict):
            a = self._args
            pending.pop((a["bmc"], a["userid"], a["password"], a["port"], None), None)


def _explain(error: str) -> str:
    if "password" in error.lower() or "unauthorized" in error.lower():
        return f"{error}: check username and password under [machines.\"MAC\".bmc]"
    if "timeout" in error.lower() or "unreachable" in error.lower():
        return f"{error}: is the BMC's address right, and reachable from this server (UDP 623)?"
    return error
