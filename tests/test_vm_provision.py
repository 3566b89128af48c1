"""Power-on to deployed, no hands: a QEMU VM with an empty disk netboots the agent, phones home, and
is provisioned over SSH (its host key pinned from the phone-home). Then, from the host, with the VM
off, the disk image must hold the GPT with ESP + ext4 and everything deployed, and the next script
for the machine must boot its disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.disk import blkid, debugfs, loop_device
from support.net import free_port
from support.qemu import DEFAULT_MAC, Vm
from support.vm import events, wait_for_state

from bootserver import config as configuration
from bootserver.app import PROVISIONER, STORE, http_address, init_app, running
from bootserver.tools.image import AgentImage

pytestmark = pytest.mark.vm

PROFILE = """
[profiles.raft]
kernel = "agent-kernel"
initrd = ["agent-initrd"]
cmdline = "console=ttyS0 panic=-1"

[profiles.raft.disk]
device = "/dev/vda"
[[profiles.raft.disk.partitions]]
label = "boot"
size = "512MiB"
type = "esp"
filesystem = "vfat"
mount = "/boot"
[[profiles.raft.disk.partitions]]
label = "nixos"
size = "rest"
type = "linux"
filesystem = "ext4"
mount = "/"

[profiles.raft.deploy]
check = "test -x $TARGET/usr/local/bin/raftd"
[[profiles.raft.deploy.files]]
source = "files/raftd"
dest = "/usr/local/bin/raftd"
mode = "0755"
[[profiles.raft.deploy.templates]]
source = "templates/raft.toml.j2"
dest = "/etc/raft/raft.toml"
[profiles.raft.deploy.tls]
dir = "/etc/raft/tls"
[[profiles.raft.deploy.units]]
source = "units/raftd.service"

[groups.raft]
profile = "raft"
selector = { role = "raft" }
"""

RAFT_TOML = """node = "{{ node.hostname }}"
{% for peer in group %}[[peers]]
name = "{{ peer.hostname }}"
mac = "{{ peer.mac }}"
{% endfor %}"""

UNIT = """[Unit]
Description=Raft node

[Service]
ExecStart=/usr/local/bin/raftd

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture
async def site(agent_image: AgentImage, tmp_path: Path):
    data = tmp_path / "data"
    for sub in ("images/agent", "files", "templates", "units"):
        (data / sub).mkdir(parents=True)
    shutil.copy(agent_image.kernel, data / "images/agent/vmlinuz")
    shutil.copy(agent_image.initrd, data / "images/agent/initrd.img")
    (data / "files/raftd").write_text("#!/bin/sh\necho raftd 1.0\n")
    (data / "templates/raft.toml.j2").write_text(RAFT_TOML)
    (data / "units/raftd.service").write_text(UNIT)
    ssh_port = free_port()
    toml = (f'[server]\nhttp = "127.0.0.1:0"\ntftp = "127.0.0.1:0"\ndata_dir = "{data}"\n'
            '[assets]\nagent-kernel = "images/agent/vmlinuz"\nagent-initrd = "images/agent/initrd.img"\n'
            f'{PROFILE}\n'
            f'[machines."{DEFAULT_MAC}"]\nhostname = "node1"\nlabels = {{ role = "raft" }}\n'
            f'ssh = "127.0.0.1:{ssh_port}"\n'  # user-mode networking: the guest's port 22 is forwarded here
            '[machines."52:54:00:00:00:02"]\nhostname = "node2"\nlabels = { role = "raft" }\n')
    (tmp_path / "site.toml").write_text(toml)
    config = configuration.load(tmp_path / "site.toml")
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, public_address="10.0.2.2"))
    app = init_app(config)
    async with running(app):
        yield app, ssh_port


async def test_power_on_to_deployed(site, tmp_path: Path, timing):
    app, ssh_port = site
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(1 << 30)  # an empty 1 GiB disk
    bootfile = f"http://10.0.2.2:{http_address(app)[1]}/boot.ipxe"
    async with Vm(workdir=tmp_path, bootfile=bootfile, memory=512, disk=disk, hostfwd={ssh_port: 22}) as vm:
        took = await wait_for_state(app, vm, "deployed", timeout=420)
        timing("power-on to deployed", took)
        # The last step reboots the node; with -no-reboot QEMU then exits, leaving the disk consistent.
        await asyncio.wait_for(vm.process.wait(), 60)
    kinds = [e.kind for e in app[STORE].events(DEFAULT_MAC)]
    for kind in ("script-served", "phoned-home", "step-started", "step-done", "deployed"):
        assert kind in kinds, events(app)
    assert "refused" not in kinds and "failed" not in kinds, events(app)

    check_disk(disk, app)

    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{http_address(app)[1]}/boot/{DEFAULT_MAC.replace(':', '-')}.ipxe?platform=pcbios"
        async with session.get(url) as response:
            script = await response.text()
    assert "sanboot --no-describe --drive 0x80" in script and "kernel " not in script


def check_disk(disk: Path, app: web.Application) -> None:
    """Read the powered-off disk image from the host: partition table, filesystems, deployed files."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    esp, root = table["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and esp["name"] == "boot"
    assert esp["size"] * table.get("sectorsize", 512) == 512 << 20
    assert root["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4" and root["name"] == "nixos"
    sector = table.get("sectorsize", 512)
    with loop_device(disk, esp["start"] * sector, esp["size"] * sector) as device:
        esp_fs = blkid(device)
        assert esp_fs["TYPE"] == "vfat" and esp_fs["LABEL"].lower() == "boot", esp_fs
    with loop_device(disk, root["start"] * sector, root["size"] * sector) as device:
        assert blkid(device)["TYPE"] == "ext4" and blkid(device)["LABEL"] == "nixos"
        assert debugfs(device, "cat /usr/local/bin/raftd") == b"#!/bin/sh\necho raftd 1.0\n"
        assert "0755" in debugfs(device, "stat /usr/local/bin/raftd").decode()
        rendered = debugfs(device, "cat /etc/raft/raft.toml").decode()
        assert rendered.startswith('node = "node1"\n')
        assert 'name = "node1"' in rendered and 'name = "node2"' in rendered  # the whole group
        cert = x509.load_pem_x509_certificate(debugfs(device, "cat /etc/raft/tls/node.crt"))
        ca = x509.load_pem_x509_certificate(app[PROVISIONER].keys.ca_pem)
        cert.verify_directly_issued_by(ca)  # chains to our CA
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "node1" in san.get_values_for_type(x509.DNSName)
        assert debugfs(device, "cat /etc/raft/tls/ca.crt") == app[PROVISIONER].keys.ca_pem
        # The key the agent's openssl made on the node, 0600, and the one the certificate is for.
        assert re.search(r"Mode:\s+0600\b", debugfs(device, "stat /etc/raft/tls/node.key").decode())
        key = serialization.load_pem_private_key(debugfs(device, "cat /etc/raft/tls/node.key"), None)
        assert cert.public_key() == key.public_key()
        issued = [e.detail for e in app[STORE].events(DEFAULT_MAC) if e.kind == "certificate-issued"]
        assert [d["serial"] for d in issued] == [f"{cert.serial_number:x}"], issued
        link = debugfs(device, "stat /etc/systemd/system/multi-user.target.wants/raftd.service").decode()
        assert 'Fast link dest: "/etc/systemd/system/raftd.service"' in link
        assert debugfs(device, "cat /etc/systemd/system/raftd.service").decode() == UNIT
