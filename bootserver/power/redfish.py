"""Redfish, with sushy: power, one-time boot and the system's inventory.

`address` is a host (https://HOST[:port]/redfish/v1) or a URL (http:// for a lab's emulator). A BMC that manages
several systems needs [machines."MAC".bmc] system, its id; with one, that one is used.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import sushy
from sushy import exceptions as sushy_errors

from .driver import BmcError, BootOverride

ON_STATES = (sushy.POWER_STATE_ON, sushy.POWER_STATE_POWERING_OFF)
NETWORK_TARGETS = (sushy.BOOT_SOURCE_TARGET_PXE, sushy.BOOT_SOURCE_TARGET_UEFI_HTTP)


class RedfishDriver:
    def __init__(self, address: str, port: int | None, username: str, password: str, *, verify: bool | Path,
                 system: str | None, timeout: float) -> None:
        url = address if "://" in address else f"https://{address}{f':{port}' if port else ''}"
        self._url = url.rstrip("/")
        self._where = f"Redfish BMC {self._url}"
        self._args: dict[str, Any] = {"username": username, "password": password,
                                      "verify": str(verify) if isinstance(verify, Path) else verify,
                                      "read_timeout": timeout, "connect_timeout": timeout,
                                      "server_side_retries": 0}
        self._system_id = system
        self._root: sushy.Sushy | None = None
        self._lock = threading.Lock()

    def power_state(self) -> str:
        return self._call(lambda system: "on" if system.power_state in ON_STATES else "off")

    def set_power(self, action: str) -> None:
        def act(system: Any) -> None:
            if action == "cycle":
                reset = sushy.RESET_FORCE_RESTART if system.power_state in ON_STATES else sushy.RESET_ON
            else:
                reset = {"on": sushy.RESET_ON, "off": sushy.RESET_FORCE_OFF,
                         "soft-off": sushy.RESET_GRACEFUL_SHUTDOWN}[action]
            system.reset_system(reset)
        self._call(act)

    def set_network_boot(self, uefi: bool) -> None:
        mode = sushy.BOOT_SOURCE_MODE_UEFI if uefi else sushy.BOOT_SOURCE_MODE_BIOS
        self._call(lambda system: system.set_system_boot_options(
            sushy.BOOT_SOURCE_TARGET_PXE, enabled=sushy.BOOT_SOURCE_ENABLED_ONCE, mode=mode))

    def boot_override(self) -> BootOverride:
        def read(system: Any) -> BootOverride:
            boot = system.boot
            if boot.enabled == sushy.BOOT_SOURCE_ENABLED_DISABLED or boot.target is None:
                return BootOverride("default")
            device = "network" if boot.target in NETWORK_TARGETS else str(boot.target.value)
            uefi = None if boot.mode is None else boot.mode == sushy.BOOT_SOURCE_MODE_UEFI
            persistent = None if boot.enabled is None else boot.enabled == sushy.BOOT_SOURCE_ENABLED_CONTINUOUS
            return BootOverride(device, uefi, persistent)
        return self._call(read)

    def inventory(self) -> dict[str, str]:
        def read(system: Any) -> dict[str, str]:
            found = {"manufacturer": system.manufacturer, "model": system.model, "serial": system.serial_number,
                     "bios_version": system.bios_version}
            return {key: str(value) for key, value in found.items() if value}
        return self._call(read)

    def _call(self, action: Any) -> Any:
        with self._lock:
            try:
                return action(self._system())
            except sushy_errors.AccessError as exc:
                self._root = None
                raise BmcError(f"{self._where}: refused ({exc.status_code}): check username and password under "
                               f"[machines.\"MAC\".bmc]") from None
            except sushy_errors.ConnectionError as exc:
                self._root = None
                raise BmcError(f"{self._where}: cannot connect ({_short(exc)}): is the address right and "
                               f"reachable from this server?") from None
            except (sushy_errors.SushyError, OSError, ValueError) as exc:
                self._root = None
                raise BmcError(f"{self._where}: {_short(exc)}") from None

    def _system(self) -> Any:
        """The machine's system resource, read fresh (its power state and boot settings change)."""
        if self._root is None:
            self._root = sushy.Sushy(f"{self._url}/redfish/v1", **self._args)
        if self._system_id is None:
            members = self._root.get_system_collection().members_identities
            if len(members) != 1:
                raise BmcError(f"{self._where} manages {len(members)} systems ({', '.join(members)}): name the "
                               f"machine's under [machines.\"MAC\".bmc] system")
            self._system_id = members[0]
        elif not self._system_id.startswith("/"):
            self._system_id = f"/redfish/v1/Systems/{self._system_id}"
        return self._root.get_system(self._system_id)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
