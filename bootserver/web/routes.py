"""What every route module shares: the app keys create_app sets, the helpers that add a route, the `Expect`
handler every route has, and how our errors map to statuses on the pages and the API."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from ..booter import Booter
from ..errors import BadRequest, BootserverError, Forbidden, NotFound, TooManyRequests, Unauthorized
from ..power import BmcError

log = logging.getLogger(__name__)

BOOTER = web.AppKey("booter", Booter)
PUBLIC_ADDRESS = web.AppKey("public_address", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def get(app: web.Application, path: str, handler: Handler) -> None:
    app.router.add_get(path, handler, expect_handler=expect_continue)


def post(app: web.Application, path: str, handler: Handler) -> None:
    app.router.add_post(path, handler, expect_handler=expect_continue)


async def expect_continue(request: web.Request) -> None:
    """The `Expect` header, answered before the body is read (and before any middleware runs).

    Ours rather than aiohttp's because aiohttp's echoes the header into its 417 answer, and so fails with a 500
    when the header holds bytes that are not UTF-8.
    """
    if request.version != HttpVersion11:
        return
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="the only Expect this server understands is 100-continue\n")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response's size


# The pages' and the API's statuses, with the page's title for each (the boot routes' are in app.py).
_STATUS = ((TooManyRequests, 429, "Too many requests"), (BadRequest, 400, "Bad request"),
           (Unauthorized, 401, "API token needed"), (Forbidden, 403, "Refused"), (NotFound, 404, "Not found"),
           (BmcError, 502, "The machine's BMC failed"))


def status_of(exc: BootserverError, path: str) -> tuple[int, str]:
    """The status and page title for one of our errors on the pages and the API; any other is a 500, logged."""
    for cls, status, title in _STATUS:
        if isinstance(exc, cls):
            return status, title
    log.exception("request %s failed", path)
    return 500, "Server error"
