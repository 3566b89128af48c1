"""What the pages, the API and the streams read from a request and look up in the core's history: a machine by
its MAC, a page of machines, whole numbers from the query string."""

from __future__ import annotations

from aiohttp import web

from ..errors import BadRequest, NotFound
from ..history import History
from ..mac import canonical_mac
from ..store import Node
from .routes import BOOTER

PAGE_EVENTS = 500  # a machine page shows this many of its newest events; the API pages through all
MAX_ID = 2**63 - 1  # event ids and limits: what SQLite's INTEGER (and PostgreSQL's bigint) holds


def states(request: web.Request) -> list[str]:
    """?state=failed&state=interrupted or ?state=failed,interrupted."""
    return [s.strip() for value in request.query.getall("state", []) for s in value.split(",") if s.strip()]


def page_of_nodes(request: web.Request, states: list[str], limit: int) -> tuple[list[Node], str | None]:
    """One page of machines by MAC, those after `?after=MAC`, and the MAC to continue after (None: the last)."""
    after = request.query.get("after") or None
    if after is not None:
        after = canonical_mac(after)  # BadRequest (400) when malformed
    nodes = request.app[BOOTER].history().nodes(after=after, limit=limit + 1, states=states)
    return nodes[:limit], nodes[limit - 1].mac if len(nodes) > limit else None


def machine(history: History, mac_text: str) -> Node:
    mac = canonical_mac(mac_text)  # BadRequest (400) when malformed
    node = history.node(mac)
    if node is None:
        raise NotFound(f"no machine {mac} has asked this server for anything yet: check its MAC, "
                       f"or that its DHCP answer points at this server")
    return node


def number(value: str, what: str) -> int:
    """A whole number in ASCII digits (str.isdigit takes '²' and '٣', which int() then refuses), at most MAX_ID:
    what the store can compare with (a larger one would overflow SQLite's INTEGER)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_ID:
        raise BadRequest(f"{what}, at most {MAX_ID}, not {value[:32]!r}")
    return int(value)


def choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str:
    """?name= one of `allowed` (the first when not given)."""
    value = request.query.get(name) or allowed[0]
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}, not {value[:32]!r}")
    return value


def filters(request: web.Request) -> tuple[str | None, str | None]:
    """?group= and ?profile=: names the config has (Booter.matching checks them)."""
    return request.query.get("group") or None, request.query.get("profile") or None
