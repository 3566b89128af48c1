"""Status pages for people, their JSON twins for programs, live updates and metrics.

    GET  /                                   every machine: state, progress; ?state= filters
    GET  /stream                             server-sent events: something happened (the overview refreshes)
    GET  /machines/{mac}                     one machine: why it boots what it boots, its timeline
    GET  /machines/{mac}/stream              server-sent events: that machine's new events, rendered
    POST /machines/{mac}/reprovision         the page's buttons (same-origin only; the API token, typed)
    POST /machines/{mac}/boot-from-disk
    GET  /api/v1/machines[?state=]           the same data as JSON
    GET  /api/v1/machines/{mac}
    GET  /api/v1/machines/{mac}/events?after=
    POST /api/v1/machines/{mac}/reprovision, /api/v1/machines/{mac}/boot-from-disk
    GET  /api/v1/openapi.json                OpenAPI 3 description of /api/v1
    GET  /metrics                            Prometheus: machines by state, bytes served, step durations

Live updates poll the store (every POLL_SECONDS) rather than listen in memory, so that events
recorded by another process (`bootserver reprovision` from a shell) show up too.

Trust: anyone on the boot network can send anything. Every write needs the API token: [server] api_token, else
one made at first start in data_dir/api_token (0600). Writes must also name this server: Host and Origin are
checked against [server] origins (default: its own names and addresses), which DNS rebinding cannot pass. With
[server] pages = "token", reads need the token too (Bearer, or a cookie set by opening a page with ?token=).
Live streams are capped per client address and in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from . import metrics, openapi
from .booter import Booter
from .errors import BadRequest, BootserverError, Forbidden, NotFound, TooManyRequests, Unauthorized
from .http import BOOTER, get, post
from .mac import canonical_mac
from .status import Progress, clock, event_json, machine_view, size
from .store import Event, Node

log = logging.getLogger(__name__)

PAGES_DIR = Path(__file__).resolve().parent / "pages"
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0  # a comment line this often shows a dead client (and keeps proxies from timing out)
PAGE_MACHINES = 500  # machines per page of the API's list (which may ask for up to 1,000): a big site stays fast
# Rows per page of the HTML list: every open list re-fetches its page on new events (at most once a second), and
# 500 rows were 233 KB and ~45 ms of the server's time per fetch with 10,000 machines.
PAGE_ROWS = 250
PAGE_EVENTS = 500  # a machine page shows this many of its newest events; the API pages through all
BATCH = 100  # events per poll of a stream

PAGES = web.AppKey("pages", jinja2.Environment)
STOPPING = web.AppKey("stopping", asyncio.Event)
STREAMS = web.AppKey("streams", set)
STREAM_CLIENTS = web.AppKey("stream_clients", Counter)  # open streams by client address
METRICS = web.AppKey("metrics", CollectorRegistry)
MADE_TOKENS = web.AppKey("made_tokens", dict)  # data_dir -> the token made there (no [server] api_token)
TOKEN_FILE = "api_token"  # in data_dir, when [server] api_token is not set
COOKIE = "bootserver_pages"  # [server] pages = "token": set by ?token=, proves the token to later reads
RETRY_STREAM_SECONDS = 10
MAX_ID = 2**63 - 1  # event ids and limits: what SQLite's INTEGER (and PostgreSQL's bigint) holds
# Every response: no page of ours may be framed by another site (clickjacking the buttons), none sniffed.
SECURITY_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
                    "X-Content-Type-Options": "nosniff"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    """Add the status pages, API and metrics to the HTTP app (after http.create_app set BOOTER)."""
    app[PAGES] = _environment()
    app[STOPPING] = asyncio.Event()
    app[STREAMS] = set()
    app[STREAM_CLIENTS] = Counter()
    app[METRICS] = metrics.registry(app[BOOTER].store)
    app[MADE_TOKENS] = {}
    _expected_token(app)  # made now, at start, when there is none: the operator can read it at once
    app.on_shutdown.append(_stop_streams)
    app.on_response_prepare.append(_security_headers)
    get(app, "/", _page(index))
    get(app, "/stream", _page(index_stream))
    get(app, "/machines/{mac}", _page(machine_page))
    get(app, "/machines/{mac}/stream", _page(machine_stream))
    post(app, "/machines/{mac}/reprovision", _page(_form_action(Booter.reprovision)))
    post(app, "/machines/{mac}/boot-from-disk", _page(_form_action(Booter.boot_from_disk)))
    get(app, "/api/v1/machines", _api(api_machines))
    get(app, "/api/v1/machines/{mac}", _api(api_machine))
    get(app, "/api/v1/machines/{mac}/events", _api(api_events))
    post(app, "/api/v1/machines/{mac}/reprovision", _api(_api_action(Booter.reprovision)))
    post(app, "/api/v1/machines/{mac}/boot-from-disk", _api(_api_action(Booter.boot_from_disk)))
    post(app, "/machines/{mac}/approve", _page(_form_action(Booter.approve)))
    post(app, "/api/v1/machines/{mac}/approve", _api(_api_approve))
    # Open even with an API token: a client needs it to learn that (and how) it must authenticate.
    get(app, "/api/v1/openapi.json", openapi_json)
    get(app, "/metrics", _api(metrics_page))


def _environment() -> jinja2.Environment:
    # autoescape: hostnames, DHCP strings and command output come from machines and may hold markup.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PAGES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(clock=clock, size=size, cells=progress_cells)
    return env


def progress_cells(p: Progress) -> str:
    """A progress bar's cells, one per step, the done ones lit. Built here from two numbers: a loop in the
    template escaped every cell and took most of the time of a 500-machine list."""
    return '<i class="on"></i>' * p.done + '<i class=""></i>' * (p.total - p.done)  # markup: used with |safe


def _render(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    text = request.app[PAGES].get_template(name).render(**context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def _json(body: object, status: int = 200) -> web.Response:
    # No indent: indenting makes json use its pure-Python encoder, half the time of a 500-machine list.
    return web.json_response(body, status=status, dumps=json.dumps)


# -- errors, authentication and cross-site requests -------------------------------------------------

_STATUS = ((TooManyRequests, 429, "Too many requests"), (BadRequest, 400, "Bad request"),
           (Unauthorized, 401, "API token needed"), (Forbidden, 403, "Refused"), (NotFound, 404, "Not found"))


def _status(exc: BootserverError, path: str) -> tuple[int, str]:
    for cls, status, title in _STATUS:
        if isinstance(exc, cls):
            return status, title
    log.exception("request %s failed", path)
    return 500, "Server error"


def _page(handler: Handler) -> Handler:
    """Errors become an HTML page that says what was wrong (a malformed MAC, an unknown machine).
    Reads need the token when [server] pages = "token"; ?token= sets the cookie that proves it from then on."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            if request.method in ("GET", "HEAD"):
                _token_query(request)
                _check_read(request)
            return await handler(request)
        except BootserverError as exc:
            status, title = _status(exc, request.path)
            return _render(request, "error.html.j2", status=status, title=title, message=str(exc))
    return wrapped


