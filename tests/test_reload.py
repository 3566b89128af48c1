"""SIGHUP reloads the config file of a running `bootserver serve`: a good file applies from the next
request, a bad one is refused with its key named in the log and the last good config keeps serving."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import aiohttp
import pytest
from support.config import hostname_site, section
from support.net import free_port
from support.serve import serving
from support.wait import until_async

MAC = "52:54:00:00:00:01"


def site(data: Path, port: int, hostname: str, extra: str = "") -> str:
    return hostname_site(data, MAC, hostname, extra, http=f"127.0.0.1:{port}")


@pytest.fixture
def served(tmp_path: Path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "vmlinuz").write_bytes(b"K" * 1000)
    port = free_port()
    config = tmp_path / "site.toml"
    config.write_text(site(data, port, "before"))
    log = tmp_path / "server.log"
    with serving(config, log) as process:
        yield process, config, data, port, log


async def test_sighup_applies_a_good_file_and_keeps_the_last_good_one_on_a_bad_file(served):
    process, config, data, port, log = served
    url = f"http://127.0.0.1:{port}/boot/52-54-00-00-00-01.ipxe"
    async with aiohttp.ClientSession() as session:

        async def hostname() -> str | None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    text = await response.text()
                    return text.split("hostname=", 1)[1].split()[0] if response.status == 200 else None
            return None

        async def logged(text: str) -> bool:
            return text in log.read_text()

        assert await until_async(hostname, what="serving") == "before"

        # A good file: applied from the next request. The HTTP address needs a restart: kept, and said so.
        config.write_text(site(data, free_port(), "after"))
        process.send_signal(signal.SIGHUP)
        await until_async(lambda: _is(hostname, "after"), what="the new hostname")
        await until_async(lambda: logged("reload: [server] http changed, not applied: restart bootserver for it"),
                          what="the warning about [server] http")

        # A bad file: refused, the key named, the last good configuration serves on.
        config.write_text(site(data, port, "broken", extra='colour = "red"\n'))
        process.send_signal(signal.SIGHUP)
        await until_async(lambda: logged("reload refused"), what="the refusal in the log")
        refusal = next(line for line in log.read_text().splitlines() if "reload refused" in line)
        assert f"{config}: [machines.\"{MAC}\"]: unknown key 'colour'" in refusal, refusal
        assert await hostname() == "after"
        assert process.poll() is None

        # And the next good file is applied again.
        config.write_text(site(data, port, "third"))
        process.send_signal(signal.SIGHUP)
        await until_async(lambda: _is(hostname, "third"), what="the third hostname")
    assert "Traceback" not in log.read_text()


async def _is(read, expected: str) -> bool:
    return await read() == expected


def test_a_new_database_or_replica_name_needs_a_restart(tmp_path: Path):
    from bootserver import config as configuration
    from bootserver.app import needs_restart

    def load(extra: str) -> configuration.Config:
        path = tmp_path / "site.toml"
        path.write_text(section("server", data_dir=tmp_path) + extra)
        return configuration.load(path)

    old = load('replica = "a"\n')
    assert needs_restart(old, load('replica = "a"\npeers = ["http://192.0.2.11:8080"]\n')) == []  # applied live
    assert needs_restart(old, load('replica = "b"\ndatabase = "postgresql://u@db/boot"\n')) == [
        "[server] database", "[server] replica"]  # the TOML key, not the field it is kept in
    assert needs_restart(old, load('replica = "a"\ndatabase = "other.sqlite3"\n')) == ["[server] database"]
