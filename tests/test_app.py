"""The whole server as `bootserver serve` runs it: HTTP and TFTP on real loopback sockets, one store."""

import asyncio
import re
import socket
from pathlib import Path

import aiohttp
import asyncssh
import pytest
from aiohttp import web
from support.wait import until_async

from bootserver.app import CONFIG, HTTP, HTTP_BACKLOG, STORE, http_address, init_app, reload, running, tftp_address
from bootserver.errors import BootserverError


async def curl(*args: str) -> tuple[int, bytes]:
    process = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode, out + err


async def test_boot_paths_over_tftp_match_http(app: web.Application, data_dir: Path):
    tftp = f"tftp://127.0.0.1:{tftp_address(app)[1]}"
    code, bootstrap = await curl(f"{tftp}/boot.ipxe")
    assert code == 0
    assert f"chain --autofree {tftp}/boot/${{mac:hexhyp}}/${{platform}}/${{buildarch}}.ipxe" in bootstrap.decode()

    code, script = await curl(f"{tftp}/boot/52-54-00-00-00-01/efi/x86_64.ipxe")
    assert code == 0
    text = script.decode()
    assert f"kernel {tftp}/boot/52-54-00-00-00-01/vmlinuz" in text
    assert f"bootserver.url=http://127.0.0.1:{http_address(app)[1]} " in text  # the OS calls home over HTTP
    assert "group raft-efi" in text  # the platform fact reached the decision

    code, kernel = await curl("--tftp-blksize", "1468", f"{tftp}/boot/52-54-00-00-00-01/vmlinuz")
    assert code == 0 and kernel == (data_dir / "images" / "vmlinuz").read_bytes()
    store = app[STORE]

    def kernel_events():
        return [e for e in store.events("52:54:00:00:00:01")
                if e.kind == "file-served" and e.detail["file"] == "vmlinuz"]

    (event,) = await until_async(kernel_events)
    assert event.detail["protocol"] == "tftp" and event.detail["bytes"] == len(kernel)
    assert store.node("52:54:00:00:00:01").state == "kernel-served"
    assert store.node("52:54:00:00:00:01").facts == {"platform": "efi", "arch": "x86_64"}


async def test_ipxe_binary_and_tftp_root_files(app: web.Application):
    tftp = f"tftp://127.0.0.1:{tftp_address(app)[1]}"
    code, binary = await curl(f"{tftp}/undionly.kpxe")
    assert code == 0 and binary == (app[CONFIG].server.ipxe_dir / "undionly.kpxe").read_bytes()
    (app[CONFIG].server.tftp_root / "pxelinux.cfg").mkdir()
    (app[CONFIG].server.tftp_root / "pxelinux.cfg" / "default").write_text("DEFAULT local\n")
    code, body = await curl(f"{tftp}/pxelinux.cfg/default")
    assert code == 0 and body == b"DEFAULT local\n"


# curl's exit codes for TFTP ERRORs: 68 file not found (code 1), 71 illegal operation (code 4, a malformed MAC).
@pytest.mark.parametrize(("name", "exit_code"), [("../bootserver.sqlite3", 68), ("/etc/passwd", 68),
                                                 ("boot/zz/vmlinuz", 71), ("nope", 68)])
async def test_tftp_refusals_keep_the_server_serving(app: web.Application, name: str, exit_code: int):
    tftp = f"tftp://127.0.0.1:{tftp_address(app)[1]}"
    code, _ = await curl(f"{tftp}/{name}")
    assert code == exit_code
    code, _ = await curl(f"{tftp}/boot.ipxe")
    assert code == 0


async def test_http_listens_with_room_for_a_rack_calling_at_once(app: web.Application):
    # For a listening socket, ss shows the accept backlog as Send-Q. aiohttp's default, 128, made 1,000
    # machines phoning home together wait for resent SYNs (benchmarks/bench_burst.py: p99 2.5 s).
    proc = await asyncio.create_subprocess_exec("ss", "-Hltn", f"sport = :{http_address(app)[1]}",
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    [line] = out.decode().splitlines()
    assert int(line.split()[2]) == min(HTTP_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))


async def test_http_and_tftp_share_one_store(app: web.Application):
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{http_address(app)[1]}/boot/52-54-00-00-00-02.ipxe?platform=pcbios"
        async with session.get(url) as response:
            assert response.status == 200
    code, _ = await curl(f"tftp://127.0.0.1:{tftp_address(app)[1]}/boot/52-54-00-00-00-02/initrd")
    assert code == 0
    events = await until_async(lambda: len(app[STORE].events("52:54:00:00:00:02")) == 2
                              and app[STORE].events("52:54:00:00:00:02"))
    assert [(e.kind, e.detail.get("transport") or e.detail.get("protocol")) for e in events] == [
        ("script-served", "http"), ("file-served", "tftp")]


