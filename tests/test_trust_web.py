"""Trust on the boot network: anyone on it can send any HTTP request. Each test runs a served instance on
127.0.0.1 and talks to it with a real HTTP client."""

import contextlib
import dataclasses
import os
import socket
import stat
from pathlib import Path

import aiohttp
import pytest
from support.config import server_section
from support.http import api_token, bearer
from support.net import free_port
from support.serve import answers, serving
from support.wait import until, until_async

from bootserver.app import STORE, http_address, init_app, running

MAC = "52:54:00:00:00:01"
URL_MAC = "52-54-00-00-00-01"


@contextlib.asynccontextmanager
async def served(config, **changes):
    """The real server (app.init_app: a TCP socket on 127.0.0.1) under `config` with [server] `changes`."""
    server = dataclasses.replace(config.server, public_address="127.0.0.1", **changes)
    app = init_app(dataclasses.replace(config, server=server))
    async with running(app):
        yield app, f"http://127.0.0.1:{http_address(app)[1]}"


async def known_machine(http: aiohttp.ClientSession, base: str) -> None:
    """A machine's first request creates it."""
    async with http.get(f"{base}/boot/{URL_MAC}.ipxe") as response:
        assert response.status == 200


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- finding 7: writes need a credential by default ----------------------------------------------------------


async def test_writes_need_the_token_the_server_made(config):
    """finding 7: with no [server] api_token, the server makes one at start (data_dir/api_token, 0600) and API
    writes and the pages' buttons need it; a restart keeps it."""
    assert config.server.api_token is None
    path = config.server.data_dir / "api_token"
    async with served(config) as (app, base), aiohttp.ClientSession() as http:
        await known_machine(http, base)
        token = path.read_text().strip()
        assert len(token) >= 40 and mode(path) == 0o600
        url = f"{base}/api/v1/machines/{MAC}/reprovision"
        async with http.post(url) as response:
            assert response.status == 401 and "data_dir/api_token" in (await response.json())["error"]
        async with http.post(url, headers={"Authorization": "Bearer " + token[:-1] + "x"}) as response:
            assert response.status == 401
        async with http.post(f"{base}/machines/{MAC}/boot-from-disk", allow_redirects=False) as response:
            assert response.status == 401
        assert not app[STORE].node(MAC).reprovision  # nothing happened
        async with http.post(url, headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200 and (await response.json())["reprovision"] is True
        async with http.post(f"{base}/machines/{MAC}/boot-from-disk", data={"api_token": token},
                             allow_redirects=False) as response:
            assert response.status == 303 and app[STORE].node(MAC).state == "deployed"
    async with served(config) as (app, base), aiohttp.ClientSession() as http:
        assert path.read_text().strip() == token  # the same token after a restart
        async with http.post(f"{base}/api/v1/machines/{MAC}/reprovision", headers=bearer(config)) as response:
            assert response.status == 200


def test_token_file_is_0600_under_a_permissive_umask(tmp_path):
    """finding 7: the made token is 0600 whatever the umask; an existing one readable by others is tightened."""
    from bootserver.web.auth import load_or_make_token

    old = os.umask(0)
    try:
        token = load_or_make_token(tmp_path / "data")
    finally:
        os.umask(old)
    path = tmp_path / "data" / "api_token"
    assert mode(path) == 0o600 and path.read_text() == token + "\n"
    path.chmod(0o644)
    assert load_or_make_token(tmp_path / "data") == token and mode(path) == 0o600


# -- same origin against an allow-list -------------------------------------------------------------------------


async def test_dns_rebinding_origin_and_host_are_refused(config):
    """finding 7 (same origin): a page of a rebound name (evil.example resolving to us) is same-origin to the
    browser; its Host and Origin name evil.example, not us, and are refused even with the token."""
    async with served(config) as (app, base), aiohttp.ClientSession() as http:
        await known_machine(http, base)
        port = http_address(app)[1]
        url = f"{base}/api/v1/machines/{MAC}/reprovision"
        for headers in ({"Host": f"evil.example:{port}"},
                        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                         "Sec-Fetch-Site": "same-origin"},
                        {"Origin": f"http://evil.example:{port}", "Sec-Fetch-Site": "same-origin"},
                        {"Origin": f"http://127.0.0.1:{port + 1}"}):
            async with http.post(url, headers={**headers, **bearer(config)}) as response:
                assert response.status == 403, headers
                assert "origins" in (await response.json())["error"]
            async with http.post(f"{base}/machines/{MAC}/reprovision", headers=headers,
                                 data={"api_token": api_token(config)}, allow_redirects=False) as response:
                assert response.status == 403, headers
        assert not app[STORE].node(MAC).reprovision
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"{socket.gethostname()}:{port}"):
            async with http.post(url, headers={"Host": host, "Origin": f"http://{host}",
                                               **bearer(config)}) as response:
                assert response.status == 200, host
    async with served(config, origins=("http://boot.example:8080",)) as (app, base), \
            aiohttp.ClientSession() as http:
        url = f"{base}/api/v1/machines/{MAC}/boot-from-disk"
        async with http.post(url, headers=bearer(config)) as response:  # Host 127.0.0.1: not configured
            assert response.status == 403
        async with http.post(url, headers={"Host": "boot.example:8080", "Origin": "http://boot.example:8080",
                                           **bearer(config)}) as response:
            assert response.status == 200


