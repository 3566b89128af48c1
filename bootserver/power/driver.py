"""What a BMC driver does, the same for IPMI and Redfish. Drivers block (pyghmi and sushy are synchronous):
PowerControl runs them in threads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import BootserverError

# What an operator may ask of a machine's power: on, off (hard), soft-off (ACPI shutdown), cycle (off and on
# again when on, on when off: the machine boots either way).
POWER_ACTIONS = ("on", "off", "soft-off", "cycle")
# Every BMC call, as its events name it.
BMC_ACTIONS = ("status", *POWER_ACTIONS, "boot-override", "inventory")


class BmcError(BootserverError):
    """A BMC call failed: unreachable, refused (credentials), timed out, or the BMC answered an error."""


@dataclass(frozen=True)
class BootOverride:
    """The next boot's device as the BMC reports it after we set it: what the read-back compares."""

    device: str  # "network", "disk", "default" (no override in force), or the BMC's own word
    uefi: bool | None = None  # None: the BMC does not say
    persistent: bool | None = None  # None: the BMC does not say

    def to_json(self) -> dict[str, object]:
        return {"device": self.device, "uefi": self.uefi, "persistent": self.persistent}


class Driver(Protocol):
    """One BMC. Every method may raise BmcError, saying what to check."""

    def power_state(self) -> str:
        """"on" or "off"."""
        ...

    def set_power(self, action: str) -> None:
        """One of POWER_ACTIONS."""
        ...

    def set_network_boot(self, uefi: bool) -> None:
        """The next boot (once) from the network, in UEFI or legacy (BIOS) mode."""
        ...

    def boot_override(self) -> BootOverride:
        """The next boot as the BMC has it now."""
        ...

    def inventory(self) -> dict[str, str]:
        """Manufacturer, model, serial, BIOS version, as far as the BMC tells them ({} when it tells none)."""
        ...
