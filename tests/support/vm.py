"""Waiting on a netbooting VM through our own store, and saying what happened when it does not get there."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from bootserver.app import STORE
from support.qemu import DEFAULT_MAC, Vm


async def wait_for_state(app: web.Application, vm: Vm, state: str, timeout: float, mac: str = DEFAULT_MAC,
                         exit_ok: bool = False) -> float:
    """Seconds from QEMU's start until `mac` reaches `state` in our store; fails with both logs."""
    deadline = time.monotonic() + timeout
    while (node := app[STORE].node(mac)) is None or node.state != state:
        if node is not None and node.state in ("failed", "interrupted"):
            raise AssertionError(f"{mac} is {node.state}, waiting for {state!r}{vm.report()}{events(app, mac)}")
        if not vm.running and not exit_ok:
            raise AssertionError(f"QEMU exited before {state!r}{vm.report()}{events(app, mac)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {state!r} within {timeout} s{vm.report()}{events(app, mac)}")
        await asyncio.sleep(0.2)
    return vm.elapsed


def events(app: web.Application, mac: str = DEFAULT_MAC) -> str:
    return "\n--- events:\n" + "\n".join(f"{e.kind} {e.detail}" for e in app[STORE].events(mac))
