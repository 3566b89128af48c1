"""What `bootserver serve` does about the open-file limit at start, seen from outside the real process: it raises
the soft limit to the hard one, and with a hard limit too low for a full TFTP session table it lowers the table
and says so (README, Hardening)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from support.config import server_section
from support.net import free_port
from support.require import require
from support.serve import serving


def serve(tmp_path: Path, nofile: str) -> tuple[str, str]:
    """Start `bootserver serve` under `prlimit --nofile=SOFT:HARD`; (its /proc limits line, its log) once it serves."""
    config = tmp_path / "site.toml"
    config.write_text(server_section(tmp_path / "data", http=f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
                                     tftp=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"))
    log = tmp_path / "serve.log"
    with serving(config, log, prefix=["prlimit", f"--nofile={nofile}"]) as process:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        return next(line for line in limits.splitlines() if line.startswith("Max open files")), log.read_text()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path):
    require("prlimit")
    line, log = serve(tmp_path, "1024:8192")
    assert re.fullmatch(r"Max open files\s+8192\s+8192\s+files\s*", line), line
    assert "at most" not in log


def test_a_hard_limit_too_low_for_the_tftp_table_lowers_it_with_a_warning(tmp_path):
    line, log = serve(tmp_path, "300:300")
    assert re.fullmatch(r"Max open files\s+300\s+300\s+files\s*", line), line
    warning = re.search(r"tftp: at most (\d+) transfers at once: the open-file limit is too low for 1000", log)
    assert warning and 0 < int(warning[1]) < 1000, log


async def test_the_tftp_table_follows_its_settings(tmp_path):
    """[server] tftp_sessions and tftp_sessions_per_source reach the TFTP server (its policy: tests/test_tftp.py)."""
    from bootserver import config as configuration
    from bootserver.app import TFTP, init_app, running

    config = configuration.parse({"server": {"http": "127.0.0.1:0", "tftp": "127.0.0.1:0", "data_dir": str(tmp_path),
                                             "tftp_sessions": 8, "tftp_sessions_per_source": 2}})
    app = init_app(config)
    async with running(app):
        assert (app[TFTP]._max_sessions, app[TFTP]._max_per_client) == (8, 2)
