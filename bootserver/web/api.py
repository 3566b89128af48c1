"""The JSON API for programs (the pages' twins), its OpenAPI description, and the metrics.

    GET  /api/v1/machines[?state=]           every machine, a page at a time
    GET  /api/v1/machines/{mac}
    GET  /api/v1/machines/{mac}/events?after=
    GET  /api/v1/machines/{mac}/waterfall[?boot=]   a boot's phases (the latest, else the one starting at event ID)
    GET  /api/v1/fleet[?group=&profile=]     phases' spreads, stuck machines, failures, machines by phase a minute
    POST /api/v1/machines/{mac}/reprovision[?now=true], /api/v1/machines/{mac}/boot-from-disk,
         /api/v1/machines/{mac}/approve
    GET  /api/v1/machines/{mac}/power        its power state, read from its BMC now
    POST /api/v1/machines/{mac}/power        {"action": "on" | "off" | "soft-off" | "cycle"}
    POST /api/v1/deploy                      {"targets": [GROUP or MAC, ...], "now": true}
    GET  /api/v1/openapi.json                OpenAPI 3 description of /api/v1
    GET  /metrics                            Prometheus: machines by state, bytes served, step and phase durations
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from ..booter import Booter
from ..errors import BadRequest, BootserverError
from ..mac import canonical_mac
from . import metrics, openapi
from .auth import bearer, check_read, check_same_origin, check_token
from .pages import boot_context
from .query import PAGE_EVENTS, filters, machine, number, page_of_nodes, states
from .routes import BOOTER, Handler, get, post, status_of
from .views import event_json, machine_view

PAGE_MACHINES = 500  # machines per page of the API's list (which may ask for up to 1,000): a big site stays fast

METRICS = web.AppKey("metrics", CollectorRegistry)


def add_routes(app: web.Application) -> None:
    app[METRICS] = metrics.registry(app[BOOTER].history(), app[BOOTER].power_control().state_counts,
                                    app[BOOTER].fleet())
    get(app, "/api/v1/machines", _api(api_machines))
    get(app, "/api/v1/machines/{mac}", _api(api_machine))
    get(app, "/api/v1/machines/{mac}/events", _api(api_events))
    get(app, "/api/v1/machines/{mac}/waterfall", _api(api_waterfall))
    get(app, "/api/v1/fleet", _api(api_fleet))
    post(app, "/api/v1/machines/{mac}/reprovision", _api(api_reprovision))
    get(app, "/api/v1/machines/{mac}/power", _api(api_power_status))
    post(app, "/api/v1/machines/{mac}/power", _api(api_power))
    post(app, "/api/v1/deploy", _api(api_deploy))
    post(app, "/api/v1/machines/{mac}/boot-from-disk", _api(_api_action(Booter.boot_from_disk)))
    post(app, "/api/v1/machines/{mac}/approve", _api(_api_approve))
    # Open even with an API token: a client needs it to learn that (and how) it must authenticate.
    get(app, "/api/v1/openapi.json", openapi_json)
    get(app, "/metrics", _api(metrics_page))


def _json(body: object, status: int = 200) -> web.Response:
    # No indent: indenting makes json use its pure-Python encoder, far slower on a long list.
    return web.json_response(body, status=status, dumps=json.dumps)


def _api(handler: Handler) -> Handler:
    """Every /api/v1 call and /metrics: the API token for writes (and for reads when [server] pages = "token");
    errors as JSON."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            if request.method in ("GET", "HEAD"):
                check_read(request)
            else:
                check_token(request, bearer(request))
                check_same_origin(request)
            return await handler(request)
        except BootserverError as exc:
            status, _ = status_of(exc, request.path)
            response = _json({"error": str(exc), "status": status}, status)
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="bootserver"'
            return response
    return wrapped


async def openapi_json(request: web.Request) -> web.Response:
    return _json(openapi.spec())


