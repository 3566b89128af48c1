"""HTTP endpoints over a real loopback socket (aiohttp's test server and client)."""

import asyncio
import dataclasses
import hashlib
import json
import time

import aiohttp
import libarchive
import pytest
from support.http import boot_token, report
from support.wait import until_async

from bootserver.errors import Forbidden
from bootserver.store import Token
from bootserver.web import create_app


@pytest.fixture
async def client(aiohttp_client, booter):
    return await aiohttp_client(create_app(booter))


async def test_bootstrap_uses_the_host_it_was_asked_on(client):
    response = await client.get("/boot.ipxe", headers={"Host": "10.0.2.2:8080"})
    assert response.status == 200
    assert response.content_length == len(await response.read())  # iPXE wants Content-Length
    text = await response.text()
    assert text.startswith("#!ipxe\n")
    assert "chain --autofree http://10.0.2.2:8080/boot/${mac:hexhyp}.ipxe?platform=${platform}" in text


async def test_hostile_host_header_is_not_echoed_into_scripts(client):
    # aiohttp's client refuses to send such a header, so speak HTTP on a raw socket.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /boot.ipxe HTTP/1.1\r\nHost: x;shell y\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    assert text.startswith("HTTP/1.1 200")
    assert "shell" not in text and f"http://127.0.0.1:{client.port}/boot/" in text


async def test_public_address_overrides_host(aiohttp_client, booter):
    client = await aiohttp_client(create_app(booter, public_address="192.0.2.7"))
    text = await (await client.get("/boot.ipxe")).text()
    assert f"http://192.0.2.7:{client.port}/boot/" in text


async def test_machine_script_records_facts_and_event(client, booter, store):
    response = await client.get("/boot/52-54-00-00-00-01.ipxe",
                                params={"platform": "pcbios", "arch": "x86_64", "uuid": "", "junk": "x"})
    assert response.status == 200
    text = await response.text()
    assert "/boot/52-54-00-00-00-01/vmlinuz initrd=initrd initrd=raft-initrd" in text
    node = store.node("52:54:00:00:00:01")
    assert node.state == "script-served" and node.facts == {"platform": "pcbios", "arch": "x86_64"}


@pytest.mark.parametrize("mac", ["zz-zz", "52-54-00-00-00", "..%2f..%2fetc"])
async def test_malformed_mac_is_400(client, mac):
    response = await client.get(f"/boot/{mac}.ipxe")
    assert response.status == 400
    assert "not a" in await response.text()


async def test_unknown_mac_gets_the_default_group(client, booter, store):
    text = await (await client.get("/boot/aa-bb-cc-dd-ee-ff.ipxe")).text()
    assert "profile discovery (group default)" in text
    assert store.node("aa:bb:cc:dd:ee:ff").state == "script-served"


async def test_kernel_whole_and_ranged_with_events(client, booter, store, data_dir):
    kernel = (data_dir / "images" / "vmlinuz").read_bytes()
    await client.get("/boot/52-54-00-00-00-01.ipxe")
    response = await client.get("/boot/52-54-00-00-00-01/vmlinuz")
    assert response.status == 200 and response.content_length == len(kernel)
    assert await response.read() == kernel
    response = await client.get("/boot/52-54-00-00-00-01/vmlinuz", headers={"Range": "bytes=100000-"})
    assert response.status == 206
    assert await response.read() == b"kernel-end"
    def served():
        return [e for e in store.events("52:54:00:00:00:01") if e.kind == "file-served"]

    events = await until_async(lambda: len(served()) == 2 and served())
    assert [(e.detail["file"], e.detail["bytes"]) for e in events] == [("vmlinuz", len(kernel)),
                                                                        ("vmlinuz", 10)]
    assert store.node("52:54:00:00:00:01").state == "kernel-served"


@pytest.mark.parametrize("path", ["/boot/52-54-00-00-00-01/nope", "/boot/52-54-00-00-00-01/..%2f..%2fetc%2fpasswd",
                                  "/boot/52-54-00-00-00-01/%2e%2e", "/ipxe/..%2fpasswd", "/ipxe/nope.efi"])
