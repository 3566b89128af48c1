"""Status pages for people, and the pages' buttons.

    GET  /                                   every machine: state, progress; ?state= filters
    GET  /machines/{mac}                     one machine: why it boots what it boots, its timeline
    POST /machines/{mac}/reprovision         the page's buttons (same-origin only; the API token, typed)
    POST /machines/{mac}/boot-from-disk
    POST /machines/{mac}/approve
    POST /machines/{mac}/reprovision-now     through its BMC: next boot from the network, power cycle
    POST /machines/{mac}/power               action=on|off|soft-off|cycle, through its BMC

Their live updates are in stream.py; the same data as JSON in api.py. The templates are in html/.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from ..booter import Booter
from ..errors import BadRequest, BootserverError
from .auth import bearer, check_read, check_same_origin, check_token, token_query
from .query import PAGE_EVENTS, machine, page_of_nodes, states
from .routes import BOOTER, Handler, get, post, status_of
from .views import Progress, clock, event_json, machine_view, size

PAGES_DIR = Path(__file__).resolve().parent / "html"
# Rows per page of the HTML list, fewer than the API's: every open list re-fetches its whole page on new events
# (at most once a second), so each row is paid for again and again, in bytes and in the server's time.
PAGE_ROWS = 250

PAGES = web.AppKey("pages", jinja2.Environment)


def add_routes(app: web.Application) -> None:
    app[PAGES] = _environment()
    get(app, "/", page(index))
    get(app, "/machines/{mac}", page(machine_page))
    post(app, "/machines/{mac}/reprovision", page(_form_action(Booter.reprovision)))
    post(app, "/machines/{mac}/boot-from-disk", page(_form_action(Booter.boot_from_disk)))
    post(app, "/machines/{mac}/approve", page(_form_action(Booter.approve)))
    post(app, "/machines/{mac}/reprovision-now", page(_form_action(_reprovision_now)))
    post(app, "/machines/{mac}/power", page(_form_action(_power)))


def _environment() -> jinja2.Environment:
    # autoescape: hostnames, DHCP strings and command output come from machines and may hold markup.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PAGES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(clock=clock, size=size, cells=progress_cells)
    return env


def progress_cells(p: Progress) -> str:
    """A progress bar's cells, one per step, the done ones lit. Built here from two numbers rather than by a loop
    in the template, whose escaping of every cell would be most of the time a long list takes to render."""
    return '<i class="on"></i>' * p.done + '<i class=""></i>' * (p.total - p.done)  # markup: used with |safe


def render(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    text = request.app[PAGES].get_template(name).render(**context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def page(handler: Handler) -> Handler:
    """Errors become an HTML page that says what was wrong (a malformed MAC, an unknown machine).
    Reads need the token when [server] pages = "token"; ?token= sets the cookie that proves it from then on."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            if request.method in ("GET", "HEAD"):
                token_query(request)
                check_read(request)
            return await handler(request)
        except BootserverError as exc:
            status, title = status_of(exc, request.path)
            return render(request, "error.html.j2", status=status, title=title, message=str(exc))
    return wrapped


async def index(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    history = booter.history()
    wanted = states(request)
    nodes, next_after = page_of_nodes(request, wanted, PAGE_ROWS)
    views = [machine_view(booter, n) for n in nodes]
    query = {"state": ",".join(wanted)} if wanted else {}
    first_url = f"/?{urlencode(query)}" if request.query.get("after") else None
    next_url = f"/?{urlencode({**query, 'after': next_after})}" if next_after else None
    return render(request, "index.html.j2", machines=views, states=wanted, first_url=first_url,
                  next_url=next_url, counts=history.counts(), last_id=history.last_event_id())


async def machine_page(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    history = booter.history()
    node = machine(history, request.match_info["mac"])
    events = [event_json(e) for e in reversed(history.recent_events(node.mac, PAGE_EVENTS))]
    return render(request, "machine.html.j2", m=machine_view(booter, node), events=events,
                  last_id=events[0]["id"] if events else 0, limit=PAGE_EVENTS,
                  token_needed=True)  # [server] api_token, else the one made in data_dir/api_token


async def _reprovision_now(booter: Booter, mac: str, form: MultiDictProxy) -> None:
    await booter.reprovision_now(mac)


async def _power(booter: Booter, mac: str, form: MultiDictProxy) -> None:
    action = form.get("action")
    await booter.power(mac, action if isinstance(action, str) else "")


def _form_action(action: Callable[..., Any]) -> Handler:
    """A page button: same-origin only, the API token (typed into the form) when one is set; back to the page.
    `action(booter, mac)`, or a coroutine function `action(booter, mac, form)` (the BMC's buttons)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        check_same_origin(request)
        try:
            form = await request.post()
        except ConnectionResetError:  # the client went away mid-body: its fault, not an error of ours
            raise BadRequest("the request body ended early: the client went away") from None
        typed = form.get("api_token")
        check_token(request, bearer(request) or (typed if isinstance(typed, str) else None))
        booter = request.app[BOOTER]
        node = machine(booter.history(), request.match_info["mac"])
        if inspect.iscoroutinefunction(action):
            await action(booter, node.mac, form)
        else:
            action(booter, node.mac)
        raise web.HTTPSeeOther(f"/machines/{node.mac}")  # POST-redirect-GET: a reload does not repeat it
    return handler