async def test_slow_or_idle_clients_are_closed(config, monkeypatch):
    """A socket that never completes its request headers is closed after the keep-alive timeout
    (aiohttp arms it at connect and data does not re-arm it), while other requests are served."""
    monkeypatch.setattr("bootserver.app.KEEPALIVE_TIMEOUT", 1.0)
    app = init_app(config)
    async with running(app):
        port = http_address(app)[1]
        idle = await asyncio.open_connection("127.0.0.1", port)
        slow = await asyncio.open_connection("127.0.0.1", port)
        slow[1].write(b"GET /boot.ipxe HTTP/1.1\r\n")
        closed_while_sending = False
        for _ in range(20):  # one header line every 0.2 s for 4 s, never the blank line that ends them
            slow[1].write(b"X-Slow: 1\r\n")
            await asyncio.sleep(0.2)
            if closed_while_sending := await _closed(slow[0]):
                break
        # Trickling data did not keep it open (a timer re-armed by data would only fire after we stop).
        assert closed_while_sending
        assert await asyncio.wait_for(idle[0].read(), 5) == b""
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/boot.ipxe") as r:
            assert r.status == 200


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.01) == b""
    except TimeoutError:
        return False


async def test_token_of_a_script_fetched_over_tftp_is_bound_to_that_address(app: web.Application):
    tftp = f"tftp://127.0.0.1:{tftp_address(app)[1]}"
    code, script = await curl("--interface", "127.0.0.3", f"{tftp}/boot/52-54-00-00-00-01/pcbios/x86_64.ipxe")
    assert code == 0, script
    token = re.search(rb"bootserver\.token=(\S+)", script)[1].decode()
    host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    body = {"token": token, "ip": "127.0.0.3", "host_key": host_key}
    url = f"http://127.0.0.1:{http_address(app)[1]}/boot/52-54-00-00-00-01/phone-home"
    for local, status in (("127.0.0.1", 403), ("127.0.0.3", 202)):
        connector = aiohttp.TCPConnector(local_addr=(local, 0))
        async with aiohttp.ClientSession(connector=connector) as session, session.post(url, json=body) as r:
            assert r.status == status, (local, await r.text())


async def test_a_part_that_fails_to_start_closes_the_parts_opened_before_it(tmp_path: Path):
    """DHCP starts last: its port in use, the TFTP and HTTP sockets, the provisioner's tasks and the store
    opened before it are all closed again, and its own error is the one raised."""
    from bootserver import config as configuration
    from bootserver.dhcp import DhcpStartError

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", 0))
        server = {"http": "127.0.0.1:0", "tftp": "127.0.0.1:0", "data_dir": str(tmp_path)}
        dhcp = {"mode": "proxy", "server_address": "127.0.0.1", "port": holder.getsockname()[1]}
        config = configuration.parse({"server": server, "dhcp": dhcp})
        app = init_app(config)
        with pytest.raises(DhcpStartError, match="another DHCP server"):
            async with running(app):
                pytest.fail("started with the DHCP port held by another socket")
    assert app[HTTP].addresses == []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(tftp_address(app))  # free again
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []  # the provisioner's loops
    with pytest.raises(Exception, match="closed"):
        app[STORE].node("52:54:00:00:00:01")


def test_addresses_before_the_start_say_how_to_start(config):
    with pytest.raises(BootserverError, match=r"async with running\(app\)"):
        http_address(init_app(config))


async def test_reload_applies_a_good_file_and_keeps_what_needs_a_restart(config_file: Path, caplog):
    from bootserver import config as configuration

    app = init_app(configuration.load(config_file))
    async with running(app):
        url = f"http://127.0.0.1:{http_address(app)[1]}/boot/52-54-00-00-00-01.ipxe"
        text = config_file.read_text()
        config_file.write_text(text.replace('hostname = "node1"', 'hostname = "renamed"')
                               .replace('http = "127.0.0.1:0"', 'http = "127.0.0.1:1"'))
        assert reload(app)
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert "hostname=renamed" in await response.text()  # served on the same socket: http was kept
        assert "reload: [server] http changed, not applied" in caplog.text
        config_file.write_text(text.replace("[assets]", "[assets]\ncolour = 1"))
        assert not reload(app)
        assert "reload refused" in caplog.text
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert "hostname=renamed" in await response.text()  # the last good one serves on
