"""The operator's views over a served app: the waterfall, the fleet, the sortable list, their JSON twins and the
phase histograms in /metrics, from boots written into the store at chosen times (support/boots.py)."""

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.boots import FULL_BOOT, FULL_PHASES, SLOW, STUCK, TWICE, fill_fleet, record
from support.http import read_event

from bootserver.phases import PHASES
from bootserver.web import create_app

T0 = 1_700_000_000.0
RAFT = TWICE  # node1: group raft, profile raft (conftest)
HOSTILE = "<script>alert('owned')</script>"


@pytest.fixture
async def client(aiohttp_client, booter):
    return await aiohttp_client(create_app(booter))


def fill(store) -> None:
    fill_fleet(store, T0, HOSTILE)


async def test_the_waterfall_has_every_phase_in_order_with_the_events_durations(client, store):
    record(store, RAFT, FULL_BOOT, T0)
    body = await (await client.get(f"/api/v1/machines/{RAFT}/waterfall")).json()
    boot = body["boot"]
    assert [(p["phase"], p["seconds"]) for p in boot["phases"]] == FULL_PHASES
    assert boot["outcome"] == "running" and boot["seconds"] == 171 and boot["start"] == T0
    kernel = boot["phases"][3]
    assert kernel["bytes"] == 40 << 20 and kernel["rate"] == (40 << 20) / 6
    html = await (await client.get(f"/machines/{RAFT}")).text()
    rows = re.findall(r'<tr class="[^"]*" data-phase="([^"]+)" data-seconds="([^"]+)">', html)
    assert [(phase, float(seconds)) for phase, seconds in rows] == FULL_PHASES
    assert "40.0 MiB" in html and "6.7 MiB/s" in html


async def test_earlier_boots_are_listed_and_shown_the_failure_marked(client, store):
    fill(store)
    body = await (await client.get(f"/api/v1/machines/{RAFT}/waterfall")).json()
    assert body["boot"]["outcome"] == "failed" and body["boot"]["failed_in"] == "kernel"
    assert body["boot"]["phases"][-1]["failure"] == "did not phone home"
    first, latest = body["boots"][1]["id"], body["boots"][0]["id"]
    assert [b["outcome"] for b in body["boots"]] == ["failed", "running"] and latest == body["boot"]["id"]
    html = await (await client.get(f"/machines/{RAFT}")).text()
    assert 'data-latest="yes"' in html and "✗ failed in kernel + initrds: did not phone home" in html
    assert f'href="?boot={first}"' in html
    earlier = await (await client.get(f"/api/v1/machines/{RAFT}/waterfall", params={"boot": str(first)})).json()
    assert earlier["boot"]["id"] == first and earlier["boot"]["outcome"] == "running"
    html = await (await client.get(f"/machines/{RAFT}", params={"boot": str(first)})).text()
    assert 'data-latest="no"' in html and "an earlier boot" in html
    assert (await client.get(f"/machines/{RAFT}", params={"boot": "x"})).status == 400
    response = await client.get(f"/api/v1/machines/{RAFT}/waterfall", params={"boot": str(first + 1)})
    assert response.status == 404 and "no boot starting at event" in (await response.json())["error"]


async def test_the_fleet_names_the_slowest_the_stuck_and_the_failures(client, store):
    fill(store)
    body = await (await client.get("/api/v1/fleet")).json()
    spreads = {s["phase"]: s for s in body["phases"]}
    assert spreads["install"]["slowest"][0] == {"mac": SLOW, "seconds": 150.0}  # 60 s + 9 x 10 s
    assert spreads["install"]["max"] == 150 and spreads["install"]["count"] == 13  # running, and failed after it
    assert [(s["mac"], s["phase"]) for s in body["stuck"]] == [(STUCK, "install")]
    assert [(f["reason"], f["count"]) for f in body["failures"]] == [
        ("no first-boot report within 10 minutes", 3), ("did not phone home", 1), (f"step disk failed: {HOSTILE}", 1)]
    assert body["behind"] == 0 and body["series"][-1]["counts"]["running"] == 10
    html = await (await client.get("/fleet")).text()
    slowest = re.search(r'<tr data-phase="install">.*?</tr>', html, re.S)[0]
    assert f'<a class="mono" href="/machines/{SLOW}"' in slowest.split('class="slowest"')[1].split(",")[0]
    assert f'href="/machines/{STUCK}"' in html.split('class="stuck"')[1].split("</table>")[0]
    assert "<script>alert" not in html and "step disk failed: &lt;script&gt;" in html


