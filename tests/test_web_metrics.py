"""/metrics (bootserver/web/metrics.py) of a served instance, read with Prometheus's own parser: counts from the
store, one series for every lifecycle state."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support.wait import until_async

from bootserver.app import STORE, http_address
from bootserver.lifecycle import State

MAC = "52:54:00:00:00:01"
URL_MAC = "52-54-00-00-00-01"


def base(app: web.Application) -> str:
    return f"http://127.0.0.1:{http_address(app)[1]}"


async def samples(http: aiohttp.ClientSession, app: web.Application) -> dict[tuple[str, tuple], float]:
    async with http.get(f"{base(app)}/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_machines_by_state_follow_a_boot(app: web.Application):
    async with aiohttp.ClientSession() as http:
        before = await samples(http, app)
        assert {state: before[("bootserver_machines", (("state", state),))] for state in State} == dict.fromkeys(
            State, 0)
        async with http.get(f"{base(app)}/boot/{URL_MAC}.ipxe") as response:
            assert response.status == 200
        after = await samples(http, app)
    assert after[("bootserver_machines", (("state", State.SCRIPT_SERVED),))] == 1
    assert sum(v for (name, _), v in after.items() if name == "bootserver_machines") == 1


async def test_provisioning_step_times_are_summed_by_step(app: web.Application):
    app[STORE].record(MAC, "step-done", {"step": "disk", "seconds": 1.5})
    app[STORE].record(MAC, "step-done", {"step": "disk", "seconds": 2.5})
    app[STORE].record(MAC, "step-done", {"step": "deploy", "seconds": 4.0})
    async with aiohttp.ClientSession() as http:
        found = await samples(http, app)
    assert found[("bootserver_provision_step_seconds_count", (("step", "disk"),))] == 2
    assert found[("bootserver_provision_step_seconds_sum", (("step", "disk"),))] == 4.0
    assert found[("bootserver_provision_step_seconds_sum", (("step", "deploy"),))] == 4.0


async def test_bytes_served_count_every_file_sent(app: web.Application):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base(app)}/boot/{URL_MAC}.ipxe") as response:
            assert response.status == 200
        async with http.get(f"{base(app)}/boot/{URL_MAC}/vmlinuz") as response:
            kernel = await response.read()
        key = ("bootserver_served_bytes_total", (("protocol", "http"),))
        # the file is recorded just after the client has it all
        assert await until_async(lambda: served(http, app, key), what="the kernel's bytes") == len(kernel) == 100_010


async def served(http: aiohttp.ClientSession, app: web.Application, key: tuple) -> float:
    return (await samples(http, app)).get(key, 0)


async def test_the_store_reports_its_durability_and_group_commits_from_the_live_connection(app: web.Application):
    """What a kill -9 cannot tell apart (synchronous=FULL from OFF) is read off the running server's own connection;
    and two requests' writes of one event-loop turn are one COMMIT holding both."""
    store = app[STORE]
    with store.group_commit() as first:
        store.record(MAC, "script-served")
    with store.group_commit() as second:
        store.record("52:54:00:00:00:02", "script-served")
    await first
    await second
    async with aiohttp.ClientSession() as http:
        found = await samples(http, app)
    assert found[("bootserver_store_info", (("backend", "sqlite"), ("journal_mode", "wal"),
                                            ("synchronous", "full")))] == 1
    assert found[("bootserver_store_group_commits_total", ())] == 1
    assert found[("bootserver_store_group_committed_requests_total", ())] == 2
    assert found[("bootserver_store_largest_group_commit", ())] == 2


async def test_records_written_behind_are_counted(app: web.Application):
    """Three boot scripts' records wait in memory; /metrics reads the machines, which writes them first."""
    store = app[STORE]
    for n in range(3):
        store.record_behind(f"52:54:00:00:00:1{n}", "script-served", {"n": n})
    assert store.queued_behind == 3
    async with aiohttp.ClientSession() as http:
        found = await samples(http, app)
    assert found[("bootserver_store_behind_flushes_total", ())] == 1
    assert found[("bootserver_store_written_behind_total", ())] == 3
    assert found[("bootserver_store_largest_behind", ())] == 3
    assert found[("bootserver_store_behind_waits_total", ())] == 0
    assert found[("bootserver_store_queued_behind", ())] == 0
    assert found[("bootserver_machines", (("state", "discovered"),))] == 3
