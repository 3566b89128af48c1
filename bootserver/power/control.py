"""PowerControl: every BMC call of the server, in a thread, with a timeout, a bounded number at once, as an event.

pyghmi and sushy block, and an unreachable BMC keeps a call waiting for many seconds: each call runs in a thread
of its own, the event loop waits for it at most [server] bmc_timeout_seconds and then records it as failed, and at
most [server] bmc_concurrency calls are waited for at once. A call that timed out may still hold its thread until
the library gives up (or for good: pyghmi can hang): the threads are daemons, so that neither the server nor a CLI
command waits for them to exit, and at most STUCK_ALLOWANCE times bmc_concurrency may be alive at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..config import Bmc
from ..lifecycle import POWER_KINDS, EventKind
from ..provision.pki import decrypt_secret, read_secret_file
from ..siblings import Siblings
from ..store import Store
from .driver import BmcError, BootOverride, Driver
from .ipmi import IpmiDriver
from .redfish import RedfishDriver

log = logging.getLogger(__name__)

T = TypeVar("T")
STUCK_ALLOWANCE = 3  # worker threads per allowed call: room for calls that timed out but still wait in a library


@dataclass(frozen=True)
class PowerState:
    """What the server last learnt of a machine's power: "on", "off" or "unknown" (the last call failed)."""

    state: str
    checked: float  # time.time() of the call
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "checked": self.checked, "error": self.error}


class BootOverrideLost(BmcError):
    """The BMC accepted the one-time network boot, but reading it back shows it did not keep it."""


