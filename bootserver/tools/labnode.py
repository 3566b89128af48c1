#!/usr/bin/python3
"""lab-node: the lab's demo cluster member, deployed as one file onto each installed machine.

It listens on TCP 7000 and answers `GET /peers` with whether every other member of its group (from
/etc/lab-node/peers.toml, rendered by bootserver per machine) answers its own `GET /health`, over the
L2 network the machines share; `GET /health` answers 200. Standard library only: the installed OS has
python3 and nothing of ours.
"""

from __future__ import annotations

import json
import sys
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 7000
PEERS = "/etc/lab-node/peers.toml"
TIMEOUT = 2.0


def read_peers(path: str) -> tuple[str, list[dict[str, str]]]:
    with open(path, "rb") as file:
        config = tomllib.load(file)
    me = config.get("me", "")
    return me, [p for p in config.get("peer", []) if p.get("name") != me]


def reachable(peer: dict[str, str]) -> bool:
    try:
        with urllib.request.urlopen(f"http://{peer['ip']}:{PORT}/health", timeout=TIMEOUT) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def peers_report(path: str) -> dict[str, object]:
    me, peers = read_peers(path)
    with ThreadPoolExecutor(max_workers=max(len(peers), 1)) as pool:
        answers = list(pool.map(reachable, peers))
    return {"me": me, "peers": [{"hostname": p.get("name"), "ip": p.get("ip"), "reachable": ok}
                                for p, ok in zip(peers, answers, strict=True)]}


class Handler(BaseHTTPRequestHandler):
    peers_path = PEERS

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path == "/health":
            self._send(200, {"ok": True})
        elif self.path == "/peers":
            self._send(200, peers_report(self.peers_path))
        else:
            self._send(404, {"error": f"no {self.path}: try /peers or /health"})

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # the journal needs no line per request
        pass


def main(argv: list[str]) -> None:
    Handler.peers_path = argv[1] if len(argv) > 1 else PEERS
    port = int(argv[2]) if len(argv) > 2 else PORT
    ThreadingHTTPServer(("", port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv)
