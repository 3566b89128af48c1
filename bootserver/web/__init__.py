"""Everything served over HTTP: the boot routes machines use, the status pages, the JSON API and metrics.

    app.py      create_app: the aiohttp app, its middleware, every group of routes below
    api.py      /api/v1 as JSON, /api/v1/openapi.json and /metrics
    stream.py   the pages' live updates (server-sent events) and their caps
    pages.py    the status pages (templates in html/) and their buttons
    boot.py     what machines fetch: scripts, kernels, overlays, the phone-home; /healthz
    auth.py     the API token, the pages' cookie, the Host and Origin checks, the security headers
    query.py    what the pages, the API and the streams look up: a machine, a page of machines, numbers
    routes.py   what the route modules share: app keys, route helpers, errors as statuses
    metrics.py  Prometheus metrics, read from the store
    openapi.py  the OpenAPI 3 description of /api/v1
    views.py    what we say about a machine and its events; shared with the CLI, knows nothing of HTTP

Each module imports only modules listed below it: no cycles, and none imports app.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Imported when asked for, not with the package: the CLI uses views.py and must not load aiohttp for that.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
