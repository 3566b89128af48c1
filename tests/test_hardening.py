"""Hostile HTTP input against the whole server: each case gets a clear answer and the server keeps serving."""

import asyncio
import resource

import aiohttp
import pytest
from aiohttp import web

from bootserver.app import http_address, init_app, running


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def still_serving(app: web.Application) -> None:
    url = f"http://127.0.0.1:{http_address(app)[1]}/boot.ipxe"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200


@pytest.mark.parametrize("path", [
    "/boot/52-54-00-00-00-01/%2e%2e/%2e%2e/bootserver.sqlite3",
    "/boot/52-54-00-00-00-01/..%2f..%2fbootserver.sqlite3",
    "/boot/52-54-00-00-00-01/vmlinuz%00.txt",
    "/boot/52-54-00-00-00-01%00/vmlinuz",
    "/ipxe/..%2f..%2f..%2fetc%2fpasswd",
    "/boot/%2e%2e%2f%2e%2e%2fetc%2fpasswd.ipxe",
])
async def test_traversal_and_nul_never_reach_a_file(app, path):
    answer = await raw(http_address(app)[1], f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status = int(answer.split()[1])
    assert status in (400, 403, 404), answer[:200]
    assert b"SQLite format" not in answer and b"root:" not in answer
    await still_serving(app)


async def test_oversized_header_is_400(app):
    answer = await raw(http_address(app)[1], b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000
                       + b"\r\nConnection: close\r\n\r\n")
    assert answer.split()[1] == b"400", answer[:100]
    await still_serving(app)


@pytest.mark.parametrize(("request_line", "status"), [
    (b"GET /boot.ipxe", b"417"),  # a route of ours
    (b"GET /no/such/path", b"417"),  # no route: still our Expect handler, not aiohttp's (which answered 500)
    (b"POST /boot/52-54-00-00-00-01/phone-home", b"417"),
])
async def test_expect_header_that_is_not_utf8_is_417(app, request_line, status):
    answer = await raw(http_address(app)[1], request_line + b" HTTP/1.1\r\nHost: x\r\nExpect: \xff\xfe-continue\r\n"
                       b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert answer.split()[1] == status, answer[:200]
    await still_serving(app)


async def test_expect_100_continue_is_honoured(app):
    url = f"http://127.0.0.1:{http_address(app)[1]}/boot/52-54-00-00-00-01/phone-home"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{}", expect100=True) as response:
        assert response.status == 401  # the body was read after "100 Continue", and holds no token


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/no/such/path", 404), ("POST", "/healthz", 405), ("DELETE", "/boot.ipxe", 405),
])
async def test_unrouted_paths_are_404_or_405(app, method, path, status):
    url = f"http://127.0.0.1:{http_address(app)[1]}{path}"
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        assert response.status == status


async def test_ten_megabyte_body_is_413(app):
    url = f"http://127.0.0.1:{http_address(app)[1]}/boot/52-54-00-00-00-01/phone-home"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{" * (10 << 20)) as response:
        assert response.status == 413
    await still_serving(app)


async def test_a_thousand_slowloris_sockets_are_closed_and_others_served(config, monkeypatch):
    monkeypatch.setattr("bootserver.app.KEEPALIVE_TIMEOUT", 2.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # 1,000 sockets, both ends here
    app = init_app(config)
    sockets = []
    try:
        async with running(app):
            try:
                for _ in range(1000):
                    reader, writer = await asyncio.open_connection("127.0.0.1", http_address(app)[1])
                    writer.write(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n")  # headers never finished
                    sockets.append((reader, writer))
                await still_serving(app)  # a legitimate request among them is answered
                closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 15) for r, _ in sockets))
                assert all(data == b"" for data in closed)  # every one closed by the server, none answered
                await still_serving(app)
            finally:
                for _, writer in sockets:
                    writer.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