def _api(handler: Handler) -> Handler:
    """Every /api/v1 call and /metrics: the API token for writes (and for reads when [server] pages = "token");
    errors as JSON."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            if request.method in ("GET", "HEAD"):
                _check_read(request)
            else:
                _check_token(request, _bearer(request))
                _check_same_origin(request)
            return await handler(request)
        except BootserverError as exc:
            status, _ = _status(exc, request.path)
            response = _json({"error": str(exc), "status": status}, status)
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="bootserver"'
            return response
    return wrapped


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _bearer(request: web.Request) -> str | None:
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


def _expected_token(app: web.Application) -> str:
    """[server] api_token, else the one made in data_dir/api_token (at start, or after a reload removed the key)."""
    server = app[BOOTER].config.server
    if server.api_token is not None:
        return server.api_token
    made = app[MADE_TOKENS]
    if server.data_dir not in made:
        made[server.data_dir] = load_or_make_token(server.data_dir)
    return made[server.data_dir]


def _token_is(request: web.Request, presented: str) -> bool:
    # compare_digest: the time taken does not tell how many leading characters were right.
    return hmac.compare_digest(presented.encode(), _expected_token(request.app).encode())


def _check_token(request: web.Request, presented: str | None) -> None:
    if not presented:
        raise Unauthorized("this server needs its API token ([server] api_token, else the one it made in "
                           "data_dir/api_token): send it as `Authorization: Bearer TOKEN`")
    if not _token_is(request, presented):
        raise Unauthorized("wrong API token (compare with [server] api_token, else data_dir/api_token)")


def _cookie_value(request: web.Request) -> str:
    """What the pages' cookie holds: derived from the token, so that the cookie is no API token itself."""
    return hmac.new(_expected_token(request.app).encode(), b"bootserver pages cookie", "sha256").hexdigest()