# -- frames ----------------------------------------------------------------------------------------------------


async def test_pages_and_error_pages_may_not_be_framed(config):
    """finding 7 (clickjacking): every HTML page, error pages too, forbids framing and sniffing."""
    async with served(config) as (app, base), aiohttp.ClientSession() as http:
        await known_machine(http, base)
        for path, status in (("/", 200), (f"/machines/{MAC}", 200), ("/machines/52:54:00:00:00:77", 404),
                             ("/machines/not-a-mac", 400), ("/no/such/page", 404)):
            async with http.get(base + path) as response:
                assert response.status == status, path
                assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
                assert response.headers["X-Frame-Options"] == "DENY", path
                assert response.headers["X-Content-Type-Options"] == "nosniff", path


# -- finding 8: live stream limits -------------------------------------------------------------------------------


async def test_live_streams_are_capped_per_client_and_in_all(config):
    """finding 8: beyond [server] streams_per_client from one address, or streams_total in all, a stream is
    refused with 429, a message and Retry-After; a closed stream frees its place."""
    async with served(config, streams_per_client=2, streams_total=3) as (app, base), \
            aiohttp.ClientSession() as first, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as second:
        await known_machine(first, base)
        open_streams = [await first.get(f"{base}/stream"), await first.get(f"{base}/machines/{MAC}/stream")]
        assert [s.status for s in open_streams] == [200, 200]
        async with first.get(f"{base}/stream") as refused:
            assert refused.status == 429 and refused.headers["Retry-After"].isdigit()
            assert "streams_per_client" in await refused.text()
        open_streams.append(await second.get(f"{base}/stream"))  # another address: its own two, but...
        assert open_streams[-1].status == 200
        async with second.get(f"{base}/machines/{MAC}/stream") as refused:
            assert refused.status == 429 and refused.headers["Retry-After"].isdigit()
            assert "streams_total" in await refused.text()  # ...three in all
        open_streams.pop(0).close()

        async def admitted() -> bool:
            async with second.get(f"{base}/stream") as response:
                return response.status == 200

        await until_async(admitted, what="a closed stream to free its place", interval=0.1)
        for stream in open_streams:
            stream.close()


# -- finding 9: no 500 from input --------------------------------------------------------------------------------

SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says yes, int() says no
TWENTY_DIGITS = "9" * 20  # more than SQLite's INTEGER holds


@pytest.mark.parametrize(("method", "path", "headers", "body", "message"), [
    ("POST", f"/boot/{URL_MAC}/phone-home", {}, b"[" * 60_000, "nested too deep"),
    ("GET", f"/api/v1/machines/{MAC}/events?after={SUPERSCRIPT_TWO}", {}, None, "whole number"),
    ("GET", f"/api/v1/machines/{MAC}/events?limit={SUPERSCRIPT_TWO}", {}, None, "whole number"),
    ("GET", f"/api/v1/machines/{MAC}/events?after={TWENTY_DIGITS}", {}, None, "at most"),
    ("GET", f"/api/v1/machines/{MAC}/events?limit={'9' * 5000}", {}, None, "at most"),
    ("GET", f"/api/v1/machines?limit={SUPERSCRIPT_TWO}", {}, None, "whole number"),
    ("GET", f"/machines/{MAC}/stream", {"Last-Event-ID": SUPERSCRIPT_TWO}, None, "event id"),
    ("GET", f"/stream?after={SUPERSCRIPT_TWO}", {}, None, "event id"),
    ("GET", f"/stream?after={TWENTY_DIGITS}", {}, None, "at most"),
    ("GET", f"/machines/{MAC}/stream?after={TWENTY_DIGITS}", {}, None, "at most"),
])
async def test_hostile_numbers_and_nesting_are_400_with_a_message(config, method, path, headers, body, message):
    """finding 9: each of these was a 500 (RecursionError, ValueError, OverflowError); now 400 saying why."""
    async with served(config) as (app, base), aiohttp.ClientSession() as http:
        await known_machine(http, base)
        async with http.request(method, base + path, headers=headers, data=body) as response:
            assert response.status == 400, await response.text()
            assert message in await response.text()
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200


