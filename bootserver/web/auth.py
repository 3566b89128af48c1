"""Who may read and write through the pages and the API, and the headers that keep other sites out.

Trust: anyone on the boot network can send anything. Every write needs the API token: [server] api_token, else
one made at first start in data_dir/api_token (0600). Writes must also name this server: Host and Origin are
checked against [server] origins (default: its own names and addresses), which DNS rebinding cannot pass. With
[server] pages = "token", reads need the token too (Bearer, or a cookie set by opening a page with ?token=).
Every response carries SECURITY_HEADERS. (Live streams are capped per client address and in all: stream.py.)
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from ..errors import Forbidden, Unauthorized
from .routes import BOOTER

log = logging.getLogger(__name__)

MADE_TOKENS = web.AppKey("made_tokens", dict)  # data_dir -> the token made there (no [server] api_token)
TOKEN_FILE = "api_token"  # in data_dir, when [server] api_token is not set
COOKIE = "bootserver_pages"  # [server] pages = "token": set by ?token=, proves the token to later reads
# Every response: no page of ours may be framed by another site (clickjacking the buttons), none sniffed.
SECURITY_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
                    "X-Content-Type-Options": "nosniff"}


def setup(app: web.Application) -> None:
    """The security headers on every response, and the API token (after create_app set BOOTER)."""
    app[MADE_TOKENS] = {}
    expected_token(app)  # made now, at start, when there is none: the operator can read it at once
    app.on_response_prepare.append(_security_headers)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def bearer(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def load_or_make_token(data_dir: Path) -> str:
    """The token in data_dir/api_token, made (random, mode 0600) when there is none yet."""
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if len(token) >= 16:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others: made 0600", path)
            path.chmod(0o600)
        return token
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and an older temporary file's mode
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    log.warning("no [server] api_token: made one in %s (mode 0600); API writes and the pages' buttons need it",
                path)
    return token


def expected_token(app: web.Application) -> str:
    """[server] api_token, else the one made in data_dir/api_token (at start, or after a reload removed the key)."""
    server = app[BOOTER].web_settings()
    if server.api_token is not None:
        return server.api_token
    made = app[MADE_TOKENS]
    if server.data_dir not in made:
        made[server.data_dir] = load_or_make_token(server.data_dir)
    return made[server.data_dir]


def _token_is(request: web.Request, presented: str) -> bool:
    # compare_digest: the time taken does not tell how many leading characters were right.
    return hmac.compare_digest(presented.encode(), expected_token(request.app).encode())


def check_token(request: web.Request, presented: str | None) -> None:
    if not presented:
        raise Unauthorized("this server needs its API token ([server] api_token, else the one it made in "
                           "data_dir/api_token): send it as `Authorization: Bearer TOKEN`")
    if not _token_is(request, presented):
        raise Unauthorized("wrong API token (compare with [server] api_token, else data_dir/api_token)")


def _cookie_value(request: web.Request) -> str:
    """What the pages' cookie holds: derived from the token, so that the cookie is no API token itself."""
    return hmac.new(expected_token(request.app).encode(), b"bootserver pages cookie", "sha256").hexdigest()


def check_read(request: web.Request) -> None:
    """[server] pages = "token": a read needs the token as Bearer, or the cookie that ?token= set."""
    if request.app[BOOTER].web_settings().pages != "token":
        return
    presented = bearer(request)
    if presented:
        check_token(request, presented)
        return
    cookie = request.cookies.get(COOKIE, "")
    if not (cookie and hmac.compare_digest(cookie.encode(), _cookie_value(request).encode())):
        raise Unauthorized("this server's pages need its API token ([server] pages = \"token\"; the token is "
                           "[server] api_token, else data_dir/api_token): open a page once with ?token=TOKEN "
                           "(a cookie keeps it), or send `Authorization: Bearer TOKEN`")


def token_query(request: web.Request) -> None:
    """A page opened with ?token=TOKEN ([server] pages = "token"): set the cookie and go to the page without it,
    so that the token leaves the address bar and the history."""
    if request.app[BOOTER].web_settings().pages != "token" or "token" not in request.query:
        return
    if not _token_is(request, request.query["token"]):
        raise Unauthorized("wrong API token in ?token= (compare with [server] api_token, else data_dir/api_token)")
    rest = urlencode([(k, v) for k, v in request.query.items() if k != "token"])
    response = web.HTTPSeeOther(request.rel_url.raw_path + (f"?{rest}" if rest else ""))
    response.set_cookie(COOKIE, _cookie_value(request), httponly=True, samesite="Strict", path="/")
    raise response


def check_same_origin(request: web.Request) -> None:
    """Refuse state-changing requests that a browser sends on behalf of another site (CSRF, DNS rebinding).

    Why Fetch Metadata and Origin rather than a per-session CSRF token: we have no sessions to hang a token
    on, and these headers are set by the browser itself, which a page on another site cannot forge.
    `Sec-Fetch-Site` other than same-origin or none is refused. `Origin`, sent by every browser on a POST,
    must be one of this server's own origins ([server] origins), and so must `Host`: a page of a rebound
    name (evil.example resolving to us) is same-origin to the browser, but neither header names us then.
    A request with no browser headers (curl, scripts) still needs the API token.
    """
    host = request.headers.get("Host", "")
    origins = _allowed_origins(request)
    if _netloc("//" + host) not in {_netloc(o) for o in origins}:
        raise Forbidden(f"Host {host[:100]!r} is not one of this server's names: add its origin to [server] "
                        f"origins (this server answers writes for {', '.join(sorted(origins))})")
    site = request.headers.get("Sec-Fetch-Site")
    # "none": the user did it themselves (typed, bookmarked); "same-site" is another origin still.
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(f"cross-site request refused (Sec-Fetch-Site: {site}): "
                        f"use the buttons on this server's own pages")
    origin = request.headers.get("Origin")
    if origin is not None and _origin(origin) not in origins:
        raise Forbidden(f"cross-origin request refused (Origin {origin[:100]} is not one of this server's "
                        f"origins, [server] origins)")


def _allowed_origins(request: web.Request) -> set[str]:
    """[server] origins, else http:// + each of our names and addresses + the HTTP port (configured, and the one
    this request came in on): public_address, the listening host if specific, loopback, the host name, the
    DHCP server_address."""
    server = request.app[BOOTER].web_settings()
    if server.origins:
        return {_origin(o) for o in server.origins}
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    ports = {p for p in (server.http.port, sockname[1] if sockname else 0) if p}
    hosts = {server.public_address, "127.0.0.1", "localhost", "::1", *_host_names(),
             server.http.host if server.http.host not in ("", "0.0.0.0", "::", "[::]") else None,
             server.dhcp_address}
    return {_origin(f"http://{_bracketed(h)}:{p}") for h in hosts if h for p in ports}


@functools.cache
def _host_names() -> tuple[str, ...]:
    return socket.gethostname(), socket.getfqdn()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _origin(url: str) -> str:
    """scheme://host[:port], lower case, without the scheme's default port."""
    scheme, _, _ = url.rpartition("//")
    return f"{scheme.lower()}//{_netloc(url)}"


def _netloc(url: str) -> str:
    """host[:port] of an origin or //host, without the scheme's default port, lower case."""
    scheme, _, rest = url.rpartition("//")
    netloc = rest.split("/", 1)[0].lower()
    for default in ((":80",) if scheme in ("http:", "") else ()) + ((":443",) if scheme == "https:" else ()):
        netloc = netloc.removesuffix(default)
    return netloc
