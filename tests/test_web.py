"""Status pages, the JSON API and live updates, over aiohttp's real loopback test server."""

import asyncio
import dataclasses
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.http import api_token, bearer, boot_token, read_event, report
from support.wait import until_async

from bootserver.booter import Booter
from bootserver.config import Config, Machine
from bootserver.tokens import Signer
from bootserver.web import create_app
from bootserver.web.routes import BOOTER
from bootserver.web.stream import STREAMS

MAC = "52:54:00:00:00:01"
TOKEN = "s3cret-api-token-0123456789"
HOSTILE = "<script>alert('owned')</script>"


@pytest.fixture
async def client(aiohttp_client, booter):
    return await aiohttp_client(create_app(booter))


def with_server(booter: Booter, config: Config, **changes) -> Booter:
    """The booter reloaded with a changed config: [server] settings, or the machines."""
    if "machines" in changes:
        config = dataclasses.replace(config, machines=changes.pop("machines"))
    booter.reload(dataclasses.replace(config, server=dataclasses.replace(config.server, **changes)))
    return booter


async def boot(client, mac: str = "52-54-00-00-00-01") -> None:
    """What iPXE does: fetch the machine's script, then its kernel (recorded just after the client has it)."""
    assert (await client.get(f"/boot/{mac}.ipxe", params={"platform": "efi"})).status == 200
    assert (await (await client.get(f"/boot/{mac}/vmlinuz")).read())
    history = client.server.app[BOOTER].history()
    await until_async(lambda: history.node(mac.replace("-", ":")).state == "kernel-served")


# -- pages ------------------------------------------------------------------------------------------------


async def test_machine_list_comes_a_page_at_a_time(client, booter, store, monkeypatch):
    macs = [f"52:54:00:00:01:{i:02x}" for i in range(5)]
    for mac in reversed(macs):
        store.record(mac, "script-served", state="failed" if mac.endswith(("01", "03")) else "deployed")
    body = await (await client.get("/api/v1/machines", params={"limit": "2"})).json()
    assert [m["mac"] for m in body["machines"]] == macs[:2] and body["next_after"] == macs[1]
    body = await (await client.get("/api/v1/machines", params={"limit": "2", "after": macs[3]})).json()
    assert [m["mac"] for m in body["machines"]] == macs[4:] and body["next_after"] is None
    body = await (await client.get("/api/v1/machines", params={"state": "failed", "limit": "1"})).json()
    assert [m["mac"] for m in body["machines"]] == [macs[1]] and body["next_after"] == macs[1]
    assert body["counts"] == {"deployed": 3, "failed": 2}  # counts are over all machines, not the page
    assert (await client.get("/api/v1/machines", params={"after": "not-a-mac"})).status == 400
    monkeypatch.setattr("bootserver.web.pages.PAGE_ROWS", 2)
    html = await (await client.get("/", params={"state": "deployed"})).text()
    assert macs[0] in html and macs[2] in html and macs[4] not in html
    assert 'href="/?state=deployed&amp;after=52%3A54%3A00%3A00%3A01%3A02">next page' in html
    html = await (await client.get("/", params={"state": "deployed", "after": macs[2]})).text()
    assert macs[4] in html and macs[0] not in html and "next page" not in html and "first page" in html


async def test_every_event_names_the_replica_that_recorded_it(client, booter):
    await boot(client)
    html = await (await client.get(f"/machines/{MAC}")).text()
    assert '<span class="replica muted" title="the bootserver that recorded it">test-replica</span>' in html
    body = await (await client.get(f"/api/v1/machines/{MAC}/events")).json()
    assert {e["replica"] for e in body["events"]} == {"test-replica"}


async def test_overview_lists_and_filters_by_state(client, booter, store):
    await boot(client)
    await client.get("/boot/52-54-00-00-00-02.ipxe")
    await until_async(lambda: store.node(MAC).state == "kernel-served")
    html = await (await client.get("/")).text()
    assert "52:54:00:00:00:01" in html and "52:54:00:00:00:02" in html
    assert "node1" in html and 'title="2 of 10: kernel-served"' in html
    html = await (await client.get("/", params={"state": "kernel-served"})).text()
    assert "52:54:00:00:00:01" in html and "52:54:00:00:00:02" not in html
    body = await (await client.get("/api/v1/machines", params={"state": "script-served,failed"})).json()
    assert [m["mac"] for m in body["machines"]] == ["52:54:00:00:00:02"]
    assert body["counts"] == {"kernel-served": 1, "script-served": 1}
    machine = body["machines"][0]
    assert (machine["hostname"], machine["profile"], machine["group"]) == ("node2", "raft", "raft")
    assert machine["progress"] == {"state": "script-served", "done": 1, "total": 10, "tone": "busy"}