# -- finding 11: file modes --------------------------------------------------------------------------------------


async def test_serve_makes_its_files_private_under_a_permissive_umask(tmp_path):
    """finding 11: `bootserver serve` sets umask 077: its store, the store's WAL, its keys and the token file
    are not readable by group or others, though it was started with umask 022."""
    port, data = free_port(), tmp_path / "data"
    config = tmp_path / "site.toml"
    config.write_text(server_section(data, http=f"127.0.0.1:{port}"))
    with serving(config, tmp_path / "server.log", preexec_fn=lambda: os.umask(0o022)):
        # the first boot script: the store records it (and its WAL holds it)
        until(lambda: answers(f"http://127.0.0.1:{port}/boot/{URL_MAC}.ipxe"), 20, what="the first boot script")
        store = data / "bootserver.sqlite3"
        for path in (store, store.with_name(store.name + "-wal"), data / "api_token", data / "keys" / "ca.key"):
            assert path.is_file(), path
        for path in (p for p in data.rglob("*") if p.is_file()):  # keys/ and everything else too
            assert mode(path) & 0o077 == 0, f"{path}: {mode(path):04o}"


# -- [server] pages = "token" -------------------------------------------------------------------------------------


async def test_pages_token_mode_guards_reads_but_not_booting(config):
    """finding 7 (reads): with [server] pages = "token", the pages, API reads, live streams and /metrics need the
    token (Bearer, or the cookie that ?token= sets); /healthz, the boot routes and the OpenAPI description do not."""
    async with served(config, pages="token") as (app, base), \
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await known_machine(http, base)
        guarded = ["/", f"/machines/{MAC}", "/api/v1/machines", f"/api/v1/machines/{MAC}/events", "/stream",
                   f"/machines/{MAC}/stream", "/metrics"]
        for path in guarded:
            async with http.get(base + path) as response:
                assert response.status == 401, path
                assert "pages" in await response.text(), path
            async with http.get(base + path, headers=bearer(config)) as response:
                assert response.status == 200, path
        for path in ("/healthz", "/boot.ipxe", f"/boot/{URL_MAC}.ipxe", "/api/v1/openapi.json"):
            async with http.get(base + path) as response:
                assert response.status == 200, path
        async with http.get(f"{base}/?token=wrong-token-0123456789", allow_redirects=False) as response:
            assert response.status == 401 and "Set-Cookie" not in response.headers
        # A browser: a link with ?token= once, then the cookie (HttpOnly, SameSite=Strict) for every read.
        token = api_token(config)
        async with http.get(f"{base}/machines/{MAC}?token={token}", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == f"/machines/{MAC}"
            cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
        for path in guarded:
            async with http.get(base + path) as response:
                assert response.status == 200, path
        # The cookie is not a credential for writes: those still need the token itself.
        async with http.post(f"{base}/api/v1/machines/{MAC}/reprovision") as response:
            assert response.status == 401


@pytest.mark.parametrize(("key", "value"), [("pages", "private"), ("origins", "http://boot.example"),
                                            ("origins", ["boot.example:8080"]), ("origins", ["http://a/path"]),
                                            ("streams_per_client", 0), ("streams_total", "many")])
def test_trust_keys_are_checked(tmp_path, key, value):
    """The new [server] keys (findings 7 and 8) refuse what they cannot mean, naming the key."""
    from bootserver.config import parse
    from bootserver.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        parse({"server": {"data_dir": str(tmp_path), key: value}})
    server = parse({"server": {"data_dir": str(tmp_path), "origins": ["HTTPS://Boot.Example/"]}}).server
    assert (server.pages, server.origins, server.streams_per_client, server.streams_total) == \
        ("public", ("https://boot.example",), 8, 100)