async def test_unknown_or_traversing_files_are_404(client, path):
    response = await client.get(path)
    assert response.status in (400, 404)
    assert "root:" not in await response.text()


async def test_phone_home_pins_the_host_key_once(client, booter, store):
    token = await boot_token(client)
    body = report(token)
    response = await client.post("/boot/52-54-00-00-00-01/phone-home", json=body)
    assert response.status == 202
    assert (await response.json())["state"] == "phoned-home"
    node = store.node("52:54:00:00:00:01")
    # SSH goes to the address the call came from; what the node says its address is, is only recorded.
    assert (node.state, node.host_key, node.ip) == ("phoned-home", body["host_key"], "127.0.0.1")
    event = store.events("52:54:00:00:00:01")[-1]
    assert event.kind == "phoned-home" and event.detail["fingerprint"].startswith("SHA256:")
    assert event.detail["disks"] == [{"name": "vda", "size_bytes": 64 << 20, "partitions": 0}]
    # The same token again is a replay: refused, and the pinned key stays.
    response = await client.post("/boot/52-54-00-00-00-01/phone-home", json=report(token))
    assert response.status == 403 and "used already" in await response.text()
    assert store.node("52:54:00:00:00:01").host_key == body["host_key"]


async def test_token_abuse_is_refused_and_changes_nothing(client, booter, store):
    mine, other = await boot_token(client), await boot_token(client, "52-54-00-00-00-02")
    before = store.node("52:54:00:00:00:02")
    cases = [
        (None, 401, "no phone-home token"),
        ("", 401, "no phone-home token"),
        ("garbage", 403, "malformed"),
        (mine.split(".")[0] + ".wrongsecret", 403, "unknown phone-home token"),
        ("nosuchid." + mine.split(".")[1], 403, "unknown phone-home token"),
        (mine, 403, "another machine"),  # 01's token presented for 02
    ]
    for token, status, message in cases:
        response = await client.post("/boot/52-54-00-00-00-02/phone-home", json=report(token))
        assert response.status == status, token
        assert message in await response.text(), token
    after = store.node("52:54:00:00:00:02")
    assert dataclasses.replace(after, last_seen=0) == dataclasses.replace(before, last_seen=0)  # all but the time
    refused = [e for e in store.events("52:54:00:00:00:02") if e.kind == "refused"]
    assert len(refused) == len(cases)
    # A newer boot's token replaces the older one.
    newer = await boot_token(client, "52-54-00-00-00-02")
    response = await client.post("/boot/52-54-00-00-00-02/phone-home", json=report(other))
    assert response.status == 403 and "newer boot" in await response.text()
    assert (await client.post("/boot/52-54-00-00-00-02/phone-home", json=report(newer))).status == 202


async def test_expired_token_is_refused(client, booter, config, monkeypatch):
    token = await boot_token(client)
    later = time.time() + config.server.token_minutes * 60 + 1
    monkeypatch.setattr("bootserver.tokens.time.time", lambda: later)
    response = await client.post("/boot/52-54-00-00-00-01/phone-home", json=report(token))
    assert response.status == 403 and "expired" in await response.text()


async def test_phone_home_bad_bodies_are_400_or_413(client):
    token = await boot_token(client)
    url = "/boot/52-54-00-00-00-01/phone-home"
    assert (await client.post(url, data=b"{nope")).status == 400
    assert (await client.post(url, json=[1])).status == 400
    assert (await client.post(url, json=report(token, host_key="ssh-ed25519 notbase64"))).status == 400
    assert (await client.post(url, json=report(token, ip="10.0.2.999"))).status == 400
    assert (await client.post(url, data=b"x" * 100_000)).status == 413
    assert (await client.post(url, json=report(token))).status == 202  # none of that spent the token


