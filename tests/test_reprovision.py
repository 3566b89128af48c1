"""Reprovisioning: a machine running its installed OS is rebooted over SSH (the host key pinned at install) into
the flow; one that only had files deployed waits for its next boot. Real sshd on 127.0.0.1 (support/sshd.py,
which records a reboot command instead of running it)."""

from __future__ import annotations

import asyncssh
from support.sshd import ssh_server
from support.wait import until_async

from bootserver.booter import Booter
from bootserver.store import Store
from bootserver.tokens import Signer

MAC = "52:54:00:00:00:05"


def running_installed_os(store: Store, host_key: str) -> None:
    """A machine as the flow leaves it: its OS installed with `host_key` pinned, reported from 127.0.0.1, running."""
    store.record(MAC, "script-served", {}, state="finishing")
    _, token = Signer(b"not the server's key: the token is only stored").issue(MAC, 5, purpose="report")
    store.installed(MAC, host_key, token, {})
    assert store.os_reported(token.id, MAC, "127.0.0.1", {})
    store.record(MAC, "running", {}, state="running")


def kinds(store: Store) -> list[str]:
    return [e.kind for e in store.events(MAC)]


async def test_a_running_machine_is_rebooted_over_its_pinned_key(booter: Booter, store: Store, keys):
    async with ssh_server(keys.ssh_public) as sshd:
        running_installed_os(store, sshd.host_key_line)
        booter.provisioner(ssh_port=sshd.port, connect_timeout=5)
        assert booter.reprovision(MAC)
        await until_async(lambda: "reboot-sent" in kinds(store), timeout=10)
        assert any("systemctl reboot" in command for command in sshd.commands)
    node = store.node(MAC)
    assert (node.state, node.reprovision) == ("reprovision", True)


async def test_a_machine_answering_with_another_host_key_is_not_rebooted(booter: Booter, store: Store, keys):
    async with ssh_server(keys.ssh_public) as sshd:
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        running_installed_os(store, other)
        booter.provisioner(ssh_port=sshd.port, connect_timeout=5)
        assert booter.reprovision(MAC)
        await until_async(lambda: "reboot-failed" in kinds(store), timeout=10)
        assert sshd.commands == []
    failed = [e.detail for e in store.events(MAC) if e.kind == "reboot-failed"]
    assert "does not match the key pinned" in failed[0]["reason"]


async def test_a_deployed_machine_waits_for_its_next_boot(booter: Booter, store: Store):
    store.record(MAC, "deployed", {}, state="deployed")
    booter.provisioner(ssh_port=1)
    assert not booter.reprovision(MAC)
    assert "reboot-sent" not in kinds(store) and store.node(MAC).state == "reprovision"
