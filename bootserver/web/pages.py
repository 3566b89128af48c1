"""Status pages for people, and the pages' buttons.

    GET  /                                   every machine: state, progress, IP, time in its phase, its last boot and
                                             event; ?state= &group= &profile= filter, ?sort= &order= sort
    GET  /machines/{mac}                     one machine: why it boots what it boots, its boot's waterfall (?boot=
                                             an earlier one), its timeline
    GET  /fleet                              every machine's latest boot: machines by phase over time, each phase's
                                             spread, the slowest and the stuck, failures by reason; ?group= &profile=
    POST /machines/{mac}/reprovision         the page's buttons (same-origin only; the API token, typed)
    POST /machines/{mac}/boot-from-disk
    POST /machines/{mac}/approve
    POST /machines/{mac}/reprovision-now     through its BMC: next boot from the network, power cycle
    POST /machines/{mac}/power               action=on|off|soft-off|cycle, through its BMC

Their live updates are in stream.py; the same data as JSON in api.py. The templates are in html/.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from ..booter import Booter
from ..errors import BadRequest, BootserverError, NotFound
from ..fleet import STUCK_FACTOR
from ..phases import LABELS, Boot, boots
from ..store import Event, Listed
from .auth import bearer, check_read, check_same_origin, check_token, token_query
from .query import PAGE_EVENTS, choice, filters, machine, number, page_of_nodes, states
from .routes import BOOTER, Handler, get, post, status_of
from .views import (
    PLACES,
    MachineView,
    Progress,
    chart,
    clock,
    duration,
    event_json,
    machine_view,
    since,
    size,
    waterfall,
)

PAGES_DIR = Path(__file__).resolve().parent / "html"
# Rows per page of the HTML list, fewer than the API's: every open list re-fetches its whole page on new events
# (at most once a second), so each row is paid for again and again, in bytes and in the server's time.
PAGE_ROWS = 250

PAGES = web.AppKey("pages", jinja2.Environment)
# Sorted lists' orders of MACs by their query, with the newest event id and the time they were sorted at: paging
# through a sorted list of 10,000 machines sorts them once, not once a page (or once a live refresh).
ORDERS = web.AppKey("orders", dict)
ORDER_SECONDS = 5.0  # a sort by time in phase or boot length ages: sorted again after this long
ORDERS_KEPT = 16


def add_routes(app: web.Application) -> None:
    app[PAGES] = _environment()
    app[ORDERS] = {}
    get(app, "/", page(index))
    get(app, "/machines/{mac}", page(machine_page))
    get(app, "/fleet", page(fleet_page))
    post(app, "/machines/{mac}/reprovision", page(_form_action(Booter.reprovision)))
    post(app, "/machines/{mac}/boot-from-disk", page(_form_action(Booter.boot_from_disk)))
    post(app, "/machines/{mac}/approve", page(_form_action(Booter.approve)))
    post(app, "/machines/{mac}/reprovision-now", page(_form_action(_reprovision_now)))
    post(app, "/machines/{mac}/power", page(_form_action(_power)))


def _environment() -> jinja2.Environment:
    # autoescape: hostnames, DHCP strings and command output come from machines and may hold markup.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PAGES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(clock=clock, size=size, cells=progress_cells, duration=duration)
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


# The list's columns it sorts by, and how: a machine with no value sorts last whichever the order.
SORTS = ("mac", "state", "ip", "since", "boot", "last", "seen")


async def index(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    history = booter.history()
    booter.fleet().refresh()
    wanted = states(request)
    sort, order = choice(request, "sort", SORTS), choice(request, "order", ("asc", "desc"))
    group, profile = filters(request)
    chosen = booter.matching(group, profile)
    query = {k: v for k, v in (("state", ",".join(wanted)), ("group", group), ("profile", profile)) if v}
    if sort == "mac" and order == "asc" and chosen is None:  # a page at a time, straight from the store
        nodes, next_after = page_of_nodes(request, wanted, PAGE_ROWS)
        views = [machine_view(booter, n) for n in nodes]
        first_url = f"/?{urlencode(query)}" if request.query.get("after") else None
        next_url = f"/?{urlencode({**query, 'after': next_after})}" if next_after else None
    else:
        views, first_url, next_url = _sorted_page(request, wanted, chosen, {**query, "sort": sort, "order": order})
    sorting = {column: f"/?{urlencode({**query, 'sort': column, 'order': _flip(sort, order, column)})}"
               for column in SORTS}
    return render(request, "index.html.j2", machines=views, states=wanted, first_url=first_url,
                  next_url=next_url, counts=history.counts(), last_id=history.last_event_id(), now=time.time(),
                  sort=sort, order=order, sorting=sorting, group=group, profile=profile)


def _flip(sort: str, order: str, column: str) -> str:
    """A column's heading sorts by it ascending; clicked again, descending."""
    return "desc" if column == sort and order == "asc" else "asc"