class PowerControl:
    def __init__(self, store: Store, bmc_of: Callable[[str], Bmc | None], secret_key: Path, *,
                 timeout: float, concurrency: int, siblings: Siblings | None = None) -> None:
        """`bmc_of(mac)`: the machine's BMC under the config in force (None: it has none); `secret_key`: the file
        its encrypted password was encrypted with ([server] secret_key_file); `siblings`: the server's other
        processes, whose power states (the owner's poll) count beside this one's."""
        self._store = store
        self._siblings = siblings or Siblings()
        self._bmc_of = bmc_of
        self._secret_key = secret_key
        self.timeout = timeout
        self.concurrency = concurrency
        self._threads = 0  # BMC call threads alive, stuck ones among them
        self._threads_lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None  # made in the running loop (the CLI runs one per command)
        self._drivers: dict[Bmc, Driver] = {}
        self._states: dict[str, PowerState] = {}

    def close(self) -> None:
        """Nothing to wait for: threads still stuck in a library call are daemons."""

    # -- what the pages, the API and /metrics read ---------------------------------------------------------

    def has_bmc(self, mac: str) -> bool:
        return self._bmc_of(mac) is not None

    def known_state(self, mac: str) -> PowerState | None:
        """The last power state seen (by a call or the poll, of any of the server's processes); None: not asked
        since the server started."""
        newest = self._states.get(mac)
        for other in self._siblings.others():
            theirs = _published(other, mac)
            if theirs is not None and (newest is None or newest.checked < theirs.checked):
                newest = theirs
        return newest

    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self._all_states().values():
            counts[state.state] = counts.get(state.state, 0) + 1
        return counts

    def figures(self) -> dict[str, dict[str, Any]]:
        """This process's power states, for the others (Siblings)."""
        return {mac: state.to_json() for mac, state in self._states.items()}

    def _all_states(self) -> dict[str, PowerState]:
        """Each machine's newest state, of this process's and those the others published."""
        states = dict(self._states)
        for other in self._siblings.others():
            for mac in other.get("power", {}):
                theirs = _published(other, mac)
                if theirs is not None and (mac not in states or states[mac].checked < theirs.checked):
                    states[mac] = theirs
        return states

    # -- calls ------------------------------------------------------------------------------------------

    async def status(self, mac: str, *, only_changes: bool = False) -> str:
        """"on" or "off". `only_changes` (the poll): recorded as an event only when it differs from the last."""
        previous = self._states.get(mac)
        state = await self._call(mac, "status", lambda driver: driver.power_state(), record=not only_changes)
        if only_changes and (previous is None or previous.state != state or previous.error):
            self._record_call(mac, "status", {"result": state, "was": previous.state if previous else None})
        return state

    async def poll(self, macs: Iterable[str]) -> None:
        """Read the power state of each of `macs`, at most `concurrency` at once; failures are events."""
        async def one(mac: str) -> None:
            with contextlib.suppress(BmcError):  # recorded when it started failing, logged by _call
                await self.status(mac, only_changes=True)
        await asyncio.gather(*(one(mac) for mac in macs))

    async def power(self, mac: str, action: str) -> None:
        """One of POWER_ACTIONS."""
        await self._call(mac, action, lambda driver: driver.set_power(action))
        after = {"on": "on", "cycle": "on", "off": "off"}.get(action)  # soft-off: the OS decides when
        if after:
            self._states[mac] = PowerState(after, time.time())

    async def network_boot_once(self, mac: str, uefi: bool) -> BootOverride:
        """The next boot from the network, once, then read back. BootOverrideLost (recorded) when the BMC did not
        keep it: a next boot that is not the network, or in the other firmware mode."""
        def set_and_read(driver: Driver) -> BootOverride:
            driver.set_network_boot(uefi)
            return driver.boot_override()
        mode = "uefi" if uefi else "legacy"
        started = time.monotonic()
        read = await self._call(mac, "boot-override", set_and_read, record=False)
        detail = {"action": "boot-override", "asked": {"device": "network", "mode": mode, "once": True},
                  "read_back": read.to_json(), "seconds": round(time.monotonic() - started, 3),
                  "bmc": _name(self._bmc_of(mac))}
        problem = _not_kept(read, uefi)
        if problem:
            self._store.record(mac, EventKind.BOOT_OVERRIDE_LOST, {**detail, "error": problem})
            raise BootOverrideLost(f"{mac}: the BMC accepted the one-time network boot but did not keep it: {problem}")
        if read.persistent:
            detail["note"] = "the BMC made it persistent: the machine boots from the network until it is changed"
        self._store.record(mac, EventKind.BOOT_OVERRIDE_SET, detail)
        return read

    async def inventory(self, mac: str) -> dict[str, str]:
        """What the BMC says of the machine (Redfish: manufacturer, model, serial, BIOS version), into its facts."""
        found = await self._call(mac, "inventory", lambda driver: driver.inventory(), record=False)
        if found:
            self._store.record(mac, EventKind.BMC_INVENTORY, {"action": "inventory", "result": found},
                               facts={f"bmc_{key}": value for key, value in found.items()})
        return found

    async def _call(self, mac: str, action: str, work: Callable[[Driver], T], *, record: bool = True) -> T:
        """`work` on the machine's driver in a worker thread; an event either way (failures always)."""
        bmc = self._bmc_of(mac)
        if bmc is None:
            raise BmcError(f"{mac} has no BMC: add [machines.\"{mac}\".bmc] to the config")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        started = time.monotonic()
        try:
            async with self._slots:
                driver = self._driver(mac, bmc)
                result = await asyncio.wait_for(self._in_thread(work, driver), self.timeout)
        except TimeoutError:
            self._drivers.pop(bmc, None)  # its session may be wedged: the next call starts afresh
            self._failed(mac, bmc, action, started, f"{_name(bmc)}: no answer within {self.timeout:g} s "
                         f"([server] bmc_timeout_seconds): is it reachable from this server?")
        except BmcError as exc:
            self._failed(mac, bmc, action, started, str(exc))
        seconds = round(time.monotonic() - started, 3)
        if action == "status":
            self._states[mac] = PowerState(str(result), time.time())
        if record:
            self._record_call(mac, action, {"result": result if action == "status" else "done", "seconds": seconds,
                                       "bmc": _name(bmc)})
        return result

    def _in_thread(self, work: Callable[[Driver], T], driver: Driver) -> asyncio.Future[T]:
        """`work(driver)` in a daemon thread of its own; its outcome as a future of the running loop."""
        with self._threads_lock:
            if self._threads >= self.concurrency * STUCK_ALLOWANCE:
                raise BmcError(f"{self._threads} BMC calls are still stuck in their libraries after timing out: "
                               f"try again later (check the BMCs that time out)")
            self._threads += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(outcome: Callable[[], None]) -> None:
            if not future.done():  # not cancelled by the timeout meanwhile
                outcome()

        def deliver(outcome: Callable[[], None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more (a CLI finished)
                loop.call_soon_threadsafe(settle, outcome)

        def run() -> None:
            try:
                result = work(driver)
            except BaseException as exc:  # handed to the waiting coroutine, which re-raises it
                error = exc
                deliver(lambda: future.set_exception(error))
            else:
                deliver(lambda: future.set_result(result))
            finally:
                with self._threads_lock:
                    self._threads -= 1

        threading.Thread(target=run, name="bmc-call", daemon=True).start()
        return future

    def _failed(self, mac: str, bmc: Bmc, action: str, started: float, error: str) -> None:
        seconds = round(time.monotonic() - started, 3)
        log.warning("%s: BMC %s failed after %.1f s: %s", mac, action, seconds, error)
        previous = self._states.get(mac)
        if action == "status" or previous is None:
            self._states[mac] = PowerState("unknown", time.time(), error)
        # The poll records a failure once, when it starts (or its message changes), not every round.
        if not (action == "status" and previous is not None and previous.error == error):
            self._store.record(mac, EventKind.POWER_FAILED, {"action": action, "error": error, "seconds": seconds,
                                                             "bmc": _name(bmc)})
        raise BmcError(error)

    def _record_call(self, mac: str, action: str, detail: dict[str, Any]) -> None:
        self._store.record(mac, POWER_KINDS[action], {"action": action, **detail})

    def _driver(self, mac: str, bmc: Bmc) -> Driver:
        """The one driver of this BMC (kept: pyghmi must reuse its session), made on first use."""
        driver = self._drivers.get(bmc)
        if driver is None:
            password = self._password(mac, bmc)
            if bmc.driver == "ipmi":
                driver = IpmiDriver.of(bmc.address, bmc.port, bmc.username, password)
            else:
                driver = RedfishDriver(bmc.address, bmc.port, bmc.username, password, verify=bmc.verify,
                                       system=bmc.system, timeout=self.timeout)
            self._drivers[bmc] = driver
        return driver

    def _password(self, mac: str, bmc: Bmc) -> str:
        where = f"[machines.\"{mac}\".bmc]"
        if bmc.password_file is not None:
            return read_secret_file(bmc.password_file)
        assert bmc.password is not None  # the config requires one of the two
        return decrypt_secret(self._secret_key, bmc.password, f"{where} password")


def _published(figures: dict[str, Any], mac: str) -> PowerState | None:
    """The power state of `mac` that another process published (Siblings), if it has one."""
    seen = figures.get("power", {}).get(mac)
    with contextlib.suppress(TypeError, KeyError):
        return PowerState(seen["state"], seen["checked"], seen.get("error"))
    return None


def _not_kept(read: BootOverride, uefi: bool) -> str | None:
    """Why the read-back is not a network boot in the mode asked for; None: it is."""
    if read.device != "network":
        return f"the next boot reads back as {read.device!r}, not the network"
    if read.uefi is not None and read.uefi != uefi:
        return f"the next boot reads back in {'UEFI' if read.uefi else 'legacy'} mode, not the machine's"
    return None


def _name(bmc: Bmc | None) -> str:
    if bmc is None:
        return "none"
    return f"{bmc.driver} {bmc.address}{f':{bmc.port}' if bmc.port else ''}"
