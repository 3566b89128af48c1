"""Status pages for people, their JSON twins for programs, live updates and metrics.

    GET  /                                   every machine: state, progress; ?state= filters
    GET  /stream                             server-sent events: something happened (the overview refreshes)
    GET  /machines/{mac}                     one machine: why it boots what it boots, its timeline
    GET  /machines/{mac}/stream              server-sent events: that machine's new events, rendered
    POST /machines/{mac}/reprovision         the page's buttons (same-origin only; the API token if set)
    POST /machines/{mac}/boot-from-disk
    GET  /api/v1/machines[?state=]           the same data as JSON
    GET  /api/v1/machines/{mac}
    GET  /api/v1/machines/{mac}/events?after=
    POST /api/v1/machines/{mac}/reprovision, /api/v1/machines/{mac}/boot-from-disk
    GET  /api/v1/openapi.json                OpenAPI 3 description of /api/v1
    GET  /metrics                            Prometheus: machines by state, bytes served, step durations

Live updates poll the store (every POLL_SECONDS) rather than listen in memory, so that events
recorded by another process (`bootserver reprovision` from a shell) show up too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
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
METRICS = web.AppKey("metrics", CollectorRegistry)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    """Add the status pages, API and metrics to the HTTP app (after http.create_app set BOOTER)."""
    app[PAGES] = _environment()
    app[STOPPING] = asyncio.Event()
    app[STREAMS] = set()
    app[METRICS] = metrics.registry(app[BOOTER].store)
    app.on_shutdown.append(_stop_streams)
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
    get(app, "/metrics", metrics_page)


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
    """Errors become an HTML page that says what was wrong (a malformed MAC, an unknown machine)."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BootserverError as exc:
            status, title = _status(exc, request.path)
            return _render(request, "error.html.j2", status=status, title=title, message=str(exc))
    return wrapped


def _api(handler: Handler) -> Handler:
    """Every /api/v1 call: the API token when one is configured; errors as JSON."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            _check_token(request, _bearer(request))
            if request.method != "GET":
                _check_same_origin(request)
            return await handler(request)
        except BootserverError as exc:
            status, _ = _status(exc, request.path)
            response = _json({"error": str(exc), "status": status}, status)
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="bootserver"'
            return response
    return wrapped


def _bearer(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _check_token(request: web.Request, presented: str | None) -> None:
    expected = request.app[BOOTER].config.server.api_token
    if expected is None:
        return
    if not presented:
        raise Unauthorized("this server needs its API token ([server] api_token): "
                           "send it as `Authorization: Bearer TOKEN`")
    # compare_digest: the time taken does not tell how many leading characters were right.
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Unauthorized("wrong API token (compare with [server] api_token)")


def _check_same_origin(request: web.Request) -> None:
    """Refuse state-changing requests that a browser sends on behalf of another site (CSRF).

    Why Fetch Metadata and Origin rather than a per-session CSRF token: we have no sessions or
    cookies to hang a token on, and these headers are set by the browser itself, which a page on
    another site cannot forge. Modern browsers send `Sec-Fetch-Site` on every request; where it is
    missing, every browser of the last years still sends `Origin` on a POST, which must then name
    this host. A request with neither does not come from a browser (curl, scripts), and cross-site
    forgery is a browser problem; such clients are held by the API token when one is set.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        # "none": the user did it themselves (typed, bookmarked); "same-site" is another origin still.
        if site not in ("same-origin", "none"):
            raise Forbidden(f"cross-site request refused (Sec-Fetch-Site: {site}): "
                            f"use the buttons on this server's own pages")
        return
    origin = request.headers.get("Origin")
    if origin is not None and _netloc(origin) != _netloc("//" + request.headers.get("Host", "")):
        raise Forbidden(f"cross-origin request refused (Origin {origin} is not this server, "
                        f"{request.headers.get('Host', '?')})")


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
                   token_needed=booter.config.server.api_token is not None)


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
    if not value.isdigit():
        raise BadRequest(f"Last-Event-ID or after must be an event id (a whole number), not {value[:32]!r}")
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
    """Send `messages(after)` as server-sent events until the client goes away or the server stops."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})  # nginx: do not buffer the stream
    await response.prepare(request)
    streams, stopping = request.app[STREAMS], request.app[STOPPING]
    streams.add(response)
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    try:
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
    return response


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
    if not value.isdigit():
        raise BadRequest(f"{name} must be a whole number, not {value[:32]!r}")
    return int(value)


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
