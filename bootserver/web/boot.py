"""The boot routes machines use: translate requests into calls on the Booter and its answers into responses.

    GET  /boot.ipxe                 the bootstrap script every machine chains to first
    GET  /boot/{mac}.ipxe           one machine's script (firmware facts in the query string)
    GET  /boot/{mac}/{asset}        a kernel or initrd for that machine (Range, sendfile)
    GET  /boot/{mac}/files/{name}   one of its installer files ([profiles.X.files]), rendered for it
    GET  /boot/{mac}/{token}/config.json       the node's SSH keys and phone-home settings
    GET  /boot/{mac}/{token}/bootserver.cpio   the same, as an initrd overlay
    POST /boot/{mac}/phone-home     the booted node calling back with its token and host key (202)
    GET  /ipxe/{binary}             iPXE binaries, for UEFI HTTP boot
    GET  /secureboot/{binary}       the signed shim and GRUB, for Secure Boot machines' UEFI HTTP boot
    GET  /grub/grub.cfg             what their GRUB reads first; /grub/{mac}.cfg: one machine's (as its script)
    GET  /healthz                   what works and what is missing (`problems`: what needs a person)

Status pages are in pages.py and stream.py, the JSON API (/api/v1) and /metrics in api.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from ..booter import GRUB, OVERLAY_NAME, Booter, Urls
from ..errors import BadRequest
from ..payload import Payload
from .routes import BOOTER, PUBLIC_ADDRESS, get, post

_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def add_routes(app: web.Application) -> None:
    get(app, "/boot.ipxe", bootstrap)
    get(app, "/boot/{mac}.ipxe", machine_script)
    get(app, "/boot/{mac}/{name}", boot_file)
    get(app, "/boot/{mac}/files/{name}", installer_file)  # before the token routes: a file may be "config.json"
    get(app, "/boot/{mac}/{token}/config.json", node_config)
    get(app, "/boot/{mac}/{token}/" + OVERLAY_NAME, overlay)
    post(app, "/boot/{mac}/phone-home", phone_home)
    post(app, "/boot/{mac}/booted", os_booted)
    get(app, "/ipxe/{name}", ipxe_binary)
    get(app, "/secureboot/{name}", secure_boot_binary)
    # Shim fetched over UEFI HTTP boot asks for GRUB at its own URL's directory joined with its built-in name,
    # "\\grubx64.efi" with the backslash made a slash: /secureboot//grubx64.efi.
    get(app, "/secureboot//{name}", secure_boot_binary)
    get(app, "/grub/grub.cfg", grub_bootstrap)
    get(app, "/grub/{mac}.cfg", grub_config)
    get(app, "/healthz", healthz)


def urls(request: web.Request) -> Urls:
    """Our base URL as the machine should use it: the configured public address, else what it asked for."""
    public = request.app[PUBLIC_ADDRESS]
    if public:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 80
        base = f"http://{_host_port(public, port)}"
    else:
        host = request.headers.get("Host", "")
        if not _HOST.match(host):
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            if not sockname:
                raise BadRequest("request has no usable Host header")
            host = _host_port(sockname[0], sockname[1])
        base = f"http://{host}"
    return Urls(files=base, api=base)


def client_address(request: web.Request) -> str | None:
    """The machine's address: the peer's, or through a proxy in `[server] trusted_proxies`, the nearest address
    in its X-Forwarded-For that is not one of them. Anyone else's X-Forwarded-For is ignored: it is just text."""
    peer = request.remote
    trusted = request.app[BOOTER].web_settings().trusted_proxies
    if peer is None or not trusted or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return peer