async def test_node_config_and_overlay_need_this_boots_token(client, booter, keys):
    token = await boot_token(client)
    config = await (await client.get(f"/boot/52-54-00-00-00-01/{token}/config.json")).json()
    assert config["hostname"] == "node1" and config["token"] == token
    assert config["authorized_keys"][0] == keys.ssh_public
    assert "PRIVATE" not in json.dumps(config)
    response = await client.get(f"/boot/52-54-00-00-00-01/{token}/bootserver.cpio")
    assert response.status == 200
    with libarchive.memory_reader(await response.read()) as archive:
        files = {e.pathname: b"".join(e.get_blocks()) for e in archive}
    assert json.loads(files["etc/bootserver/config.json"]) == config
    assert files["etc/bootserver/authorized_keys"].decode().splitlines() == config["authorized_keys"]
    assert (await client.get(f"/boot/52-54-00-00-00-02/{token}/config.json")).status == 403
    assert (await client.get("/boot/52-54-00-00-00-01/x.y/config.json")).status == 403


async def test_ipxe_binary_over_http(client, booter, config):
    response = await client.get("/ipxe/undionly.kpxe")
    if not (config.server.ipxe_dir / "undionly.kpxe").exists():
        pytest.fail("Debian's ipxe package is not installed (the test set-up installs it)")
    assert response.status == 200
    assert await response.read() == (config.server.ipxe_dir / "undionly.kpxe").read_bytes()


async def test_api_and_health(client):
    await client.get("/boot/52-54-00-00-00-01.ipxe")
    body = await (await client.get("/api/v1/machines")).json()
    assert [m["mac"] for m in body["machines"]] == ["52:54:00:00:00:01"]
    body = await (await client.get("/api/v1/machines/525400000001")).json()
    assert body["events"][0]["kind"] == "script-served"
    assert (await client.get("/api/v1/machines/52:54:00:00:00:07")).status == 404
    health = await (await client.get("/healthz")).json()
    assert health["ok"] and health["missing_assets"] == [] and "undionly.kpxe" in health["ipxe_binaries"]


async def test_phone_home_from_another_address_than_the_script_fetch_is_refused(client, booter, store):
    token = await boot_token(client)  # fetched from 127.0.0.1
    before = store.node("52:54:00:00:00:01")
    url = f"http://127.0.0.1:{client.port}/boot/52-54-00-00-00-01/phone-home"
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as elsewhere, elsewhere.post(url, json=report(token)) as r:
        assert r.status == 403
        assert "issued to 127.0.0.1, which fetched the boot script, and is used from 127.0.0.2" in await r.text()
    after = store.node("52:54:00:00:00:01")
    assert dataclasses.replace(after, last_seen=0) == dataclasses.replace(before, last_seen=0)
    assert after.host_key is None and after.state == "script-served"
    refused = store.events("52:54:00:00:00:01")[-1]
    assert refused.kind == "refused" and "used from 127.0.0.2" in refused.detail["reason"]
    # The token was not spent: from the address that fetched the script, it works.
    assert (await client.post("/boot/52-54-00-00-00-01/phone-home", json=report(token))).status == 202


async def test_a_token_whose_record_was_lost_still_phones_home_once(client, store, keys):
    """A server killed within 100 ms of answering a script loses the script's record (written behind), never what
    the token needs: it is signed. The phone-home writes the machine and the spent token; a replay is refused."""
    from bootserver.tokens import Signer

    mac = "52:54:00:00:00:07"
    token, _ = Signer(keys.token_key).issue(mac, 5, "127.0.0.1")  # what a server issued, then died
    assert store.node(mac) is None and store.token(token.split(".")[0]) is None
    response = await client.post("/boot/52-54-00-00-00-07/phone-home", json=report(token))
    assert response.status == 202, await response.text()
    assert store.node(mac).state == "phoned-home" and store.token(token.split(".")[0]).used is not None
    response = await client.post("/boot/52-54-00-00-00-07/phone-home", json=report(token))
    assert response.status == 403 and "used already" in await response.text()


