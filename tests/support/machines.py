"""Machines put straight into a store, for tests that need one in a given state without booting it."""

from __future__ import annotations

from bootserver import tokens
from bootserver.store import Store
from support.http import host_key


def admit(store: Store, mac: str, ip: str = "10.0.0.9", facts: dict | None = None) -> None:
    """Make `mac` a machine that phoned home with a token we issued (what group member lists count)."""
    _, token = tokens.Signer(b"machines put straight into a store").issue(mac, 30, ip)
    store.record(mac, "script-served", {}, state="script-served", facts=facts, token=token)
    assert store.phoned_home(token, ip, host_key(), {})