def _in(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _host_port(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port == 80 else f"{host}:{port}"


def _text(payload: Payload) -> web.Response:
    assert payload.data is not None
    # iPXE is far slower without Content-Length; web.Response always sets it for a body.
    return web.Response(body=payload.data, content_type="text/plain", charset="utf-8")


async def bootstrap(request: web.Request) -> web.Response:
    return _text(request.app[BOOTER].bootstrap(urls(request)))


async def machine_script(request: web.Request) -> web.Response:
    payload = await request.app[BOOTER].machine_script_kept(request.match_info["mac"], dict(request.query),
                                                           urls(request), "http", client_ip=client_address(request))
    return _text(payload)


async def boot_file(request: web.Request) -> web.StreamResponse:
    payload = request.app[BOOTER].boot_file(request.match_info["mac"], request.match_info["name"])
    return await _send_file(request, payload)


async def installer_file(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    payload = booter.installer_file(request.match_info["mac"], request.match_info["name"], urls(request), "http",
                                    client_ip=client_address(request))
    started = time.monotonic()
    response = _text(payload)
    await response.prepare(request)
    await response.write_eof()
    if request.method == "GET":
        booter.file_sent(payload, "http", payload.size, time.monotonic() - started)
    return response


async def ipxe_binary(request: web.Request) -> web.StreamResponse:
    return await _send_file(request, request.app[BOOTER].ipxe_binary(request.match_info["name"],
                                                                     client_ip=client_address(request)))


async def secure_boot_binary(request: web.Request) -> web.StreamResponse:
    return await _send_file(request, request.app[BOOTER].secure_boot_binary(request.match_info["name"],
                                                                           client_ip=client_address(request)))


async def grub_bootstrap(request: web.Request) -> web.Response:
    return _text(request.app[BOOTER].grub_bootstrap())


async def grub_config(request: web.Request) -> web.Response:
    payload = await request.app[BOOTER].machine_script_kept(request.match_info["mac"], {"platform": "efi"},
                                                           urls(request), "http", client_ip=client_address(request),
                                                           loader=GRUB)
    return _text(payload)


async def _send_file(request: web.Request, payload: Payload) -> web.StreamResponse:
    assert payload.path is not None
    return RecordedFileResponse(request.app[BOOTER], payload)


class RecordedFileResponse(web.FileResponse):
    """A FileResponse (sendfile, Range) that records the transfer once it is done or broken."""

    def __init__(self, booter: Booter, payload: Payload) -> None:
        super().__init__(payload.path, headers={"Content-Type": "application/octet-stream"})
        self._booter = booter
        self._payload = payload

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        started = time.monotonic()
        try:
            writer = await super().prepare(request)  # sends the whole body (or the range) before returning
        except (ConnectionError, asyncio.CancelledError) as exc:
            self._booter.file_sent(self._payload, "http", 0, time.monotonic() - started,
                                   error=f"client went away: {exc!r}")
            raise
        if request.method == "GET" and self.status in (200, 206):
            self._booter.file_sent(self._payload, "http", self.content_length or 0, time.monotonic() - started)
        return writer


async def node_config(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    return web.json_response(booter.node_config(request.match_info["mac"], request.match_info["token"],
                                                urls(request)))


async def overlay(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    payload = await booter.overlay_kept(request.match_info["mac"], request.match_info["token"], urls(request))
    assert payload.data is not None
    response = web.Response(body=payload.data, content_type="application/octet-stream")
    await response.prepare(request)
    await response.write_eof()
    booter.file_sent(payload, "http", len(payload.data), 0.0)  # a few hundred bytes: one write
    return response


async def phone_home(request: web.Request) -> web.Response:
    report = await json_report(request, "a phone-home report")
    node = await request.app[BOOTER].phone_home_kept(request.match_info["mac"], report,
                                                     client_ip=client_address(request))
    # 202: accepted; provisioning runs in the background and shows in the machine's events.
    return web.json_response({"mac": node.mac, "state": node.state}, status=202)


async def os_booted(request: web.Request) -> web.Response:
    """The installed OS's first-boot report; 202: its health checks run in the background."""
    report = await json_report(request, "a boot report")
    node = await request.app[BOOTER].os_booted_kept(request.match_info["mac"], report,
                                                    client_ip=client_address(request))
    return web.json_response({"mac": node.mac, "state": node.state}, status=202)


async def json_report(request: web.Request, what: str) -> dict[str, Any]:
    try:
        report = json.loads(await body(request))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body is not JSON") from None
    except RecursionError:  # 60,000 [ in 64 KiB: json.loads recurses once per level
        raise BadRequest(f"body is not {what}: JSON nested too deep") from None
    if not isinstance(report, dict):
        raise BadRequest("body must be a JSON object")
    return report


async def body(request: web.Request) -> bytes:
    """The request body. A client that goes away before sending all of it gets 400 (it sees nothing),
    not a traceback in our log: its going away is no error of ours."""
    try:
        return await request.read()
    except ConnectionResetError:
        raise BadRequest("the request body ended early: the client went away") from None


async def healthz(request: web.Request) -> web.Response:
    """Liveness and what needs a person (Booter.health): `ok` whenever this answers at all."""
    return web.json_response(request.app[BOOTER].health())
