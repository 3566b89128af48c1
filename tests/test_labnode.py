"""The lab's demo peer service, run as the installed OS runs it (python3 FILE), on 127.0.0.1 ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bootserver.tools import labnode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_peers_reports_which_members_answer(tmp_path: Path):
    """A peer where nothing listens is unreachable; the node leaves itself out of its own list."""
    port = free_port()
    peers = tmp_path / "peers.toml"
    peers.write_text('me = "node1"\n[[peer]]\nname = "node1"\nip = "127.0.0.1"\n'
                     '[[peer]]\nname = "node2"\nip = "127.0.0.2"\n')
    server = subprocess.Popen([sys.executable, labnode.__file__, str(peers), str(port)])
    try:
        assert get(f"http://127.0.0.1:{port}/health") == {"ok": True}
        report = get(f"http://127.0.0.1:{port}/peers")
    finally:
        server.terminate()
        server.wait(5)
    assert report == {"me": "node1", "peers": [{"hostname": "node2", "ip": "127.0.0.2", "reachable": False}]}


def test_a_peer_that_answers_is_reachable(tmp_path: Path, monkeypatch):
    port = free_port()
    peers = tmp_path / "peers.toml"
    peers.write_text('me = "a"\n[[peer]]\nname = "b"\nip = "127.0.0.1"\n')
    server = subprocess.Popen([sys.executable, labnode.__file__, str(peers), str(port)])
    try:
        get(f"http://127.0.0.1:{port}/health")
        monkeypatch.setattr(labnode, "PORT", port)  # the peer b is this very server
        assert labnode.peers_report(str(peers))["peers"] == [{"hostname": "b", "ip": "127.0.0.1", "reachable": True}]
    finally:
        server.terminate()
        server.wait(5)
