"""HTTP endpoints over a real loopback socket (aiohttp's test server and client)."""

import asyncio

import pytest
from conftest import eventually

from bootserver.http import create_app


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


async def test_machine_script_records_facts_and_event(client, booter):
    response = await client.get("/boot/52-54-00-00-00-01.ipxe",
                                params={"platform": "pcbios", "arch": "x86_64", "uuid": "", "junk": "x"})
    assert response.status == 200
    text = await response.text()
    assert "/boot/52-54-00-00-00-01/vmlinuz initrd=initrd initrd=raft-initrd" in text
    node = booter.store.node("52:54:00:00:00:01")
    assert node.state == "script-served" and node.facts == {"platform": "pcbios", "arch": "x86_64"}


@pytest.mark.parametrize("mac", ["zz-zz", "52-54-00-00-00", "..%2f..%2fetc"])
async def test_malformed_mac_is_400(client, mac):
    response = await client.get(f"/boot/{mac}.ipxe")
    assert response.status == 400
    assert "not a" in await response.text()


async def test_unknown_mac_gets_the_default_group(client, booter):
    text = await (await client.get("/boot/aa-bb-cc-dd-ee-ff.ipxe")).text()
    assert "profile discovery (group default)" in text
    assert booter.store.node("aa:bb:cc:dd:ee:ff").state == "script-served"


async def test_kernel_whole_and_ranged_with_events(client, booter, data_dir):
    kernel = (data_dir / "images" / "vmlinuz").read_bytes()
    response = await client.get("/boot/52-54-00-00-00-01/vmlinuz")
    assert response.status == 200 and response.content_length == len(kernel)
    assert await response.read() == kernel
    response = await client.get("/boot/52-54-00-00-00-01/vmlinuz", headers={"Range": "bytes=100000-"})
    assert response.status == 206
    assert await response.read() == b"kernel-end"
    def served():
        return [e for e in booter.store.events("52:54:00:00:00:01") if e.kind == "file-served"]

    events = await eventually(lambda: len(served()) == 2 and served())
    assert [(e.detail["file"], e.detail["bytes"]) for e in events] == [("vmlinuz", len(kernel)),
                                                                        ("vmlinuz", 10)]
    assert booter.store.node("52:54:00:00:00:01").state == "kernel-served"


@pytest.mark.parametrize("path", ["/boot/52-54-00-00-00-01/nope", "/boot/52-54-00-00-00-01/..%2f..%2fetc%2fpasswd",
                                  "/boot/52-54-00-00-00-01/%2e%2e", "/ipxe/..%2fpasswd", "/ipxe/nope.efi"])
async def test_unknown_or_traversing_files_are_404(client, path):
    response = await client.get(path)
    assert response.status in (400, 404)
    assert "root:" not in await response.text()


async def test_booted_report(client, booter):
    response = await client.post("/boot/52-54-00-00-00-01/booted", json={"ip": "10.0.2.15", "kernel": "6.1"})
    assert response.status == 200
    assert booter.store.node("52:54:00:00:00:01").state == "booted"
    assert (await client.post("/boot/52-54-00-00-00-01/booted", data=b"{nope")).status == 400
    assert (await client.post("/boot/52-54-00-00-00-01/booted", json=[1])).status == 400
    assert (await client.post("/boot/52-54-00-00-00-01/booted", data=b"x" * 100_000)).status == 413


async def test_ipxe_binary_over_http(client, booter):
    response = await client.get("/ipxe/undionly.kpxe")
    if not (booter.config.server.ipxe_dir / "undionly.kpxe").exists():
        pytest.fail("Debian's ipxe package is not installed (the test set-up installs it)")
    assert response.status == 200
    assert await response.read() == (booter.config.server.ipxe_dir / "undionly.kpxe").read_bytes()


async def test_api_and_health(client):
    await client.get("/boot/52-54-00-00-00-01.ipxe")
    body = await (await client.get("/api/v1/machines")).json()
    assert [m["mac"] for m in body["machines"]] == ["52:54:00:00:00:01"]
    body = await (await client.get("/api/v1/machines/525400000001")).json()
    assert body["events"][0]["kind"] == "script-served"
    assert (await client.get("/api/v1/machines/52:54:00:00:00:07")).status == 404
    health = await (await client.get("/healthz")).json()
    assert health["ok"] and health["missing_assets"] == [] and "undionly.kpxe" in health["ipxe_binaries"]