def _check_read(request: web.Request) -> None:
    """[server] pages = "token": a read needs the token as Bearer, or the cookie that ?token= set."""
    if request.app[BOOTER].config.server.pages != "token":
        return
    presented = _bearer(request)
    if presented:
        _check_token(request, presented)
        return
    cookie = request.cookies.get(COOKIE, "")
    if not (cookie and hmac.compare_digest(cookie.encode(), _cookie_value(request).encode())):
        raise Unauthorized("this server's pages need its API token ([server] pages = \"token\"; the token is "
                           "[server] api_token, else data_dir/api_token): open a page once with ?token=TOKEN "
                           "(a cookie keeps it), or send `Authorization: Bearer TOKEN`")


def _token_query(request: web.Request) -> None:
    """A page opened with ?token=TOKEN ([server] pages = "token"): set the cookie and go to the page without it,
    so that the token leaves the address bar and the history."""
    if request.app[BOOTER].config.server.pages != "token" or "token" not in request.query:
        return
    if not _token_is(request, request.query["token"]):
        raise Unauthorized("wrong API token in ?token= (compare with [server] api_token, else data_dir/api_token)")
    rest = urlencode([(k, v) for k, v in request.query.items() if k != "token"])
    response = web.HTTPSeeOther(request.rel_url.raw_path + (f"?{rest}" if rest else ""))
    response.set_cookie(COOKIE, _cookie_value(request), httponly=True, samesite="Strict", path="/")
    raise response


def _check_same_origin(request: web.Request) -> None:
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
    config = request.app[BOOTER].config
    server = config.server
    if server.origins:
        return {_origin(o) for o in server.origins}
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    ports = {p for p in (server.http.port, sockname[1] if sockname else 0) if p}
    hosts = {server.public_address, "127.0.0.1", "localhost", "::1", *_host_names(),
             server.http.host if server.http.host not in ("", "0.0.0.0", "::", "[::]") else None,
             str(config.dhcp.server_address) if config.dhcp.server_address else None}
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


# -- pages ----------------------------------------------------------------------------------------------


def _states(request: web.Request) -> list[str]:
    """?state=failed&state=interrupted or ?state=failed,interrupted."""
    return [s.strip() for value in request.query.getall("state", []) for s in value.split(",") if s.strip()]


def _page_of_nodes(request: web.Request, states: list[str], limit: int) -> tuple[list[Node], str | None]:
    """One page of machines by MAC, those after `?after=MAC`, and the MAC to continue after (None: the last)."""
    after = request.query.get("after") or None
    if after is not None:
        after = canonical_mac(after)  # BadRequest (400) when malformed
    nodes = request.app[BOOTER].store.nodes(after=after, limit=limit + 1, states=states)
    return nodes[:limit], nodes[limit - 1].mac if len(nodes) > limit else None


def _machine(booter: Booter, mac_text: str) -> Node:
    mac = canonical_mac(mac_text)  # BadRequest (400) when malformed
    node = booter.store.node(mac)
    if node is None:
        raise NotFound(f"no machine {mac} has asked this server for anything yet: check its MAC, "
                       f"or that its DHCP answer points at this server")
    return node


