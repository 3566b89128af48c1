"""DHCP through a real relay: dnsmasq's --dhcp-relay between a client segment and bootserver's.

Three network namespaces, made and removed by each test, joined by veth pairs:

    srv  `bootserver serve` on 10.201.0.1/24, DHCP on 67 (route to the client segment via the relay)
    rly  dnsmasq as a relay only: 10.201.0.2 toward srv, 10.202.0.1 on the client segment
    cli  a PXE client (tests/support/dhcp_client.py) broadcasting a DISCOVER from port 68 on 10.202.0.0/24

What crosses the relay is what crosses a routed campus network: the relay stamps giaddr, bootserver answers
the relay, the relay hands the answer to the client. Needs root, iproute2 and dnsmasq-base; a missing one
fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.config import section, server_section
from support.wait import until

from bootserver.store import Store

ROOT = Path(__file__).resolve().parent.parent
MAC = "52:54:00:00:20:01"
SERVER, RELAY_UP, RELAY_DOWN = "10.201.0.1", "10.201.0.2", "10.202.0.1"


class Segments:
    """The three namespaces and the processes started in them; `close` stops and removes everything."""

    def __init__(self, work: Path) -> None:
        self.work = work
        tag = f"bsr{os.getpid()}"
        self.srv, self.rly, self.cli = f"{tag}-srv", f"{tag}-rly", f"{tag}-cli"
        self.processes: list[subprocess.Popen[bytes]] = []

    def ns(self, namespace: str, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", namespace, *command], check=True, capture_output=True)

    def build(self) -> None:
        for namespace in (self.srv, self.rly, self.cli):
            subprocess.run(["ip", "netns", "add", namespace], check=True)
            self.ns(namespace, "ip", "link", "set", "lo", "up")
        subprocess.run(["ip", "link", "add", "s0", "netns", self.srv, "type", "veth", "peer", "name", "r0",
                        "netns", self.rly], check=True)
        subprocess.run(["ip", "link", "add", "r1", "netns", self.rly, "type", "veth", "peer", "name", "c0",
                        "netns", self.cli], check=True)
        for namespace, link, address in ((self.srv, "s0", f"{SERVER}/24"), (self.rly, "r0", f"{RELAY_UP}/24"),
                                         (self.rly, "r1", f"{RELAY_DOWN}/24"), (self.cli, "c0", "10.202.0.50/24")):
            self.ns(namespace, "ip", "addr", "add", address, "dev", link)
            self.ns(namespace, "ip", "link", "set", link, "up")
        self.ns(self.srv, "ip", "route", "add", "10.202.0.0/24", "via", RELAY_UP)

    def spawn(self, namespace: str, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(["ip", "netns", "exec", namespace, *command], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.processes.append(process)
        return process

    def start_relay(self) -> None:
        log = self.work / "dnsmasq.log"
        self.spawn(self.rly, ["dnsmasq", "--keep-in-foreground", "--log-facility=-", "--port=0", "--no-resolv",
                              "--no-hosts", "--log-dhcp", f"--dhcp-relay={RELAY_DOWN},{SERVER}",
                              f"--pid-file={self.work / 'dnsmasq.pid'}"], log)
        wait_for(lambda: "DHCP relay" in log.read_text() or "started" in log.read_text(), "dnsmasq to start", log)

    def start_server(self, dhcp: str) -> Path:
        data = self.work / "data"
        config = self.work / "site.toml"
        config.write_text(server_section(data, http=f"{SERVER}:8080", tftp=f"{SERVER}:6969") +
                          section("dhcp", server_address=SERVER) + f"{dhcp}\n")
        log = self.work / "server.log"
        self.spawn(self.srv, [sys.executable, "-m", "bootserver", "--config", str(config), "serve"], log)
        wait_for(lambda: "serving HTTP on" in log.read_text(), "bootserver to listen", log)
        return data / "bootserver.sqlite3"

    def discover(self, kind: str, seconds: float = 5.0) -> dict | None:
        client = ROOT / "tests" / "support" / "dhcp_client.py"
        result = subprocess.run(["ip", "netns", "exec", self.cli, sys.executable, str(client), "c0", MAC, kind,
                                 str(seconds)], capture_output=True, text=True, timeout=seconds + 10)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            if process.poll() is None:
                process.kill()
                process.wait()
        for namespace in (self.cli, self.rly, self.srv):  # deleting a namespace removes its veth ends
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def wait_for(ready, what: str, log: Path, seconds: float = 20.0) -> None:
    until(ready, seconds, interval=0.1, what=lambda: f"{what}; its log:\n{log.read_text()[-3000:]}")


@pytest.fixture
def segments(tmp_path: Path) -> Iterator[Segments]:
    if os.geteuid() != 0:
        pytest.fail("the relay tests need root (network namespaces, veth pairs, port 67)")
    missing = [f"{tool} ({package})" for tool, package in (("ip", "iproute2"), ("dnsmasq", "dnsmasq-base"))
               if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: apt-get install them (./setup test does)")
    segments = Segments(tmp_path)
    try:
        segments.build()
        segments.start_relay()
        yield segments
    finally:
        segments.close()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert segments.srv not in listed and segments.cli not in listed


def test_proxy_mode_answers_pxe_clients_through_a_relay(segments: Segments):
    store_path = segments.start_server('mode = "proxy"')
    firmware = segments.discover("bios")
    assert firmware is not None, f"no answer through the relay:\n{(segments.work / 'dnsmasq.log').read_text()}"
    assert firmware["message_type"] == 2 and firmware["giaddr"] == RELAY_DOWN
    assert (firmware["yiaddr"], firmware["siaddr"], firmware["file"]) == ("0.0.0.0", SERVER, "undionly.kpxe")
    assert firmware["options"]["60"] == "PXEClient"
    ipxe = segments.discover("ipxe")
    assert ipxe is not None and ipxe["options"]["67"] == f"http://{SERVER}:8080/boot.ipxe"
    store = Store(store_path)
    try:
        relayed = [e.detail for e in store.events(MAC) if e.kind == "dhcp"]
    finally:
        store.close()
    assert relayed and relayed[0]["message"] == "DISCOVER" and relayed[0]["bootfile"] == "undionly.kpxe"


def test_full_mode_does_not_lease_its_own_subnet_to_a_relayed_client(segments: Segments):
    store_path = segments.start_server('mode = "full"\npool = "10.201.0.100-10.201.0.120"\nnetmask = "255.255.255.0"')
    assert segments.discover("bios", seconds=3.0) is None, "a 10.201.0.x address is no use on 10.202.0.0/24"
    log = (segments.work / "server.log").read_text()
    assert f"relayed from {RELAY_DOWN}, outside 10.201.0.0/24, the only network we lease on" in log
    store = Store(store_path)
    try:
        assert store.leases() == []
    finally:
        store.close()