async def metrics_page(request: web.Request) -> web.Response:
    body = metrics.exposition(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def api_machines(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    booter.fleet().refresh()
    limit = min(_whole(request, "limit", PAGE_MACHINES), 1000) or 1
    nodes, next_after = page_of_nodes(request, states(request), limit)
    views = [machine_view(booter, n).to_json() for n in nodes]
    return _json({"machines": views, "next_after": next_after, "counts": booter.history().counts()})


async def api_machine(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    history = booter.history()
    booter.fleet().refresh()
    node = machine(history, request.match_info["mac"])
    events = [event_json(e) for e in history.recent_events(node.mac, PAGE_EVENTS)]
    return _json({**machine_view(booter, node).to_json(), "events": events})


async def api_waterfall(request: web.Request) -> web.Response:
    history = request.app[BOOTER].history()
    node = machine(history, request.match_info["mac"])
    shown = boot_context(request, node.mac, history.recent_events(node.mac, PAGE_EVENTS))
    boot, now = shown["boot"], shown["now"]
    return _json({"mac": node.mac, "boot": boot.to_json(now) if boot else None,
                  "boots": [{"id": b.id, "start": b.start, "seconds": round(b.seconds(now), 3), "outcome": b.outcome,
                             "failure": b.failure} for b in shown["boots"]]})


async def api_fleet(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    fleet = booter.fleet()
    fleet.refresh()
    group, profile = filters(request)
    view = fleet.view(time.time(), booter.matching(group, profile), key=(group, profile))
    return _json({"group": group, "profile": profile, **view.to_json()})


async def api_events(request: web.Request) -> web.Response:
    history = request.app[BOOTER].history()
    node = machine(history, request.match_info["mac"])
    after = _whole(request, "after", 0)
    limit = min(_whole(request, "limit", 1000), 1000) or 1
    events = history.events(node.mac, after, limit)
    return _json({"mac": node.mac, "events": [event_json(e) for e in events],
                  "last_id": events[-1].id if events else after})


def _whole(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name, "")
    if not value:
        return default
    return number(value, f"{name} must be a whole number")


async def _api_approve(request: web.Request) -> web.Response:
    """Unlike the other actions, for a MAC not seen yet too: an operator may approve a machine before it boots."""
    booter = request.app[BOOTER]
    mac = canonical_mac(request.match_info["mac"])
    booter.approve(mac)
    return _json(machine_view(booter, machine(booter.history(), mac)).to_json())


async def api_reprovision(request: web.Request) -> web.Response:
    """?now=true: and boot it now through its BMC (next boot from the network, power cycle)."""
    booter = request.app[BOOTER]
    node = machine(booter.history(), request.match_info["mac"])
    netboot = None
    if _flag(request, "now"):
        netboot = (await booter.reprovision_now(node.mac)).to_json()
    else:
        booter.reprovision(node.mac)
    return _json({**machine_view(booter, machine(booter.history(), node.mac)).to_json(), "netboot": netboot})


async def api_power_status(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    mac = canonical_mac(request.match_info["mac"])
    state = await booter.power(mac, "status")
    return _json({"mac": mac, "power": state})


async def api_power(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    mac = canonical_mac(request.match_info["mac"])
    action = (await _body(request)).get("action")
    if not isinstance(action, str):
        raise BadRequest('expected a JSON body {"action": "on" | "off" | "soft-off" | "cycle"}')
    await booter.power(mac, action)
    known = booter.power_state(mac)
    return _json({"mac": mac, "action": action, "power": known.to_json() if known else None})


async def api_deploy(request: web.Request) -> web.Response:
    booter = request.app[BOOTER]
    body = await _body(request)
    targets, now = body.get("targets"), body.get("now", False)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets) \
            or not isinstance(now, bool):
        raise BadRequest('expected a JSON body {"targets": [GROUP or MAC, ...], "now": true | false}')
    macs = booter.deploy_targets(targets)
    results = await booter.deploy(macs, now=now)
    return _json({"machines": macs, "netboot": [r.to_json() for r in results]})


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "1", "false", "0"):
        raise BadRequest(f"{name} must be true or false")
    return value in ("true", "1")


def _api_action(action: Callable[[Booter, str], None]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        booter = request.app[BOOTER]
        history = booter.history()
        node = machine(history, request.match_info["mac"])
        action(booter, node.mac)
        return _json(machine_view(booter, machine(history, node.mac)).to_json())
    return handler