async def index(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    states = _states(request)
    nodes, next_after = _page_of_nodes(request, states, PAGE_ROWS)
    views = [machine_view(booter, n) for n in nodes]
    query = {"state": ",".join(states)} if states else {}
    first_url = f"/?{urlencode(query)}" if request.query.get("after") else None
    next_url = f"/?{urlencode({**query, 'after': next_after})}" if next_after else None
    return _render(request, "index.html.j2", machines=views, states=states, first_url=first_url,
                   next_url=next_url, counts=booter.store.state_counts(), last_id=booter.store.last_event_id())


async def machine_page(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    node = _machine(booter, request.match_info["mac"])
    events = [event_json(e) for e in reversed(booter.store.recent_events(node.mac, PAGE_EVENTS))]
    return _render(request, "machine.html.j2", m=machine_view(booter, node), events=events,
                   last_id=events[0]["id"] if events else 0, limit=PAGE_EVENTS,
                   token_needed=True)  # [server] api_token, else the one made in data_dir/api_token


def _form_action(action: Callable[[Booter, str], None]) -> Handler:
    """A page button: same-origin only, the API token (typed into the form) when one is set; back to the page."""
    async def handler(request: web.Request) -> web.StreamResponse:
        _check_same_origin(request)
        try:
            form = await request.post()
        except ConnectionResetError:  # the client went away mid-body: its fault, not an error of ours
            raise BadRequest("the request body ended early: the client went away") from None
        typed = form.get("api_token")
        _check_token(request, _bearer(request) or (typed if isinstance(typed, str) else None))
        booter = request.app[BOOTER]
        node = _machine(booter, request.match_info["mac"])
        action(booter, node.mac)
        raise web.HTTPSeeOther(f"/machines/{node.mac}")  # POST-redirect-GET: a reload does not repeat it
    return handler


async def openapi_json(request: web.Request) -> web.Response:
    return _json(openapi.spec())


async def metrics_page(request: web.Request) -> web.Response:
    body = metrics.exposition(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- live updates: server-sent events ----------------------------------------------------------------


def _resume_after(request: web.Request, default: int) -> int:
    """Where a stream starts: after Last-Event-ID (a reconnecting EventSource), else ?after=, else now."""
    value = request.headers.get("Last-Event-ID") or request.query.get("after")
    if value is None or value == "":
        return default
    return _number(value, "Last-Event-ID or after must be an event id (a whole number)")


def _number(value: str, what: str) -> int:
    """A whole number in ASCII digits (str.isdigit takes '²' and '٣', which int() then refuses), at most MAX_ID:
    what the store can compare with (a larger one overflowed SQLite's INTEGER: 500)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_ID:
        raise BadRequest(f"{what}, at most {MAX_ID}, not {value[:32]!r}")
    return int(value)


async def index_stream(request: web.Request) -> web.StreamResponse:
    store = request.app[BOOTER].store
    after = _resume_after(request, store.last_event_id())

    def messages(after: int) -> list[tuple[int, dict[str, Any]]]:
        return [(e.id, {"id": e.id, "mac": e.mac, "kind": e.kind}) for e in store.events_after(after, BATCH)]

    return await _stream(request, after, messages)


async def machine_stream(request: web.Request) -> web.StreamResponse:
    booter = request.app[BOOTER]
    node = _machine(booter, request.match_info["mac"])
    after = _resume_after(request, booter.store.last_event_id(node.mac))
    pages = request.app[PAGES]

    def messages(after: int) -> list[tuple[int, dict[str, Any]]]:
        events = booter.store.events(node.mac, after, BATCH)
        if not events:
            return []
        summary = pages.get_template("summary.html.j2").render(m=machine_view(booter, _machine(booter, node.mac)))
        return [(e.id, _event_message(pages, e, summary)) for e in events]

    return await _stream(request, after, messages)


def _event_message(pages: jinja2.Environment, event: Event, summary: str) -> dict[str, Any]:
    data = event_json(event)
    return {**data, "html": pages.get_template("event.html.j2").render(e=data), "summary_html": summary}


async def _stream(request: web.Request, after: int,
                  messages: Callable[[int], Iterable[tuple[int, dict[str, Any]]]]) -> web.StreamResponse:
    """Send `messages(after)` as server-sent events until the client goes away or the server stops.

    At most [server] streams_per_client from one client address and streams_total in all (each polls the
    store: 400 open streams took half the CPU); beyond, 429 with a message and Retry-After."""
    server = request.app[BOOTER].config.server
    clients, client = request.app[STREAM_CLIENTS], request.remote or "?"
    if clients.total() >= server.streams_total:
        _too_many(f"{server.streams_total} live streams are open, the most this server keeps "
                  f"([server] streams_total): close some pages, or try again later")
    if clients[client] >= server.streams_per_client:
        _too_many(f"{server.streams_per_client} live streams are open from {client}, the most one client may "
                  f"keep ([server] streams_per_client): close some pages, or try again later")
    clients[client] += 1
    streams, stopping = request.app[STREAMS], request.app[STOPPING]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})  # nginx: do not buffer the stream
    loop = asyncio.get_running_loop()
    try:
        await response.prepare(request)
        streams.add(response)
        quiet_since = loop.time()
        await response.write(b"retry: 2000\n\n")  # reconnect after 2 s; the browser resumes by Last-Event-ID
        while not stopping.is_set() and not _gone(request):
            for event_id, data in messages(after):
                await response.write(f"id: {event_id}\ndata: {json.dumps(data)}\n\n".encode())
                after, quiet_since = event_id, loop.time()
            if loop.time() - quiet_since > KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                quiet_since = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_SECONDS)
    except ConnectionError:  # the client closed the connection between our checks
        pass
    finally:
        streams.discard(response)
        clients[client] -= 1
        if clients[client] <= 0:
            del clients[client]
    return response


def _too_many(message: str) -> NoReturn:
    raise web.HTTPTooManyRequests(text=message + "\n", headers={"Retry-After": str(RETRY_STREAM_SECONDS)})


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _stop_streams(app: web.Application) -> None:
    """On shutdown, end every stream at once rather than wait out the server's grace period."""
    app[STOPPING].set()


# -- the JSON API --------------------------------------------------------------------------------------


async def api_machines(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    limit = min(_whole(request, "limit", PAGE_MACHINES), 1000) or 1
    nodes, next_after = _page_of_nodes(request, _states(request), limit)
    views = [machine_view(booter, n).to_json() for n in nodes]
    return _json({"machines": views, "next_after": next_after, "counts": booter.store.state_counts()})


async def api_machine(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    node = _machine(booter, request.match_info["mac"])
    events = [event_json(e) for e in booter.store.recent_events(node.mac, PAGE_EVENTS)]
    return _json({**machine_view(booter, node).to_json(), "events": events})


async def api_events(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    node = _machine(booter, request.match_info["mac"])
    after = _whole(request, "after", 0)
    limit = min(_whole(request, "limit", 1000), 1000) or 1
    events = booter.store.events(node.mac, after, limit)
    return _json({"mac": node.mac, "events": [event_json(e) for e in events],
                  "last_id": events[-1].id if events else after})


def _whole(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name, "")
    if not value:
        return default
    return _number(value, f"{name} must be a whole number")


async def _api_approve(request: web.Request) -> web.Response:
    """Unlike the other actions, for a MAC not seen yet too: an operator may approve a machine before it boots."""
    booter = request.app[BOOTER]
    mac = canonical_mac(request.match_info["mac"])
    booter.approve(mac)
    return _json(machine_view(booter, _machine(booter, mac)).to_json())


def _api_action(action: Callable[[Booter, str], None]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        booter = request.app[BOOTER]
        node = _machine(booter, request.match_info["mac"])
        action(booter, node.mac)
        return _json(machine_view(booter, _machine(booter, node.mac)).to_json())
    return handler
