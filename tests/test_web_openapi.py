"""The OpenAPI description (bootserver/web/openapi.py), fetched over aiohttp's real loopback test server: valid,
and exactly the API's routes and methods."""

from __future__ import annotations

import re

import pytest
from openapi_spec_validator import validate

from bootserver.web import create_app

METHODS = {"get", "post", "put", "delete", "patch"}


@pytest.fixture
async def client(aiohttp_client, booter):
    return await aiohttp_client(create_app(booter))


async def served_spec(client) -> dict:
    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    return await response.json()


async def test_the_description_is_valid_openapi(client):
    validate(await served_spec(client))


async def test_every_api_route_and_method_is_described_and_nothing_else(client):
    spec = await served_spec(client)
    described = {(path, method) for path, item in spec["paths"].items() for method in item if method in METHODS}
    routes = {(re.sub(r"\{(\w+)\}", r"{\1}", r.resource.canonical), r.method.lower())
              for r in client.server.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/v1/") and r.method.lower() in METHODS}
    assert described == routes


async def test_every_operation_says_what_it_answers(client):
    spec = await served_spec(client)
    silent = [f"{method.upper()} {path}" for path, item in spec["paths"].items()
              for method, operation in item.items() if method in METHODS and not operation.get("responses")]
    assert silent == []
