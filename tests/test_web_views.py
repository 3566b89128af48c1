"""What we say about a machine (bootserver/web/views.py), as a served instance's API and pages say it: where it is
on the happy path, which group and profile it gets and why, its host key by fingerprint only."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from support.http import report

from bootserver.app import http_address
from bootserver.lifecycle import OFF_PATH, PROGRESS, State
from bootserver.web.views import progress

MAC = "52:54:00:00:00:01"
URL_MAC = "52-54-00-00-00-01"


def base(app: web.Application) -> str:
    return f"http://127.0.0.1:{http_address(app)[1]}"


async def machine(http: aiohttp.ClientSession, app: web.Application) -> dict:
    async with http.get(f"{base(app)}/api/v1/machines/{MAC}") as response:
        assert response.status == 200
        return await response.json()


@pytest.mark.parametrize("state", list(State))
def test_every_state_has_a_place_and_a_tone(state: State):
    shown = progress(state)
    assert shown.total == len(PROGRESS) and 0 <= shown.done <= shown.total
    assert shown.tone in {"ok", "busy", "bad", "idle"}
    # Off the bar, an end that is not running (deployed: files only, no OS to boot) shows done.
    assert (shown.done > 0) == (state in PROGRESS or OFF_PATH.get(state) == "ok")
    expected = "ok" if state == PROGRESS[-1] else "busy" if state in PROGRESS else OFF_PATH.get(state, "idle")
    assert shown.tone == expected


async def test_a_machine_shows_its_place_its_group_and_its_host_key_fingerprint(app: web.Application):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base(app)}/boot/{URL_MAC}.ipxe") as response:
            script = await response.text()
        view = await machine(http, app)
        assert view["progress"] == {"state": "script-served", "done": 1, "total": len(PROGRESS), "tone": "busy"}
        assert (view["hostname"], view["group"], view["profile"]) == ("node1", "raft", "raft")
        assert "role=raft" in view["reason"]
        assert view["host_key_fingerprint"] is None

        token = script.split("bootserver.token=", 1)[1].split()[0]
        async with http.post(f"{base(app)}/boot/{URL_MAC}/phone-home", json=report(token, ip="127.0.0.1")) as r:
            assert r.status == 202, await r.text()
        view = await machine(http, app)
    # Provisioning goes on from here (or fails: no SSH server listens), so only the pinned key is certain.
    assert view["host_key_fingerprint"].startswith("SHA256:") and "host_key" not in view


async def test_the_page_shows_the_same_view(app: web.Application):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base(app)}/boot/{URL_MAC}.ipxe") as response:
            assert response.status == 200
        async with http.get(f"{base(app)}/machines/{MAC}") as response:
            page = await response.text()
    assert response.status == 200
    assert "node1" in page and "script-served" in page and "raft" in page


async def test_an_install_shows_its_bytes_as_a_progress_bar_while_it_runs(app: web.Application):
    from bootserver.app import STORE

    store = app[STORE]
    store.record(MAC, "step-started", {"step": "install"}, state="install")
    store.record(MAC, "install-progress", {"source": "golden.raw", "bytes": 256 << 20, "total": 1 << 30,
                                           "seconds": 4.0, "mb_per_s": 67.1})
    async with aiohttp.ClientSession() as http:
        view = await machine(http, app)
        async with http.get(f"{base(app)}/machines/{MAC}") as response:
            page = await response.text()
        assert view["installing"]["bytes"] == 256 << 20 and view["installing"]["total"] == 1 << 30
        assert f'<progress value="{256 << 20}" max="{1 << 30}"></progress>' in page
        assert "installing golden.raw: 256.0 MiB of 1.0 GiB" in page, page
        store.record(MAC, "step-done", {"step": "install"})
        store.record(MAC, "step-started", {"step": "deploy"}, state="deploy")
        assert (await machine(http, app))["installing"] is None  # only while installing