def _sorted_page(request: web.Request, wanted: list[str], chosen: set[str] | None,
                 query: dict[str, str]) -> tuple[list[MachineView], str | None, str | None]:
    """One page of every machine in `wanted` states (and in `chosen`), sorted by ?sort= in ?order=."""
    booter = request.app[BOOTER]
    history, now = booter.history(), time.time()
    orders, newest, cache_key = request.app[ORDERS], history.last_event_id(), tuple(sorted(query.items()))
    cached = orders.get(cache_key)
    if cached is not None and cached[0] == newest and now - cached[1] < ORDER_SECONDS:
        ordered = cached[2]
    else:
        ordered = _order(booter, wanted, chosen, query["sort"], query["order"] == "desc", now)
        while len(orders) >= ORDERS_KEPT:
            del orders[next(iter(orders))]
        orders[cache_key] = (newest, now, ordered)
    page_number = max(number(request.query.get("page") or "1", "page must be a page number"), 1)
    start = (page_number - 1) * PAGE_ROWS
    views = [machine_view(booter, n) for n in history.nodes_of(ordered[start:start + PAGE_ROWS])]
    first_url = f"/?{urlencode(query)}" if start else None
    more = len(ordered) > start + PAGE_ROWS
    next_url = f"/?{urlencode({**query, 'page': page_number + 1})}" if more else None
    return views, first_url, next_url


def _order(booter: Booter, wanted: list[str], chosen: set[str] | None, sort: str, descending: bool,
           now: float) -> list[str]:
    """The MACs of every machine listed, sorted; those without a value for the column last, by MAC."""
    fleet, key = booter.fleet(), _SORT_KEYS[sort]
    keyed = [(key(m, fleet.boot(m.mac), fleet.last_event(m.mac), now), m.mac)
             for m in booter.history().listing(wanted) if chosen is None or m.mac in chosen]
    known = sorted(((value, mac) for value, mac in keyed if value is not None), reverse=descending)
    return [mac for _, mac in known] + sorted(mac for value, mac in keyed if value is None)


def _ip(m: Listed) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in m.ip.split(".")) if m.ip else None
    except ValueError:  # not IPv4: by its text, after every IPv4 address
        return (256, *map(ord, m.ip or ""))


_SORT_KEYS: dict[str, Callable[[Listed, Boot | None, Event | None, float], Any]] = {
    "mac": lambda m, b, e, now: m.mac,
    "state": lambda m, b, e, now: m.state,
    "ip": lambda m, b, e, now: _ip(m),
    "since": lambda m, b, e, now: None if (started := since(b)) is None else now - started,
    "boot": lambda m, b, e, now: b.seconds(now) if b else None,
    "last": lambda m, b, e, now: e.time if e else None,
    "seen": lambda m, b, e, now: m.last_seen,
}


async def machine_page(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    history = booter.history()
    booter.fleet().refresh()
    node = machine(history, request.match_info["mac"])
    recent = history.recent_events(node.mac, PAGE_EVENTS)
    events = [event_json(e) for e in reversed(recent)]
    return render(request, "machine.html.j2", m=machine_view(booter, node), events=events,
                  last_id=events[0]["id"] if events else 0, limit=PAGE_EVENTS,
                  token_needed=True,  # [server] api_token, else the one made in data_dir/api_token
                  **boot_context(request, node.mac, recent))


def boot_context(request: web.Request, mac: str, recent: list[Event]) -> dict[str, Any]:
    """What the waterfall shows: the boot ?boot= names (its first event's id), else the latest in `recent` (a boot
    older than those is in the events API)."""
    found, _ = boots(recent)
    wanted = request.query.get("boot")
    boot = found[-1] if found else None
    if wanted:
        first = number(wanted, "boot must be a boot's id (its first event's id)")
        boot = next((b for b in found if b.id == first), None)
        if boot is None:
            raise NotFound(f"{mac} has no boot starting at event {first} among its newest {PAGE_EVENTS} events: "
                           f"those are listed on its page")
    now = time.time()
    return {"boot": boot, "bars": waterfall(boot, now) if boot else [], "boots": list(reversed(found)), "now": now,
            "latest": boot is None or not found or boot.id == found[-1].id}


async def fleet_page(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    fleet = booter.fleet()
    fleet.refresh()
    group, profile = filters(request)
    view = fleet.view(time.time(), booter.matching(group, profile), key=(group, profile))
    latest = view.series[-1][1] if view.series else {}
    return render(request, "fleet.html.j2", fleet=view, columns=chart(view), group=group, profile=profile,
                  hostname=booter.hostname, last_id=booter.history().last_event_id(), latest=latest,
                  places=[p for p in PLACES if p in latest], labels=LABELS, factor=STUCK_FACTOR)


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