async def test_machine_page_explains_and_shows_the_timeline(client, booter, store):
    await boot(client)
    token = await boot_token(client)
    assert (await client.post("/boot/52-54-00-00-00-01/phone-home", json=report(token, secure_boot=True))).status == 202
    fingerprint = store.events(MAC)[-1].detail["fingerprint"]
    assert store.node(MAC).facts["secure_boot"] == "true"  # what the agent read, kept as the machine's fact
    for spelling in ("52-54-00-00-00-01", "525400000001", "5254.0000.0001", "52:54:00:00:00:01"):
        response = await client.get(f"/machines/{spelling}")
        assert response.status == 200 and response.content_type == "text/html"
    html = await response.text()
    assert "group raft-efi (platform=efi, role=raft)" in html  # the reason the group won
    assert fingerprint in html
    assert "vmlinuz: 97.7 KiB over http" in html and "phoned-home" in html
    assert 'action="/machines/52:54:00:00:00:01/reprovision"' in html
    body = await (await client.get("/api/v1/machines/52-54-00-00-00-01")).json()
    assert body["host_key_fingerprint"] == fingerprint and body["reason"].startswith("group raft-efi")
    assert body["facts"]["secure_boot"] == "true" and 'secure_boot=<span class="mono">true</span>' in html
    assert [e["kind"] for e in body["events"]][-1] == "phoned-home"


async def test_the_installed_os_reports_its_first_boot_and_secure_boot_becomes_a_fact(client, store, keys):
    store.record(MAC, "script-served", {}, state="finishing")
    presented, token = Signer(keys.token_key).issue(MAC, 5, purpose="report")
    store.installed(MAC, "ssh-ed25519 AAAA", token, {})
    booted = {"token": presented, "kernel": "6.1.0-28-cloud-amd64", "boot_id": "b", "system_state": "running",
              "failed_units": [], "secure_boot": True}
    assert (await client.post(f"/boot/{MAC}/booted", json=booted)).status == 202
    assert store.node(MAC).state == "booted" and store.node(MAC).facts["secure_boot"] == "true"
    assert store.events(MAC)[-1].detail["secure_boot"] is True
    # Not UEFI (no such variable): nothing is said, and nothing earlier is overwritten.
    presented, token = Signer(keys.token_key).issue(MAC, 5, purpose="report")
    store.installed(MAC, "ssh-ed25519 AAAA", token, {})
    assert (await client.post(f"/boot/{MAC}/booted", json={**booted, "token": presented,
                                                            "secure_boot": None})).status == 202
    assert store.events(MAC)[-1].detail["secure_boot"] is None and store.node(MAC).facts["secure_boot"] == "true"


async def test_machine_page_lists_the_certificates_issued(client, booter, store, keys):
    await boot(client)
    html = await (await client.get(f"/machines/{MAC}")).text()
    assert 'id="certificates"' not in html  # none issued yet: no empty list
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    details = []
    for ip in ("10.0.0.5", "10.0.0.6"):
        issued = keys.sign(csr.public_bytes(serialization.Encoding.PEM), "node1", [ip])
        details.append(issued.event_detail())
        store.record(MAC, "certificate-issued", issued.event_detail())
    html = await (await client.get(f"/machines/{MAC}")).text()
    table = html[html.index('id="certificates"'):html.index("</table>", html.index('id="certificates"'))]
    newest, oldest = details[1], details[0]
    assert table.index(newest["serial"]) < table.index(oldest["serial"])  # newest first
    for detail, ip in ((newest, "10.0.0.6"), (oldest, "10.0.0.5")):
        assert f"node1, {ip}" in table and detail["fingerprint_sha256"] in table
        expires = datetime.datetime.fromisoformat(detail["not_after"]).strftime("%Y-%m-%d %H:%M")
        assert f"{expires} UTC" in table
        summary = (f"TLS certificate issued: serial {detail['serial']}, SANs node1, {ip}, "
                   f"expires {expires} UTC")
        assert summary in html  # the timeline says it too
    event = (await (await client.get(f"/api/v1/machines/{MAC}/events")).json())["events"][-1]
    assert event["kind"] == "certificate-issued" and event["tone"] == "ok"
    assert event["summary"].startswith(f"TLS certificate issued: serial {newest['serial']}")


