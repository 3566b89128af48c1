"""The status page in a real browser (Debian's chromium, driven by Playwright) against the real server.

A missing chromium or playwright fails these tests rather than skipping them: `./setup test`
installs both. Playwright's own browser downloads are never used (executable_path).
"""

import re
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.boots import FULL_PHASES, SLOW, STUCK, fill_fleet
from support.browser import chromium
from support.http import api_token, report

from bootserver.app import CONFIG, STORE, http_address
from bootserver.phases import LABELS, PHASES
from bootserver.web.views import duration

REPO = Path(__file__).resolve().parent.parent
MAC = "52:54:00:00:00:01"
URL_MAC = "52-54-00-00-00-01"


@pytest.fixture
async def browser():
    async with chromium() as browser:
        yield browser


async def test_status_page_updates_live_and_reprovisions(app: web.Application, browser, tmp_path: Path):
    from playwright.async_api import expect

    base = f"http://127.0.0.1:{http_address(app)[1]}"
    async with aiohttp.ClientSession(base) as machine:
        # The machine's first request creates it; its script carries this boot's phone-home token.
        script = await (await machine.get(f"/boot/{URL_MAC}.ipxe", params={"platform": "efi",
                                                                          "arch": "x86_64"})).text()
        token = re.search(r"bootserver\.token=(\S+)", script)[1]

        page = await browser.new_page(viewport={"width": 1180, "height": 600})
        await page.goto(f"{base}/machines/{URL_MAC}")
        await expect(page.locator("h1")).to_contain_text(MAC)
        await expect(page.locator("#live")).to_have_text("live")  # the EventSource is connected
        await page.evaluate("window.notReloaded = true")
        timeline, summary = page.locator("#timeline"), page.locator("#summary")

        # The rest of the boot, through the real endpoints, shows up without a reload.
        for name in ("vmlinuz", "initrd", "raft-initrd", f"{token}/bootserver.cpio"):
            assert (await (await machine.get(f"/boot/{URL_MAC}/{name}")).read())
        await expect(timeline).to_contain_text("vmlinuz: 97.7 KiB over http")
        await expect(summary.locator(".badge")).to_have_text("kernel-served")
        body = report(token)
        assert (await machine.post(f"/boot/{URL_MAC}/phone-home", json=body)).status == 202
        fingerprint = next(e.detail["fingerprint"] for e in app[STORE].events(MAC) if e.kind == "phoned-home")
        await expect(timeline).to_contain_text(f"host key {fingerprint}")
        await expect(summary).to_contain_text(fingerprint)
        await expect(summary.locator(".badge")).to_have_text("phoned-home")
        # script-served, 4 files served, phoned-home, nothing-to-provision
        await expect(timeline.locator(":scope > li")).to_have_count(7)
        assert await page.evaluate("window.notReloaded === true")

        await timeline.get_by_text("phoned-home", exact=True).click()  # a detail opens in place
        await expect(timeline.get_by_text("size_bytes", exact=True)).to_be_visible()
        # For people to look at; docs/status-page.png is a copy made by hand (a test rewriting a
        # committed file would leave every checkout dirty).
        (REPO / "artifacts").mkdir(exist_ok=True)
        await page.screenshot(path=str(REPO / "artifacts" / "status-page.png"), full_page=True,
                              animations="disabled")  # the new-event highlight, finished

        # Re-provision: the button posts (same origin) with the API token typed in (the one the server made in
        # its data_dir), the page comes back with the new state.
        await page.locator('form[action$="/reprovision"] input[name="api_token"]').fill(api_token(app[CONFIG]))
        await page.get_by_role("button", name="Re-provision").click()
        await expect(summary.locator(".badge")).to_have_text("reprovision")
        await expect(timeline).to_contain_text("re-provisioning requested")
        node = app[STORE].node(MAC)
        assert node.state == "reprovision" and node.reprovision

        # The overview lists it, and the filter by state works in the browser too.
        await page.goto(f"{base}/?state=reprovision")
        await expect(page.locator("tbody tr")).to_have_count(1)
        await expect(page.locator("tbody")).to_contain_text("node1")
        await page.screenshot(path=str(REPO / "artifacts" / "status-index.png"), full_page=True)



async def test_the_operators_views_in_a_browser(app: web.Application, browser):
    """The waterfall has every phase in order with the durations the events make; the fleet page names the slowest
    machine; both follow new events live; readable on a phone. Screenshots of each view go to artifacts/ (docs/
    holds copies made by hand)."""
    from playwright.async_api import expect

    base = f"http://127.0.0.1:{http_address(app)[1]}"
    store = app[STORE]
    fill_fleet(store, time.time() - 3600)
    shots = REPO / "artifacts"
    shots.mkdir(exist_ok=True)
    page = await browser.new_page(viewport={"width": 1280, "height": 800})

    await page.goto(f"{base}/machines/{SLOW}")
    rows = page.locator("#waterfall tr[data-phase]")
    await expect(rows).to_have_count(len(PHASES))
    expected = [(name, seconds + (90 if name == "install" else 0)) for name, seconds in FULL_PHASES]
    assert [(await row.get_attribute("data-phase"), float(await row.get_attribute("data-seconds")))
            for row in await rows.all()] == expected
    took = [(await row.locator("th").inner_text(), await row.locator("td.num").first.inner_text())
            for row in await rows.all()]
    assert took == [(LABELS[name], duration(seconds)) for name, seconds in expected]
    await page.screenshot(path=str(shots / "waterfall.png"), full_page=True)

    await page.goto(f"{base}/fleet")
    slowest = page.locator('table.spreads tr[data-phase="install"] td.slowest a').first
    await expect(slowest).to_have_text(SLOW)
    await expect(page.locator("table.stuck")).to_contain_text(STUCK)
    await expect(page.locator("table.failures")).to_contain_text("no first-boot report within 10 minutes")
    await page.screenshot(path=str(shots / "fleet.png"), full_page=True)
    await slowest.click()
    await expect(page.locator("h1")).to_contain_text(SLOW)

    await page.goto(f"{base}/?sort=boot&order=desc")
    await expect(page.locator("tbody tr").first).to_contain_text(STUCK)  # the stuck boot: the longest of all
    await page.screenshot(path=str(shots / "machines.png"), full_page=True)

    # Live: the stuck machine's install finishes and its deploy starts while its page is open.
    await page.goto(f"{base}/machines/{STUCK}")
    await expect(page.locator("#live")).to_have_text("live")
    await expect(page.locator("#waterfall tr.current")).to_have_attribute("data-phase", "install")
    store.record(STUCK, "step-done", {"step": "install", "seconds": 60})
    store.record(STUCK, "step-started", {"step": "deploy"})
    await expect(page.locator("#waterfall tr.current")).to_have_attribute("data-phase", "deploy")

    # A phone: nothing wider than the screen but the list's own scrolling table.
    await page.set_viewport_size({"width": 390, "height": 844})
    for path in (f"/machines/{SLOW}", "/fleet"):
        await page.goto(base + path)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390, path
    await page.goto(f"{base}/machines/{SLOW}")
    await page.screenshot(path=str(shots / "waterfall-phone.png"), full_page=True)