async def test_the_fleet_filters_by_group_and_profile_and_refuses_unknown_names(client, store):
    fill(store)
    body = await (await client.get("/api/v1/fleet", params={"group": "raft"})).json()
    assert body["machines"] == 1 and body["failures"][0]["macs"] == [RAFT] and body["group"] == "raft"
    body = await (await client.get("/api/v1/fleet", params={"profile": "discovery"})).json()
    assert body["machines"] == 15
    html = await (await client.get("/fleet", params={"group": "raft", "profile": "raft"})).text()
    assert 'value="raft"' in html and SLOW not in html
    for params in ({"group": HOSTILE}, {"profile": "nope"}):
        response = await client.get("/api/v1/fleet", params=params)
        assert response.status == 400 and "in the config; it has:" in (await response.json())["error"]
        page = await client.get("/fleet", params=params)
        assert page.status == 400 and "<script>alert" not in await page.text()


async def test_the_list_shows_ip_phase_boot_and_last_event_and_sorts(client, store):
    fill(store)
    html = await (await client.get("/", params={"sort": "boot", "order": "desc"})).text()
    macs = re.findall(r'<td class="mono"><a href="/machines/([^"]+)">', html)
    assert macs[:2] == [STUCK, SLOW]  # the stuck one's boot lasts until now: the longest of all
    assert 'href="/?sort=boot&amp;order=asc"' in html  # the sorted column sorts the other way when clicked
    row = re.search(rf'<a href="/machines/{SLOW}">.*?</tr>', html, re.S)[0]
    assert "running" in row and "running with profile debian" in row and "4 min 21 s" in row  # 171 s + 90 s
    html = await (await client.get("/", params={"sort": "mac", "order": "desc", "group": "raft"})).text()
    assert re.findall(r'<td class="mono"><a href="/machines/([^"]+)">', html) == [RAFT]
    for params in ({"sort": "bogus"}, {"order": "up"}, {"sort": "ip", "page": "²"}, {"group": "nope"}):
        assert (await client.get("/", params=params)).status == 400
    machine = await (await client.get(f"/api/v1/machines/{SLOW}")).json()
    assert machine["phase"] == "running" and machine["boot_seconds"] == 261
    assert machine["last_event"]["kind"] == "running" and machine["since"] == T0 + 261


async def test_the_waterfall_follows_new_events_live(client, store):
    record(store, RAFT, FULL_BOOT[:6], T0)
    html = await (await client.get(f"/machines/{RAFT}")).text()
    last = re.search(r'data-stream="/machines/[^?]+\?after=(\d+)"', html)[1]
    async with client.get(f"/machines/{RAFT}/stream", params={"after": last}) as stream:
        record(store, RAFT, FULL_BOOT[6:8], T0)
        data = (await read_event(stream))["data"]
    phases = re.findall(r'data-phase="([^"]+)"', data["waterfall_html"])
    assert phases == list(PHASES[:6])  # phone-home and disk joined the kernel phase's predecessors


async def test_metrics_have_a_histogram_of_phase_durations(client, store):
    fill(store)
    text = await (await client.get("/metrics")).text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    install = ("phase", "install")
    # Every boot read, not only the latest: node1's first boot too.
    assert samples[("bootserver_boot_phase_seconds_count", (install,))] == 14
    assert samples[("bootserver_boot_phase_seconds_bucket", (("le", "60.0"), install))] == 5  # 60 s each
    assert samples[("bootserver_boot_phase_seconds_bucket", (("le", "+Inf"), install))] == 14
    assert samples[("bootserver_boot_phase_seconds_count", (("phase", "running"),))] == 11