async def test_unknown_and_malformed_macs_get_clear_pages(client):
    response = await client.get("/machines/52:54:00:00:00:77")
    assert response.status == 404 and response.content_type == "text/html"
    assert "no machine 52:54:00:00:00:77 has asked this server for anything" in await response.text()
    response = await client.get("/machines/not-a-mac")
    assert response.status == 400 and "not a MAC address: &#39;not-a-mac&#39;" in await response.text()
    response = await client.get("/api/v1/machines/zz")
    assert response.status == 400 and "not a MAC address" in (await response.json())["error"]
    assert (await client.get("/api/v1/machines/52:54:00:00:00:77/events")).status == 404


async def test_everything_from_machines_is_escaped(aiohttp_client, booter, store, config):
    booter = with_server(booter, config, machines={MAC: Machine(MAC, hostname=HOSTILE)})
    client = await aiohttp_client(create_app(booter))
    await boot(client)
    before = store.last_event_id()
    store.record(MAC, "command", {"step": "disk", "command": f"echo {HOSTILE}", "exit_status": 1,
                                         "seconds": 0.1, "stdout_tail": HOSTILE, "stderr_tail": ""})
    store.record(MAC, "dhcp", {"vendor_class": HOSTILE, "user_class": "iPXE", "arch": 7,
                                      "answer": {"bootfile": '"><img src=x onerror=alert(1)>'}})
    pages = [await (await client.get(path)).text() for path in ("/", f"/machines/{MAC}")]
    async with client.get(f"/machines/{MAC}/stream", params={"after": str(before)}) as stream:
        data = (await read_event(stream))["data"]
        pages += [data["html"], data["summary_html"]]
    for html in pages:
        assert "<script>alert" not in html and "<img src=x" not in html
    escaped = "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;"
    assert pages[0].count(escaped) == 3  # the hostname, the last event's summary (its text and its title)
    assert pages[1].count(escaped) >= 5  # title, heading, summary, command and its output, DHCP
    assert escaped in pages[2] and escaped in pages[3]  # the live event and the live summary


# -- write actions, cross-site requests and the API token ------------------------------------------------


async def test_buttons_work_same_origin_and_refuse_cross_site(client, booter, store, config):
    await boot(client)
    page = f"/machines/{MAC}/reprovision"
    form = {"api_token": api_token(config)}
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"}, {"Origin": "null"}):
        response = await client.post(page, headers=headers, data=form, allow_redirects=False)
        assert response.status == 403, headers
        assert "refused" in await response.text()
        response = await client.post(f"/api/v1/machines/{MAC}/boot-from-disk",
                                     headers={**headers, **bearer(config)})
        assert response.status == 403, headers
    assert store.node(MAC).state == "kernel-served"  # nothing happened
    origin = f"http://127.0.0.1:{client.port}"
    response = await client.post(page, headers={"Sec-Fetch-Site": "same-origin", "Origin": origin}, data=form,
                                 allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == f"/machines/{MAC}"
    node = store.node(MAC)
    assert node.state == "reprovision" and node.reprovision
    response = await client.post(f"/machines/{MAC}/boot-from-disk", headers={"Origin": origin}, data=form,
                                 allow_redirects=False)
    assert response.status == 303
    node = store.node(MAC)
    assert node.state == "deployed" and not node.reprovision
    script = await (await client.get("/boot/52-54-00-00-00-01.ipxe")).text()
    assert "sanboot" in script or "exit" in script  # it boots its disk now
    # curl: no browser headers, the token
    body = await (await client.post(f"/api/v1/machines/{MAC}/reprovision", headers=bearer(config))).json()
    assert body["state"] == "reprovision" and body["reprovision"] is True
    missing = await client.post("/api/v1/machines/52:54:00:00:00:77/reprovision", headers=bearer(config))
    assert missing.status == 404


async def test_api_token_guards_the_api_and_the_buttons(aiohttp_client, booter, store, config):
    client = await aiohttp_client(create_app(with_server(booter, config, api_token=TOKEN, pages="token")))
    await boot(client)
    response = await client.get("/api/v1/machines")
    assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "api_token" in (await response.json())["error"]
    wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
    assert (await client.get("/api/v1/machines", headers=wrong)).status == 401
    assert (await client.post(f"/api/v1/machines/{MAC}/reprovision", headers=wrong)).status == 401
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get(f"/api/v1/machines/{MAC}/events", headers=right)).status == 200
    assert (await client.get("/api/v1/openapi.json")).status == 200  # how to authenticate is public
    # The buttons need the token, typed into the form.
    html = await (await client.get(f"/machines/{MAC}", headers=right)).text()
    assert 'name="api_token"' in html
    response = await client.post(f"/machines/{MAC}/reprovision", data={"api_token": "nope"}, allow_redirects=False)
    assert response.status == 401 and "wrong API token" in await response.text()
    assert store.node(MAC).state == "kernel-served"
    response = await client.post(f"/machines/{MAC}/reprovision", data={"api_token": TOKEN}, allow_redirects=False)
    assert response.status == 303 and store.node(MAC).state == "reprovision"
    response = await client.post(f"/api/v1/machines/{MAC}/boot-from-disk", headers=right)
    assert response.status == 200 and (await response.json())["state"] == "deployed"


