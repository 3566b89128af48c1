"""Health: is the installed system doing its job? A profile's checks, retried until they pass or time runs out.

Commands run over SSH to the installed OS, verified against the host key the server made for it at install
time; URLs are fetched from the node's address. A machine is `running` only when every check passes in
the same round.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import BootserverError
from .pki import ServerKeys
from .ssh import HostKeyMismatch, NodeAccess, NodeLost, Record, StepFailed, session

STEP = "health"
URL_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class HealthChecks:
    commands: tuple[str, ...] = ()  # each must exit 0 on the node
    urls: tuple[str, ...] = ()  # each must answer 2xx; "{ip}" is the node's address
    minutes: float = 5.0  # from the first check until the machine is failed
    interval: float = 5.0  # seconds between rounds

    def urls_for(self, ip: str) -> tuple[str, ...]:
        host = f"[{ip}]" if ":" in ip else ip
        return tuple(url.replace("{ip}", host) for url in self.urls)


class HealthFailed(BootserverError):
    """The checks did not all pass in time; the message names the ones that failed last, and how."""


async def wait_until_healthy(access: NodeAccess, keys: ServerKeys, checks: HealthChecks, record: Record,
                             **ssh_options: Any) -> dict[str, str]:
    """Run `checks` against the node until all pass (returns what each said) or `checks.minutes` pass
    (raises HealthFailed). A host key other than the pinned one fails at once: it is not our machine."""
    last: dict[str, str]
    deadline = time.monotonic() + checks.minutes * 60
    rounds, last = 0, {}
    while True:
        rounds += 1
        quiet = _Quiet(record, loud=rounds == 1)
        results = await _round(access, keys, checks, quiet, ssh_options)
        failing = {name: why for name, why in results.items() if why != "ok"}
        if not failing:
            record("health-passed", {"checks": sorted(results), "rounds": rounds})
            return results
        if failing != last:
            record("health-waiting", {"failing": failing, "round": rounds})
            last = failing
        if time.monotonic() + checks.interval > deadline:
            summary = "; ".join(f"{name}: {why}" for name, why in failing.items())
            raise HealthFailed(f"health checks still failing after {checks.minutes:g} minutes ({rounds} rounds): "
                               f"{summary}")
        await asyncio.sleep(checks.interval)


class _Quiet:
    """Passes the first round's command events on, then only what is not routine: a check retried every
    few seconds for minutes would bury the timeline."""

    ROUTINE = frozenset({"command", "connect-failed"})

    def __init__(self, record: Record, loud: bool) -> None:
        self._record, self._loud = record, loud

    def __call__(self, kind: str, detail: dict[str, Any]) -> None:
        if self._loud or kind not in self.ROUTINE:
            self._record(kind, detail)


async def _round(access: NodeAccess, keys: ServerKeys, checks: HealthChecks, record: Record,
                 ssh_options: dict[str, Any]) -> dict[str, str]:
    results: dict[str, str] = {}
    if checks.commands:
        results |= await _commands(access, keys, checks.commands, record, ssh_options)
    for url in checks.urls_for(access.host):
        results[url] = await _fetch(url)
    return results


async def _commands(access: NodeAccess, keys: ServerKeys, commands: tuple[str, ...], record: Record,
                    ssh_options: dict[str, Any]) -> dict[str, str]:
    options = {"command_timeout": COMMAND_TIMEOUT, **ssh_options}
    try:
        async with session(access, keys, record, **options) as runner:
            results = {}
            for command in commands:
                try:
                    await runner.run(STEP, command)
                    results[command] = "ok"
                except StepFailed as exc:
                    results[command] = f"exit {exc.exit_status}: {exc.stderr_tail.strip()[-200:]}".rstrip(": ")
            return results
    except HostKeyMismatch:
        raise
    except (NodeLost, StepFailed) as exc:
        return dict.fromkeys(commands, f"no SSH: {exc}")


async def _fetch(url: str) -> str:
    try:
        timeout = aiohttp.ClientTimeout(total=URL_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as client, client.get(url) as response:
            return "ok" if 200 <= response.status < 300 else f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"unreachable: {exc or type(exc).__name__}"