async def test_a_first_boots_overlay_waits_for_the_record_another_process_writes_behind(client, store, keys):
    """Another process of the server (a worker, or a replica) served a new machine's script; its record (with the
    platform, which the overlay's padding depends on) waits there up to 100 ms. The overlay waits for it to land
    (here: written 0.3 s later through another connection) instead of padding for a platform it does not know."""
    from bootserver.tokens import Signer

    mac = "52:54:00:00:00:08"
    token, _ = Signer(keys.token_key).issue(mac, 5, "127.0.0.1")

    async def land() -> None:
        await asyncio.sleep(0.3)
        store.record(mac, "script-served", {}, state="script-served", facts={"platform": "efi"})

    landing, started = asyncio.create_task(land()), time.monotonic()
    response = await client.get(f"/boot/52-54-00-00-00-08/{token}/bootserver.cpio")
    waited = time.monotonic() - started
    await landing
    assert response.status == 200 and waited >= 0.3
    forged = await client.get("/boot/52-54-00-00-00-09/x.y/bootserver.cpio")  # no live token: no wait at all
    assert forged.status == 403


async def test_a_newer_boot_retires_the_older_token_before_its_record_is_written(client, store):
    older = await boot_token(client)
    newer = await boot_token(client)  # both records still wait in memory (100 ms)
    assert store.queued_behind == 2
    response = await client.post("/boot/52-54-00-00-00-01/phone-home", json=report(older))
    assert response.status == 403 and "used already" in await response.text()
    assert store.queued_behind == 0  # the phone-home wrote what waited before it decided
    assert (await client.post("/boot/52-54-00-00-00-01/phone-home", json=report(newer))).status == 202


def test_token_address_check_takes_any_spelling_and_old_tokens():
    from bootserver import tokens

    mac, signer, no_row = "52:54:00:00:00:01", tokens.Signer(b"k" * 32), lambda token_id: None
    token, row = signer.issue(mac, 5, "::ffff:10.0.0.5")
    assert row.ip == "10.0.0.5"
    assert tokens.check(token, mac, signer, no_row, ip="10.0.0.5") == row  # no row needed: the claims are signed
    with pytest.raises(Forbidden, match="used from 10.0.0.6"):
        tokens.check(token, mac, signer, no_row, ip="::ffff:10.0.0.6")
    # A token of the earlier kind (`id.secret`) is checked against the hash in its row; it may have no address.
    old = Token("old", hashlib.sha256(b"secret").hexdigest(), mac, time.time(), time.time() + 60)
    assert tokens.check("old.secret", mac, signer, {"old": old}.get, ip="10.0.0.6") is old
    with pytest.raises(Forbidden, match="unknown phone-home token"):
        tokens.check("old.other", mac, signer, {"old": old}.get)


def test_a_signed_token_is_refused_when_any_part_of_it_changes():
    from bootserver import tokens

    mac, signer, no_row = "52:54:00:00:00:01", tokens.Signer(b"k" * 32), lambda token_id: None
    token, row = signer.issue(mac, 5, "10.0.0.5", uuid="4c4c4544-0000-0000-0000-000000000001")
    token_id, claims, signature = token.split(".")
    forged, _ = tokens.Signer(b"x" * 32).issue(mac, 5, "10.0.0.5")
    other_ip = tokens._b64(f"{row.issued!r} {row.expires + 3600!r} 10.0.0.66 {row.uuid}".encode())
    for presented in [forged, f"{token_id}.{other_ip}.{signature}", f"x{token_id}.{claims}.{signature}",
                      token[:-2], f"{token_id}.{claims}.{signature}\u00e9"]:
        with pytest.raises(Forbidden, match="unknown phone-home token"):
            tokens.check(presented, mac, signer, no_row)
    with pytest.raises(Forbidden, match="unknown report token"):  # a boot token is no report token
        tokens.check(token, mac, signer, no_row, purpose="report")
    with pytest.raises(Forbidden, match="unknown phone-home token"):  # nor another machine's (no row to say whose)
        tokens.check(token, "52:54:00:00:00:02", signer, no_row)
    with pytest.raises(Forbidden, match="another machine"):  # with its row, whose it is
        tokens.check(token, "52:54:00:00:00:02", signer, {token_id: row}.get)
    with pytest.raises(Forbidden, match="expired"):
        tokens.check(token, mac, signer, no_row, now=row.expires + 1)
    with pytest.raises(Forbidden, match="used already"):
        tokens.check(token, mac, signer, {token_id: dataclasses.replace(row, used=row.issued)}.get)
