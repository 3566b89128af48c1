"""What machines say about themselves, reduced to what we keep.

Two reports reach the core from the boot network: the facts iPXE sends with a script request, and the agent's
phone-home (its host key, disks, kernel). Anything on that network can send anything, so each value is checked,
cut to size, or dropped here, once, before the core decides on it or records it.
"""

from __future__ import annotations

from typing import Any

import asyncssh

from .admission import canonical_uuid
from .config import FACT_KEYS
from .errors import BadRequest

# What iPXE's bootstrap script reports, by query parameter. Anything else is ignored.
REPORTED_FACTS = ("platform", "arch", "uuid", "serial", "asset", "manufacturer", "product")
MAX_FACT_LENGTH = 128
MAX_DISKS = 32
MAX_UNITS = 64  # failed units kept from a boot report


def clean_facts(reported: dict[str, str]) -> dict[str, str]:
    """What a machine reported about itself, reduced to known keys and sane printable values.

    Unset iPXE variables arrive as empty strings; they are dropped, not stored.
    """
    facts = {}
    for key in REPORTED_FACTS:
        value = reported.get(key, "")
        if not value:
            continue
        if len(value) > MAX_FACT_LENGTH or not value.isprintable():
            raise BadRequest(f"reported {key} is not a printable string of at most "
                             f"{MAX_FACT_LENGTH} characters")
        facts[key] = value
    return facts


def selector_facts(facts: dict[str, str]) -> dict[str, str]:
    """What of a machine's reported facts groups select on."""
    return {k: v for k, v in facts.items() if k in FACT_KEYS}


def firmware_uuid(facts: dict[str, str]) -> str | None:
    """The UUID iPXE reported, if it is one: an older bootstrap (or iPXE's :uristring) may send garbage, which
    then counts as no UUID reported, so that only a pinned [machines] uuid is checked for this boot."""
    try:
        return canonical_uuid(facts.get("uuid"))
    except BadRequest:
        return None


def host_key(value: object) -> tuple[str, str]:
    """The node's SSH host key as one OpenSSH line, checked to be a key, and its SHA256 fingerprint."""
    try:
        key = asyncssh.import_public_key(str(value))
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise BadRequest("host_key is not an OpenSSH public key line (ssh-ed25519 AAAA...)") from None
    return key.export_public_key("openssh").decode().strip(), key.get_fingerprint("sha256")


def kernel(value: object) -> str:
    """The kernel release the agent reported, as text of at most MAX_FACT_LENGTH characters."""
    return str(value)[:MAX_FACT_LENGTH]


def disks(value: object) -> list[dict[str, Any]]:
    """What the node reported about its disks, kept small and typed for the event log."""
    if not isinstance(value, list):
        return []
    kept = []
    for disk in value[:MAX_DISKS]:
        if isinstance(disk, dict) and isinstance(disk.get("name"), str):
            kept.append({"name": disk["name"][:32], "size_bytes": _count(disk.get("size_bytes")),
                         "partitions": _count(disk.get("partitions"))})
    return kept


def secure_boot(value: object) -> bool | None:
    """Whether the agent found Secure Boot on (the firmware's SecureBoot variable); None: not UEFI, or not said."""
    return value if isinstance(value, bool) else None


def boot_report(report: dict[str, Any]) -> dict[str, Any]:
    """What an installed OS reported of its first boot, kept small and typed for the event log."""
    failed = report.get("failed_units")
    units = [str(u)[:MAX_FACT_LENGTH] for u in failed[:MAX_UNITS]] if isinstance(failed, list) else []
    return {"kernel": kernel(report.get("kernel", "")), "boot_id": str(report.get("boot_id", ""))[:MAX_FACT_LENGTH],
            "system_state": str(report.get("system_state", ""))[:MAX_FACT_LENGTH], "failed_units": units,
            "secure_boot": secure_boot(report.get("secure_boot"))}


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
