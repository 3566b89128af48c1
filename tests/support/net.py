"""Ports for servers the tests start."""

from __future__ import annotations

import socket


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing holds right now. Another process could take it before the server binds it;
    the server then fails to start and says so."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
