"""Which group a machine is in, and so which profile it boots: the most specific matching selector wins.

Selector keys are the machine's configured labels plus what it reports (mac, arch, platform); ties go to the
group listed first. One Groups answers for one config: the core makes a new one when the config is reloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config, Group, Machine, Profile
from .store import Member


@dataclass(frozen=True)
class BootSpec:
    """What one machine boots, and why; `profile` None means it boots nothing from us."""

    mac: str
    profile: Profile | None
    group: str | None
    reason: str
    machine: Machine | None = None
    facts: dict[str, str] = field(default_factory=dict)
    secure_boot: bool = False  # the signed shim and GRUB for its UEFI firmware: its machine, group or profile says so


class Groups:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._group_of: dict[tuple[str, str | None, str | None], str | None] = {}

    def spec(self, mac: str, facts: dict[str, str] | None = None) -> BootSpec:
        """The machine's group and profile, with the reason in words (for its timeline and the pages)."""
        facts = facts or {}
        machine = self._config.machines.get(mac)
        matching = self._matching(mac, facts)
        if not matching:
            known = "a configured machine" if machine else "an unknown machine"
            return BootSpec(mac, None, None, f"{mac} is {known} and no group matches it", machine, facts,
                            bool(machine and machine.secure_boot))
        best = _most_specific(matching)
        why = (", ".join(f"{k}={v}" for k, v in sorted(best.selector.items())) or "no selector: matches all")
        others = [g.name for g in matching if g is not best]
        reason = f"group {best.name} ({why})" + (f"; also matched, less specific: {', '.join(others)}"
                                                 if others else "")
        profile = self._config.profiles[best.profile]
        secure_boot = bool(machine and machine.secure_boot) or best.secure_boot or profile.secure_boot
        return BootSpec(mac, profile, best.name, reason, machine, facts, secure_boot)

    def group_of(self, mac: str, arch: str | None, platform: str | None) -> str | None:
        """spec(...).group for these facts, remembered: a job lists its group's members, which asks this of
        every machine."""
        key = (mac, arch, platform)
        if key not in self._group_of:
            facts = {k: v for k, v in (("arch", arch), ("platform", platform)) if v is not None}
            matching = self._matching(mac, facts)
            self._group_of[key] = _most_specific(matching).name if matching else None
        return self._group_of[key]

    def members(self, group: str | None, admitted: list[Member],
                hostname: Callable[[str], str]) -> list[dict[str, Any]]:
        """The machines in `group`, by MAC: those configured under [machines] and those `admitted`, each with its
        name, address (where it phoned home from, else its [machines] reservation, else None) and labels."""
        known = {m.mac: m for m in admitted}
        members = []
        for mac in sorted(set(known) | set(self._config.machines)):
            member = known.get(mac)
            if self.group_of(mac, member and member.arch, member and member.platform) == group:
                machine = self._config.machines.get(mac)
                reserved = str(machine.ip) if machine and machine.ip else None
                members.append({"mac": mac, "hostname": hostname(mac), "ip": (member and member.ip) or reserved,
                                "labels": machine.labels if machine else {}})
        return members

    def _matching(self, mac: str, facts: dict[str, str]) -> list[Group]:
        machine = self._config.machines.get(mac)
        attributes = {**(machine.labels if machine else {}), **facts, "mac": mac}
        return [g for g in self._config.groups if all(attributes.get(k) == v for k, v in g.selector.items())]


def _most_specific(matching: list[Group]) -> Group:
    return max(matching, key=lambda g: len(g.selector))  # max() keeps the first of equals