async def test_events_api_pages_with_after(client, booter):
    await boot(client)
    events = (await (await client.get(f"/api/v1/machines/{MAC}/events")).json())["events"]
    assert [e["kind"] for e in events] == ["script-served", "file-served"]
    assert events[1]["summary"].startswith("vmlinuz: 97.7 KiB over http")
    body = await (await client.get(f"/api/v1/machines/{MAC}/events", params={"after": events[0]["id"]})).json()
    assert [e["id"] for e in body["events"]] == [events[1]["id"]] and body["last_id"] == events[1]["id"]
    body = await (await client.get(f"/api/v1/machines/{MAC}/events", params={"after": body["last_id"]})).json()
    assert body["events"] == [] and body["last_id"] == events[1]["id"]
    assert (await client.get(f"/api/v1/machines/{MAC}/events", params={"after": "-1"})).status == 400


# -- live updates ------------------------------------------------------------------------------------------


async def test_stream_delivers_new_events_resumes_and_ends_with_the_client(client, booter, store):
    await boot(client)
    last = store.last_event_id(MAC)
    async with client.get(f"/machines/{MAC}/stream", params={"after": str(last)}) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        store.record("52:54:00:00:00:02", "no-boot", {"reason": "another machine"})  # not this one's
        event = store.record(MAC, "step-started", {"step": "disk"}, state="disk")
        message = await read_event(stream)
        assert message["id"] == event.id
        data = message["data"]
        assert data["kind"] == "step-started" and data["summary"] == "step disk started"
        assert f'id="event-{event.id}"' in data["html"] and "step disk started" in data["html"]
        assert 'title="4 of 10: disk"' in data["summary_html"]
    # The browser reconnects with the last id it saw: it gets what it missed, and only that.
    missed = store.record(MAC, "step-done", {"step": "disk", "seconds": 1.0})
    async with client.get(f"/machines/{MAC}/stream", headers={"Last-Event-ID": str(event.id)}) as stream:
        assert (await read_event(stream))["id"] == missed.id
    await until_async(lambda: not client.server.app[STREAMS])  # both handlers ended with their clients
    async with client.get("/stream", params={"after": str(event.id)}) as stream:
        assert (await read_event(stream))["data"] == {"id": missed.id, "mac": MAC, "kind": "step-done"}
    response = await client.get(f"/machines/{MAC}/stream", headers={"Last-Event-ID": "x1"})
    assert response.status == 400


async def test_server_shutdown_ends_open_streams(aiohttp_client, booter, store):
    store.record(MAC, "no-boot", {})
    client = await aiohttp_client(create_app(booter))
    stream = await client.get(f"/machines/{MAC}/stream")
    await until_async(lambda: client.server.app[STREAMS])
    started = asyncio.get_running_loop().time()
    await client.server.close()
    assert asyncio.get_running_loop().time() - started < 5  # not aiohttp's 60 s grace period
    stream.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # the CLI process opens the config's SQLite file
async def test_stream_shows_what_another_process_recorded(client, booter, config_file):
    """`bootserver reprovision` in a shell writes to the store; an open page sees it (the stream polls)."""
    import sys

    await boot(client)
    async with client.get(f"/machines/{MAC}/stream") as stream:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bootserver", "--config",
                                                       str(config_file), "reprovision", "52-54-00-00-00-01",
                                                       stdout=asyncio.subprocess.DEVNULL)
        assert await process.wait() == 0
        data = (await read_event(stream, timeout=10))["data"]
        assert data["kind"] == "reprovision-requested" and ">reprovision<" in data["summary_html"]


@pytest.mark.parametrize("token", ["short", "has spaces in it, long enough", 12345678901234567890])
def test_api_token_must_be_a_long_header_safe_string(token, tmp_path):
    from bootserver.config import parse
    from bootserver.errors import ConfigError

    with pytest.raises(ConfigError, match="api_token"):
        parse({"server": {"data_dir": str(tmp_path), "api_token": token}})
    assert parse({"server": {"data_dir": str(tmp_path), "api_token": TOKEN}}).server.api_token == TOKEN
