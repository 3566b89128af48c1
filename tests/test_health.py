"""Health checks against a real sshd (tests/sshd.py) and a real HTTP server, both on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from aiohttp import web
from support.sshd import TestSSHServer, ssh_server

from bootserver.provision.health import HealthChecks, HealthFailed, wait_until_healthy
from bootserver.provision.pki import ServerKeys
from bootserver.provision.ssh import HostKeyMismatch, NodeAccess


@pytest.fixture
def keys(tmp_path: Path) -> ServerKeys:
    return ServerKeys.load_or_create(tmp_path / "keys")


@pytest.fixture
async def sshd(keys: ServerKeys) -> AsyncIterator[TestSSHServer]:
    async with ssh_server(keys.ssh_public) as server:
        yield server


@pytest.fixture
async def peers_port() -> AsyncIterator[int]:
    async def peers(request: web.Request) -> web.Response:
        return web.json_response({"peers": []})

    app = web.Application()
    app.router.add_get("/peers", peers)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


def access(server: TestSSHServer, host_key: str | None = None) -> NodeAccess:
    return NodeAccess("127.0.0.1", server.port, host_key or server.host_key_line)


async def test_passing_checks_make_the_machine_healthy(sshd, keys, peers_port):
    events: list = []
    checks = HealthChecks(commands=("true",), urls=(f"http://{{ip}}:{peers_port}/peers",), minutes=0.1,
                          interval=0.1)
    results = await wait_until_healthy(access(sshd), keys, checks, lambda k, d: events.append((k, d)))
    assert results == {"true": "ok", f"http://127.0.0.1:{peers_port}/peers": "ok"}
    assert [k for k, _ in events if k.startswith("health")] == ["health-passed"]


async def test_a_check_that_passes_later_is_waited_for_and_the_wait_is_recorded_once(sshd, keys, tmp_path):
    flag = tmp_path / "service-up"
    events: list = []
    checks = HealthChecks(commands=(f"test -e {flag}",), minutes=0.5, interval=0.1)
    waiting = asyncio.create_task(wait_until_healthy(access(sshd), keys, checks, lambda k, d: events.append((k, d))))
    await asyncio.sleep(1.0)
    flag.touch()
    await asyncio.wait_for(waiting, 10)
    kinds = [k for k, _ in events if k.startswith("health")]
    assert kinds == ["health-waiting", "health-passed"]
    # Only the first round's commands are in the timeline, not one per retry.
    assert len([1 for k, _ in events if k == "command"]) == 1


async def test_checks_that_never_pass_fail_naming_each_check(sshd, keys):
    checks = HealthChecks(commands=("echo raftd is inactive >&2; exit 3",), urls=("http://{ip}:9/peers",),
                          minutes=0.02, interval=0.2)
    with pytest.raises(HealthFailed) as failed:
        await wait_until_healthy(access(sshd), keys, checks, lambda k, d: None)
    message = str(failed.value)
    assert "exit 3: raftd is inactive" in message
    assert "http://127.0.0.1:9/peers: unreachable" in message


async def test_a_node_with_another_host_key_fails_at_once(sshd, keys):
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    checks = HealthChecks(commands=("true",), minutes=1, interval=0.1)
    with pytest.raises(HostKeyMismatch):
        await asyncio.wait_for(wait_until_healthy(access(sshd, other), keys, checks, lambda k, d: None), 10)
