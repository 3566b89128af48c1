"""Live updates of the status pages: server-sent events, and their caps.

    GET  /stream                             something happened (the overview refreshes)
    GET  /machines/{mac}/stream              that machine's new events, rendered, with its summary and waterfall

Live updates poll the store (every POLL_SECONDS) rather than listen in memory, so that events
recorded by another process (`bootserver reprovision` from a shell) show up too.
Live streams are capped per client address and in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import jinja2
from aiohttp import web

from ..store import Event
from .pages import PAGES, boot_context, page
from .query import PAGE_EVENTS, machine, number
from .routes import BOOTER, get
from .views import event_json, machine_view

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0  # a comment line this often shows a dead client (and keeps proxies from timing out)
BATCH = 100  # events per poll of a stream
RETRY_STREAM_SECONDS = 10

STOPPING = web.AppKey("stopping", asyncio.Event)
STREAMS = web.AppKey("streams", set)
STREAM_CLIENTS = web.AppKey("stream_clients", Counter)  # open streams by client address


def add_routes(app: web.Application) -> None:
    app[STOPPING] = asyncio.Event()
    app[STREAMS] = set()
    app[STREAM_CLIENTS] = Counter()
    app.on_shutdown.append(_stop_streams)
    get(app, "/stream", page(index_stream))
    get(app, "/machines/{mac}/stream", page(machine_stream))


def _resume_after(request: web.Request, default: int) -> int:
    """Where a stream starts: after Last-Event-ID (a reconnecting EventSource), else ?after=, else now."""
    value = request.headers.get("Last-Event-ID") or request.query.get("after")
    if value is None or value == "":
        return default
    return number(value, "Last-Event-ID or after must be an event id (a whole number)")


async def index_stream(request: web.Request) -> web.StreamResponse:
    history = request.app[BOOTER].history()
    after = _resume_after(request, history.last_event_id())

    def messages(after: int) -> list[tuple[int, dict[str, Any]]]:
        return [(e.id, {"id": e.id, "mac": e.mac, "kind": e.kind}) for e in history.events_after(after, BATCH)]

    return await _stream(request, after, messages)


async def machine_stream(request: web.Request) -> web.StreamResponse:
    booter = request.app[BOOTER]
    history = booter.history()
    node = machine(history, request.match_info["mac"])
    after = _resume_after(request, history.last_event_id(node.mac))
    pages = request.app[PAGES]

    def messages(after: int) -> list[tuple[int, dict[str, Any]]]:
        events = history.events(node.mac, after, BATCH)
        if not events:
            return []
        booter.fleet().refresh()
        summary = pages.get_template("summary.html.j2").render(m=machine_view(booter, machine(history, node.mac)))
        waterfall = pages.get_template("waterfall.html.j2").render(
            **boot_context(request, node.mac, history.recent_events(node.mac, PAGE_EVENTS)))
        return [(e.id, _event_message(pages, e, summary, waterfall)) for e in events]

    return await _stream(request, after, messages)


def _event_message(pages: jinja2.Environment, event: Event, summary: str, waterfall: str) -> dict[str, Any]:
    data = event_json(event)
    return {**data, "html": pages.get_template("event.html.j2").render(e=data), "summary_html": summary,
            "waterfall_html": waterfall}


async def _stream(request: web.Request, after: int,
                  messages: Callable[[int], Iterable[tuple[int, dict[str, Any]]]]) -> web.StreamResponse:
    """Send `messages(after)` as server-sent events until the client goes away or the server stops.

    At most [server] streams_per_client from one client address and streams_total in all (each polls the
    store, so every open stream costs CPU even when nothing happens); beyond, 429 with a message and Retry-After."""
    server = request.app[BOOTER].web_settings()
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
            with contextlib.suppress(TimeoutError):  # not wait_for: in 3.11 it may swallow a cancellation
                async with asyncio.timeout(POLL_SECONDS):
                    await stopping.wait()
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
