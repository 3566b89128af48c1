"""The HTTP app: the one place it is wired. Its app keys, its error middleware, every group of routes
(boot.py, pages.py, stream.py, api.py) and the catch-all route that answers paths no group takes."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..booter import Booter
from ..errors import BadRequest, BootserverError, Forbidden, NotFound, StoreUnavailable, TooManyRequests, Unauthorized
from . import api, auth, boot, pages, stream
from .routes import BOOTER, PUBLIC_ADDRESS, Handler, expect_continue

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # phone-home reports are small; anything larger is refused with 413
_STATUS = {BadRequest: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, TooManyRequests: 429,
           StoreUnavailable: 503}


class _ClientGarbage(logging.Filter):
    """aiohttp logs a request it cannot parse (the client's fault, answered 400) as an ERROR with a
    traceback, except a bad method, which it logs at debug for being common on the internet. Any client
    could so fill our log and bury real errors: those records are dropped too."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500)


_CLIENT_GARBAGE = _ClientGarbage()


def create_app(booter: Booter, public_address: str | None = None) -> web.Application:
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_GARBAGE)  # once: filters are a set
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[BOOTER] = booter
    app[PUBLIC_ADDRESS] = public_address or ""
    boot.add_routes(app)
    auth.setup(app)
    pages.add_routes(app)
    stream.add_routes(app)
    api.add_routes(app)
    app.router.add_route("*", "/{path:.*}", _unrouted, expect_handler=expect_continue)
    return app


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """404 or 405 for a path no route takes: routed here, not left to aiohttp, so that `expect_continue`
    answers its Expect header too."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our exceptions become plain-text answers a person (or iPXE's console) can read."""
    try:
        return await handler(request)
    except BootserverError as exc:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
        if status == 500:
            log.exception("request %s failed", request.path)
        # The message goes in the reason phrase too: busybox wget (the agent) shows only the status line.
        reason = " ".join(str(exc).split())[:200].encode("latin-1", "replace").decode("latin-1")
        return web.Response(status=status, text=f"{exc}\n", reason=reason)
