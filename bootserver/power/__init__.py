"""Power control: a machine's BMC over IPMI (pyghmi) or Redfish (sushy), behind one small interface.

    driver.py    what every driver does (Driver), what it reads back (BootOverride), its errors (BmcError)
    ipmi.py      IPMI over LAN with pyghmi
    redfish.py   Redfish with sushy
    control.py   PowerControl: runs driver calls in threads (both libraries block) with a timeout each and a
                 bounded number at once, records every call as an event, remembers the last power state seen

The core (booter.py) decides when to call; the CLI, the API and the pages only ask it. No protocol code of ours.
"""

from .control import PowerControl, PowerState
from .driver import BMC_ACTIONS, POWER_ACTIONS, BmcError, BootOverride

__all__ = ["BMC_ACTIONS", "POWER_ACTIONS", "BmcError", "BootOverride", "PowerControl", "PowerState"]
