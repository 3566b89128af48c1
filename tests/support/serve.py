"""`bootserver serve` as a real process of its own, for tests of what only a process shows (signals, limits,
file modes, restarts), and whether a server answers yet."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp

from support.wait import until

ROOT = Path(__file__).resolve().parents[2]


def serve_command(config: Path, *options: str) -> list[str]:
    """The command line of `bootserver --config CONFIG [options] serve`, run from this checkout."""
    return [sys.executable, "-m", "bootserver", "--config", str(config), *options, "serve"]


@contextlib.contextmanager
def serving(config: Path, log: Path, prefix: Sequence[str] = (), command: Sequence[str] = (),
            **popen) -> Iterator[subprocess.Popen]:
    """The server started (its output in `log`) and listening on HTTP; terminated on leaving. `command`: another
    `bootserver` than this checkout's (an installed one) to run with its arguments."""
    popen.setdefault("cwd", ROOT)
    argv = [*command, "--config", str(config), "serve"] if command else serve_command(config)
    with log.open("ab") as out:
        process = subprocess.Popen([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        until(lambda: logged(process, log, "serving HTTP on"), 15, what=lambda: f"the server to listen:\n{tail(log)}")
        yield process
    finally:
        process.terminate()
        process.wait(10)


def logged(process: subprocess.Popen, log: Path, text: str) -> bool:
    """Whether `text` is in the log yet; fails at once when the process has exited."""
    assert process.poll() is None, f"bootserver serve exited ({process.returncode}):\n{tail(log)}"
    return text in log.read_text()


def tail(log: Path, size: int = 3000) -> str:
    return log.read_text()[-size:] if log.exists() else "(no log)"


def answers(url: str) -> bool:
    """Whether GET `url` is 200 now; False while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


async def answers_async(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether GET `url` is 200 now; False while nothing listens."""
    with contextlib.suppress(aiohttp.ClientError):
        async with session.get(url) as response:
            return response.status == 200
    return False
