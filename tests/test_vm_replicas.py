"""A real VM provisioned by the other replica: the replica that served its boot script and kernel is
stopped before the agent phones home, so the agent falls back to its peer, which provisions it over SSH
with the server key both replicas share."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from support.net import free_port
from support.qemu import DEFAULT_MAC, Vm
from support.replicas import Replica

from bootserver.store import Store
from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm

SITE = """
[assets]
agent-kernel = "images/agent/vmlinuz"
agent-initrd = "images/agent/initrd.img"

[profiles.node]
kernel = "agent-kernel"
initrd = ["agent-initrd"]
cmdline = "console=ttyS0 panic=-1"

[profiles.node.deploy]
check = "grep -q replicas $TARGET/etc/motd"
[[profiles.node.deploy.files]]
source = "files/motd"
dest = "/etc/motd"

[groups.all]
profile = "node"

[machines."{mac}"]
hostname = "node1"
ssh = "127.0.0.1:{ssh_port}"
"""


async def wait_until(store: Store, vm: Vm, what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or not vm.running:
            events = "\n".join(f"{e.replica} {e.kind} {e.detail}" for e in store.events(DEFAULT_MAC))
            raise AssertionError(f"no {what} within {timeout} s{vm.report()}\n--- events:\n{events}")
        await asyncio.sleep(0.1)


async def test_a_vm_is_provisioned_by_the_peer_of_the_replica_that_booted_it(postgres, agent_image: AgentImage, timing,
                                                                            tmp_path: Path):
    database = postgres.new_database()
    ssh_port = free_port()
    site = SITE.format(mac=DEFAULT_MAC, ssh_port=ssh_port)
    ports = [free_port(), free_port()]
    # The guest reaches the host's 127.0.0.1:PORT as 10.0.2.2:PORT (QEMU user-mode networking).
    a, b = (Replica(name, tmp_path, database, site, port=ports[k],
                    server=f'public_address = "10.0.2.2"\npeers = ["http://10.0.2.2:{ports[1 - k]}"]')
            for k, name in enumerate("ab"))
    for replica in (a, b):
        (replica.data / "images" / "agent").mkdir(parents=True)
        shutil.copy(agent_image.kernel, replica.data / "images" / "agent" / "vmlinuz")
        shutil.copy(agent_image.initrd, replica.data / "images" / "agent" / "initrd.img")
        (replica.data / "files").mkdir()
        (replica.data / "files" / "motd").write_text("provisioned by one of two replicas\n")
    store = Store(database, replica="observer")
    try:
        await a.start()
        await b.start()
        bootfile = f"http://10.0.2.2:{a.port}/boot.ipxe"
        async with Vm(workdir=tmp_path, bootfile=bootfile, memory=512, hostfwd={ssh_port: 22}) as vm:
            # The overlay is the last thing iPXE fetches before it boots the kernel: then a goes away.
            await wait_until(store, vm, "overlay from replica a", lambda: any(
                e.kind == "file-served" and e.detail.get("file") == "bootserver.cpio"
                for e in store.events(DEFAULT_MAC)), timeout=240)
            await a.kill()
            await wait_until(store, vm, "deployed", lambda: store.node(DEFAULT_MAC).state == "deployed", timeout=240)
            took = vm.elapsed
        events = store.events(DEFAULT_MAC)
        by = {e.kind: e.replica for e in events}
        assert by["script-served"] == "a" and by["phoned-home"] == "b" and by["deployed"] == "b", events
        assert "failed" not in by and "refused" not in by, events
        timing("QEMU start to deployed by the peer", took)
    finally:
        await a.kill()
        await b.kill()
        store.close()
