"""What `bootserver serve` does at start, seen from outside the real process: it raises the soft open-file limit to
the hard one, and with a hard limit too low for a full TFTP session table it lowers the table and says so (README,
Hardening); once it has read the event log into the fleet, it leaves that heap out of the collector's full passes."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

from support.config import server_section
from support.net import free_port
from support.require import require
from support.serve import answers as answers_url
from support.serve import serving
from support.wait import until


@contextlib.contextmanager
def served(tmp_path: Path, nofile: str) -> Iterator[tuple[str, str, int, int]]:
    """`bootserver serve` under `prlimit --nofile=SOFT:HARD`, once it serves: (its /proc limits line, its log so far,
    its HTTP port, its TFTP port)."""
    require("prlimit")
    http, tftp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    config = tmp_path / "site.toml"
    config.write_text(server_section(tmp_path / "data", http=f"127.0.0.1:{http}", tftp=f"127.0.0.1:{tftp}"))
    log = tmp_path / "serve.log"
    with serving(config, log, prefix=["prlimit", f"--nofile={nofile}"]) as process:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        yield line, log.read_text(), http, tftp


def serve(tmp_path: Path, nofile: str) -> tuple[str, str]:
    with served(tmp_path, nofile) as (line, log, _, _):
        return line, log


def first_answers(tftp: int, count: int) -> list[bytes]:
    """RRQs for boot.ipxe from `count` sources at once (each its own loopback address: the per-source cap does not
    apply), never ACKed, so every transfer admitted holds its place; the first datagram each source gets back."""
    sockets = []
    try:
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((f"127.0.9.{i + 1}", 0))
            sock.settimeout(5)
        for sock in sockets:
            sock.sendto(b"\0\1boot.ipxe\0octet\0", ("127.0.0.1", tftp))
        return [sock.recv(1024) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path):
    line, log = serve(tmp_path, "1024:8192")
    assert re.fullmatch(r"Max open files\s+8192\s+8192\s+files\s*", line), line
    assert "at most" not in log


def test_the_heap_alive_once_the_fleet_is_read_is_frozen(tmp_path):
    """Full collections walked the whole fleet: 100-300 ms pauses in the list pages at 10,000 machines
    (benchmarks/run state). The log names how many objects serve froze after reading the event log."""
    with served(tmp_path, "1024:8192") as (_, _, http, _):
        until(lambda: "objects alive after the fleet was read" in (tmp_path / "serve.log").read_text(), 15,
              what="the freeze after the fleet's read")
        log = (tmp_path / "serve.log").read_text()
        frozen = re.search(r"gc: (\d+) objects alive after the fleet was read", log)
        assert frozen and int(frozen[1]) > 10_000, log
        assert log.index("fleet: the event log read") < frozen.start()
        assert answers_url(f"http://127.0.0.1:{http}/healthz")


def test_a_hard_limit_too_low_for_the_tftp_table_lowers_it_with_a_warning(tmp_path):
    """The warning's figure is the cap in force: that many transfers run at once, the next is told "too many
    sessions", and HTTP still has descriptors to answer with meanwhile."""
    with served(tmp_path, "300:300") as (line, log, http, tftp):
        assert re.fullmatch(r"Max open files\s+300\s+300\s+files\s*", line), line
        warning = re.search(r"tftp: at most (\d+) transfers at once: the open-file limit is too low for 1000", log)
        assert warning and 0 < int(warning[1]) < 1000, log
        cap = int(warning[1])
        answers = first_answers(tftp, cap + 1)
        assert [a[:4] for a in answers[:cap]] == [b"\0\3\0\1"] * cap  # DATA block 1: a transfer each
        assert answers[cap] == b"\0\5\0\0too many sessions\0"
        assert answers_url(f"http://127.0.0.1:{http}/healthz")


async def test_the_tftp_table_follows_its_settings(tmp_path):
    """[server] tftp_sessions and tftp_sessions_per_source reach the TFTP server (its policy: tests/test_tftp.py)."""
    from bootserver import config as configuration
    from bootserver.app import TFTP, init_app, running

    config = configuration.parse({"server": {"http": "127.0.0.1:0", "tftp": "127.0.0.1:0", "data_dir": str(tmp_path),
                                             "tftp_sessions": 8, "tftp_sessions_per_source": 2}})
    app = init_app(config)
    async with running(app):
        assert (app[TFTP]._max_sessions, app[TFTP]._max_per_client) == (8, 2)
        assert app[TFTP].engine == "native"  # "auto": the C loop, which CI builds (./setup installs gcc)
    config = configuration.parse({"server": {"http": "127.0.0.1:0", "tftp": "127.0.0.1:0", "data_dir": str(tmp_path),
                                             "tftp_engine": "python"}})
    app = init_app(config)
    async with running(app):
        assert app[TFTP].engine == "python"
