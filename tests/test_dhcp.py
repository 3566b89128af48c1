"""DHCP: the codec (cross-checked with scapy), client detection, and whole conversations over real UDP.

The server is the real app (app.init_app) with [dhcp] on, bound to unprivileged ports; the clients are UDP sockets on
127.0.0.1. A client that sends from an address (not 0.0.0.0:68) is answered at that address and port,
so nothing here is broadcast and nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from aiohttp import web
from scapy.layers.dhcp import BOOTP, DHCP
from support.wait import until_async

from bootserver import config as configuration
from bootserver.app import STORE, dhcp_addresses, http_address, init_app, running
from bootserver.dhcp import (
    ACK,
    DISCOVER,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    Client,
    DhcpPacket,
    MalformedPacket,
    Responder,
)
from bootserver.errors import ConfigError
from bootserver.store import Store

GUID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
BIOS_PXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0", 94: b"\x01\x02\x01", 97: b"\0" + GUID.bytes}
UEFI_PXE = {60: b"PXEClient:Arch:00007:UNDI:003000", 93: b"\0\x07", 94: b"\x01\x03\x00", 97: b"\0" + GUID.bytes}
IPXE = {**BIOS_PXE, 77: b"iPXE", 175: b"\xb1\x05\x01\x10\xec\x81\x39"}
UEFI_HTTP = {60: b"HTTPClient:Arch:00016:UNDI:003001", 93: b"\0\x10"}
PLAIN = {55: bytes([1, 3, 6, 12, 15])}  # an OS's DHCP client: no PXE options

MAC1, MAC2, MAC3 = "52:54:00:00:10:01", "52:54:00:00:10:02", "52:54:00:00:10:03"


def request(kind: int, mac: str, options: dict[int, bytes] | None = None, xid: int = 0x1234, **fields) -> DhcpPacket:
    return DhcpPacket(op=1, xid=xid, chaddr=bytes.fromhex(mac.replace(":", "")),
                      options={53: bytes([kind]), **(options or {})}, **fields)


# --- the codec ----------------------------------------------------------------------------------


def test_round_trip_keeps_every_field():
    packet = request(DISCOVER, MAC1, {**BIOS_PXE, 12: b"node1", 43: b"x" * 600}, xid=0xDEADBEEF, secs=4,
                     flags=0x8000, ciaddr=IPv4Address("10.0.0.9"), giaddr=IPv4Address("10.0.0.1"), file=b"a.kpxe")
    wire = packet.encode()
    assert len(wire) >= 300 and wire[236:240] == b"\x63\x82\x53\x63"
    assert DhcpPacket.parse(wire) == packet  # the 600-byte option went out in three pieces (RFC 3396)
    assert packet.mac == MAC1 and packet.message_type == DISCOVER


def test_options_overloaded_into_the_file_field_are_read():
    packet = request(DISCOVER, MAC1, {52: b"\x01"})
    wire = bytearray(packet.encode())
    wire[108:108 + 4] = bytes([60, 2, ord("P"), ord("X")])  # option 60 inside `file`, which option 52 allows
    parsed = DhcpPacket.parse(bytes(wire))
    assert parsed.options[60] == b"PX" and parsed.file == b""


def test_scapy_discover_parses_with_our_codec():
    built = bytes(BOOTP(chaddr=bytes.fromhex("525400001001"), xid=77, flags=0x8000) / DHCP(options=[
        ("message-type", "discover"), ("vendor_class_id", BIOS_PXE[60]), ("user_class", b"iPXE"),
        ("pxe_client_architecture", b"\0\x07"), ("pxe_client_network_interface", b"\x01\x03\x00"),
        ("pxe_client_machine_identifier", b"\0" + GUID.bytes), "end"]))
    packet = DhcpPacket.parse(built)
    assert (packet.xid, packet.mac, packet.flags, packet.message_type) == (77, MAC1, 0x8000, DISCOVER)
    assert packet.options[60] == BIOS_PXE[60]
    assert packet.options[93] == b"\0\x07" and packet.options[94] == b"\x01\x03\x00"
    client = Client.of(packet)
    assert (client.arch, client.ipxe, client.http) == (7, True, False)


def test_our_offer_parses_with_scapy(responder_factory):
    responder = responder_factory("proxy")
    reply = responder.handle(request(DISCOVER, MAC1, BIOS_PXE, xid=99).encode(), ("127.0.0.1", 5000), False)
    parsed = BOOTP(reply.packet.encode())
    options = {o[0]: o[1] for o in parsed[DHCP].options if isinstance(o, tuple)}
    assert (parsed.op, parsed.xid, parsed.yiaddr, parsed.siaddr) == (2, 99, "0.0.0.0", "127.0.0.1")
    assert parsed.chaddr[:6] == bytes.fromhex("525400001001")
    assert parsed.file.rstrip(b"\0") == b"undionly.kpxe"
    assert options["message-type"] == OFFER and options["server_id"] == "127.0.0.1"
    assert options["vendor_class_id"] == b"PXEClient"
    assert options["pxe_client_machine_identifier"] == b"\0" + GUID.bytes  # mirrored back
    assert options["vendor_specific"] == b"\x06\x01\x08\xff"  # skip discovery, boot the file


@pytest.mark.parametrize(("data", "why"), [
    (b"", "truncated"),
    (request(DISCOVER, MAC1).encode()[:239], "truncated"),
    (request(DISCOVER, MAC1).encode()[:236] + b"\x63\x82\x53\x00" + b"\xff", "magic cookie"),
    (request(DISCOVER, MAC1).encode()[:240] + bytes([60, 40, 1, 2]), "runs past the end"),
    (request(DISCOVER, MAC1, {93: b"\0"}).encode(), "option 93"),
    (request(DISCOVER, MAC1, {93: b"\0\0\0"}).encode(), "option 93"),
    (request(DISCOVER, MAC1, {53: b"\x01\x01"}).encode(), "option 53"),
    (request(DISCOVER, MAC1, {97: b"\0" * 5}).encode(), "option 97"),
    (request(DISCOVER, MAC1, {52: b""}).encode(), "option 52"),
    (request(DISCOVER, MAC1, {52: b"\x01\x01"}).encode(), "option 52"),
    (b"\x03" + request(DISCOVER, MAC1).encode()[1:], "op 3"),
])
def test_malformed_packets_are_refused(data: bytes, why: str):
    with pytest.raises(MalformedPacket, match=why):
        DhcpPacket.parse(data)


# --- what the client is ------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "arch", "ipxe", "http"), [
    (BIOS_PXE, 0, False, False),
    (UEFI_PXE, 7, False, False),
    ({**UEFI_PXE, 93: b"\0\x09"}, 9, False, False),
    ({60: b"PXEClient:Arch:00011:UNDI:003000", 93: b"\0\x0b"}, 11, False, False),
    ({60: b"PXEClient:Arch:00007:UNDI:003000"}, 7, False, False),  # no option 93: from the vendor class
    ({60: b"PXEClient"}, 0, False, False),
    ({60: "PXEClient:Arch:²:UNDI:003000".encode()}, 0, False, False),  # str.isdigit() takes "²"; int() does not
    ({60: b"PXEClient:Arch:99999999999999999999:UNDI:003000"}, 0, False, False),
    (IPXE, 0, True, False),
    ({77: b"iPXE"}, None, True, False),
    ({175: b"\xb1\x01\x01"}, None, True, False),
    (UEFI_HTTP, 16, False, True),
    (PLAIN, None, False, False),
])
def test_client_detection(options, arch, ipxe, http):
    client = Client.of(request(DISCOVER, MAC1, options))
    assert (client.arch, client.ipxe, client.http) == (arch, ipxe, http)


@pytest.mark.parametrize(("options", "bootfile", "vendor_class", "option_43"), [
    (BIOS_PXE, b"undionly.kpxe", b"PXEClient", True),
    (UEFI_PXE, b"ipxe.efi", b"PXEClient", True),
    ({**UEFI_PXE, 93: b"\0\x09"}, b"ipxe.efi", b"PXEClient", True),
    ({60: b"PXEClient:Arch:00011:UNDI:003000", 93: b"\0\x0b"}, b"snponly-arm64.efi", b"PXEClient", True),
    (IPXE, b"http://127.0.0.1:8080/boot.ipxe", b"PXEClient", False),
    (UEFI_HTTP, b"http://127.0.0.1:8080/ipxe/ipxe.efi", b"HTTPClient", False),
])
def test_what_each_client_is_told_to_boot(responder_factory, options, bootfile, vendor_class, option_43):
    reply = responder_factory("proxy").handle(request(DISCOVER, MAC1, options).encode(), ("127.0.0.1", 1), False)
    assert reply is not None
    assert reply.packet.options[67] == bootfile
    assert reply.packet.options[60] == vendor_class
    assert (43 in reply.packet.options) == option_43


def test_an_architecture_without_an_ipxe_binary_gets_no_proxy_offer(responder_factory, caplog):
    responder = responder_factory("proxy")
    ia32 = {60: b"PXEClient:Arch:00006:UNDI:003000", 93: b"\0\x06"}
    assert responder.handle(request(DISCOVER, MAC1, ia32).encode(), ("127.0.0.1", 1), False) is None
    event = responder.booter.history().events(MAC1)[-1]
    assert event.kind == "dhcp" and "no iPXE binary for client architecture 6" in event.detail["answer"]


def test_the_dhcp_event_records_what_the_client_said_and_our_answer(responder_factory):
    responder = responder_factory("proxy")
    responder.handle(request(DISCOVER, MAC1, {**UEFI_PXE, 77: b"iPXE"}).encode(), ("127.0.0.1", 1), False)
    [event] = responder.booter.history().events(MAC1)
    assert event.kind == "dhcp"
    assert event.detail == {
        "message": "DISCOVER", "mode": "proxy", "vendor_class": "PXEClient:Arch:00007:UNDI:003000",
        "user_class": "iPXE", "client_arch": [7], "client_ndi": "UNDI 3.0", "client_guid": str(GUID),
        "bootfile": "http://127.0.0.1:8080/boot.ipxe", "answer": "iPXE: the bootstrap script"}


def test_relayed_requests_are_answered_through_the_relay(responder_factory):
    relay = IPv4Address("127.0.0.5")
    proxy = responder_factory("proxy").handle(request(DISCOVER, MAC1, BIOS_PXE, giaddr=relay).encode(),
                                              ("127.0.0.9", 67), False)
    assert proxy is not None and proxy.to == ("127.0.0.5", 67) and proxy.packet.giaddr == relay
    full = responder_factory("full").handle(request(DISCOVER, MAC1, BIOS_PXE, giaddr=relay).encode(),
                                            ("127.0.0.9", 67), False)
    assert full is not None and full.to == ("127.0.0.5", 67) and full.packet.yiaddr == IPv4Address("127.0.0.100")


def test_full_mode_ignores_relays_of_another_subnet(responder_factory, caplog):
    responder = responder_factory("full")
    far = request(DISCOVER, MAC1, BIOS_PXE, giaddr=IPv4Address("10.9.0.1")).encode()
    assert responder.handle(far, ("10.9.0.1", 67), False) is None
    assert "relayed from 10.9.0.1, outside 127.0.0.0/8, the only network we lease on" in caplog.text
    assert responder.leases.offer(MAC2) == IPv4Address("127.0.0.100"), "nothing was leased to MAC1"


def test_answer_known_ignores_machines_not_in_the_config(responder_factory):
    responder = responder_factory("proxy", answer="known", machines={MAC2: {"hostname": "n2"}})
    assert responder.handle(request(DISCOVER, MAC1, BIOS_PXE).encode(), ("127.0.0.1", 1), False) is None
    assert responder.handle(request(DISCOVER, MAC2, BIOS_PXE).encode(), ("127.0.0.1", 1), False) is not None
    assert "not in [machines]" in responder.booter.history().events(MAC1)[-1].detail["answer"]


@pytest.fixture
def responder_factory(tmp_path: Path):
    """A Responder on a fresh store: the decisions without sockets."""
    from bootserver.booter import Booter
    from bootserver.provision.pki import ServerKeys
    from bootserver.templates import Templates

    stores: list[Store] = []

    def make(mode: str, **dhcp) -> Responder:
        machines = dhcp.pop("machines", {})
        config = configuration.parse({"server": {"data_dir": str(tmp_path / "data")}, "machines": machines,
                                      "dhcp": dhcp_table(mode, **dhcp)})
        store = Store(config.server.database)
        stores.append(store)
        booter = Booter(config, store, Templates(), ServerKeys.load_or_create(tmp_path / "keys"))
        return Responder(booter, config.dhcp, http_port=8080)

    yield make
    for store in stores:
        store.close()


def dhcp_table(mode: str, **overrides) -> dict:
    table = {"mode": mode, "server_address": "127.0.0.1", "port": 0, "proxy_port": 0}
    if mode == "full":
        table |= {"pool": "127.0.0.100-127.0.0.102", "netmask": "255.0.0.0", "router": "127.0.0.254",
                  "dns": ["127.0.0.53"], "lease_seconds": 600}
    return table | overrides


# --- conversations over UDP -------------------------------------------------------------------


class Peer(asyncio.DatagramProtocol):
    """A DHCP client's socket on 127.0.0.1: sends requests, collects what comes back."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[DhcpPacket] = asyncio.Queue()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(DhcpPacket.parse(data))

    async def ask(self, port: int, packet: DhcpPacket, timeout: float = 3.0) -> DhcpPacket:
        self.transport.sendto(packet.encode(), ("127.0.0.1", port))
        reply = await asyncio.wait_for(self.replies.get(), timeout)
        assert reply.xid == packet.xid, "a reply to another request"
        return reply

    async def silence(self, port: int, packet: DhcpPacket, then: DhcpPacket) -> DhcpPacket:
        """Send `packet`, which must get no answer, then `then`, which must: the next reply is `then`'s.

        No waiting to see: the server answers each datagram as it reads it (DhcpServer's datagram_received), in
        the order they came, and loopback keeps the order of one socket's datagrams, so an answer to `packet`
        would be here before `then`'s (and `ask` would fail on its xid)."""
        self.transport.sendto(packet.encode(), ("127.0.0.1", port))
        reply = await self.ask(port, then)
        assert self.replies.empty(), "the request that should have been ignored was answered"
        return reply


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, mode: str, machines: dict | None = None, **dhcp) -> AsyncIterator[web.Application]:
    config = configuration.parse({"server": {"http": "127.0.0.1:0", "tftp": "127.0.0.1:0",
                                             "data_dir": str(tmp_path / "data")},
                                  "machines": machines or {}, "dhcp": dhcp_table(mode, **dhcp)})
    app = init_app(config)
    async with running(app):
        yield app


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        Peer, local_addr=("127.0.0.1", 0))
    yield protocol
    transport.close()


async def test_proxy_mode_conversation(tmp_path: Path, peer: Peer):
    async with serving(tmp_path, "proxy") as app:
        dhcp_port = dhcp_addresses(app)[0][1]
        # An OS's DHCP client is the other server's business: ignored. A PXE ROM gets a boot offer.
        offer = await peer.silence(dhcp_port, request(DISCOVER, MAC2, PLAIN, xid=1),
                                   then=request(DISCOVER, MAC1, BIOS_PXE, xid=2))
        assert offer.message_type == OFFER
        assert offer.yiaddr == IPv4Address(0), "proxyDHCP never offers an address"
        assert (offer.siaddr, offer.file) == (IPv4Address("127.0.0.1"), b"undionly.kpxe")
        assert offer.options[54] == IPv4Address("127.0.0.1").packed
        assert offer.options[60] == b"PXEClient" and offer.options[97] == BIOS_PXE[97]
        assert not {1, 3, 51} & set(offer.options), "no address, so no lease options"
        # REQUESTs on the DHCP port belong to the server that offered the address.
        again = await peer.silence(dhcp_port, request(REQUEST, MAC1, BIOS_PXE, xid=3),
                                   then=request(DISCOVER, MAC1, IPXE, xid=4))
        assert again.options[67] == f"http://127.0.0.1:{http_address(app)[1]}/boot.ipxe".encode()
        assert app[STORE].node(MAC2) is None  # the non-PXE client left no trace
        assert [e.detail["message"] for e in app[STORE].events(MAC1)] == ["DISCOVER", "DISCOVER"]


async def test_proxy_mode_pxe_port_acks_with_the_boot_file(tmp_path: Path, peer: Peer):
    async with serving(tmp_path, "proxy") as app:
        _, pxe_port = (a[1] for a in dhcp_addresses(app))
        http = http_address(app)[1]
        ask = request(REQUEST, MAC1, IPXE, xid=5, ciaddr=IPv4Address("127.0.0.50"))
        ack = await peer.ask(pxe_port, ask)
        assert ack.message_type == ACK and ack.ciaddr == IPv4Address("127.0.0.50")
        assert ack.yiaddr == IPv4Address(0)
        assert ack.options[67] == f"http://127.0.0.1:{http}/boot.ipxe".encode()
        assert ack.file == ack.options[67]
        uefi = await peer.ask(pxe_port, request(REQUEST, MAC3, UEFI_PXE, xid=6, ciaddr=IPv4Address("127.0.0.51")))
        assert uefi.file == b"ipxe.efi" and uefi.options[97] == UEFI_PXE[97]
        assert [e.detail["message"] for e in app[STORE].events(MAC1)] == ["REQUEST"]


async def test_malformed_datagrams_are_dropped_and_the_server_keeps_answering(tmp_path: Path, peer: Peer, caplog):
    caplog.set_level(logging.INFO, logger="bootserver.dhcp")
    async with serving(tmp_path, "full") as app:
        dhcp_port, pxe_port = (a[1] for a in dhcp_addresses(app))
        good = request(DISCOVER, MAC1, BIOS_PXE)
        for junk in (b"\x01", b"\x01" * 100, good.encode()[:236] + b"nope", good.encode()[:240] + bytes([93, 1, 0]),
                     good.encode()[:240] + bytes([60, 200]), request(DISCOVER, MAC1, {53: b""}).encode()):
            for port in (dhcp_port, pxe_port):
                peer.transport.sendto(junk, ("127.0.0.1", port))
        offer = await peer.ask(dhcp_port, good)
        assert offer.message_type == OFFER and offer.yiaddr == IPv4Address("127.0.0.100")
        assert app[STORE].leases()[0].mac == MAC1
    assert sum("dropped malformed datagram" in r.message for r in caplog.records) == 12


async def test_full_mode_conversation(tmp_path: Path, peer: Peer):
    async with serving(tmp_path, "full") as app:
        port = dhcp_addresses(app)[0][1]
        offer = await peer.ask(port, request(DISCOVER, MAC1, UEFI_PXE, xid=10))
        assert offer.message_type == OFFER and offer.yiaddr == IPv4Address("127.0.0.100")
        assert offer.file == b"ipxe.efi" and offer.siaddr == IPv4Address("127.0.0.1")
        assert offer.options[1] == IPv4Address("255.0.0.0").packed
        assert offer.options[3] == IPv4Address("127.0.0.254").packed
        assert offer.options[6] == IPv4Address("127.0.0.53").packed
        assert int.from_bytes(offer.options[51], "big") == 600
        assert (int.from_bytes(offer.options[58], "big"), int.from_bytes(offer.options[59], "big")) == (300, 525)
        # A second machine at the same time gets another address.
        other = await peer.ask(port, request(DISCOVER, MAC2, PLAIN, xid=11))
        assert other.yiaddr == IPv4Address("127.0.0.101") and other.file == b"" and 60 not in other.options
        # SELECTING: it asks for the offered address from us.
        ack = await peer.ask(port, request(REQUEST, MAC1, {**UEFI_PXE, 50: offer.yiaddr.packed, 54: offer.options[54]},
                                           xid=12))
        assert ack.message_type == ACK and ack.yiaddr == offer.yiaddr and ack.file == b"ipxe.efi"
        assert [(lease.ip, lease.state) for lease in app[STORE].leases() if lease.mac == MAC1] == [
            ("127.0.0.100", "bound")]
        # Another's address, or one outside the pool: NAK.
        nak = await peer.ask(port, request(REQUEST, MAC2, {50: offer.yiaddr.packed}, xid=13))
        assert nak.message_type == NAK and nak.yiaddr == IPv4Address(0)
        nak = await peer.ask(port, request(REQUEST, MAC2, {50: IPv4Address("127.0.0.200").packed}, xid=14))
        assert nak.message_type == NAK
        # RENEWING: from its address, ciaddr set, no server id; answered at that address.
        renew = await peer.ask(port, request(REQUEST, MAC1, PLAIN, xid=15, ciaddr=offer.yiaddr))
        assert renew.message_type == ACK and renew.yiaddr == offer.yiaddr and renew.ciaddr == offer.yiaddr
        # MAC2 chose another server's offer: ours is withdrawn, silently.
        await peer.silence(port, request(REQUEST, MAC2, {50: other.yiaddr.packed, 54: b"\x0a\0\0\x01"}, xid=16),
                           then=request(DISCOVER, MAC3, PLAIN, xid=17))
        assert app[STORE].lease_of(MAC2) is None
        # RELEASE gives the address back; the next client may have it.
        peer.transport.sendto(request(RELEASE, MAC1, ciaddr=offer.yiaddr, xid=18).encode(), ("127.0.0.1", port))
        await until_async(lambda: app[STORE].lease_of(MAC1) is None, timeout=5)


async def test_full_mode_names_the_machine_and_the_domain(tmp_path: Path, peer: Peer):
    machines = {MAC1: {"hostname": "node1"}}
    async with serving(tmp_path, "full", machines=machines, domain="lab.example.org") as app:
        port = dhcp_addresses(app)[0][1]
        offer = await peer.ask(port, request(DISCOVER, MAC1, PLAIN, xid=40))
        assert (offer.options[12], offer.options[15]) == (b"node1", b"lab.example.org")
        ack = await peer.ask(port, request(REQUEST, MAC1, {**PLAIN, 50: offer.yiaddr.packed, 54: offer.options[54]},
                                           xid=41))
        assert (ack.options[12], ack.options[15]) == (b"node1", b"lab.example.org")
        unnamed = await peer.ask(port, request(DISCOVER, MAC2, PLAIN, xid=42))
        assert 12 not in unnamed.options and unnamed.options[15] == b"lab.example.org"


async def test_inform_gets_the_segment_options_and_no_lease(tmp_path: Path, peer: Peer):
    async with serving(tmp_path, "full", machines={MAC1: {"hostname": "node1"}}) as app:
        port = dhcp_addresses(app)[0][1]
        # Without ciaddr an INFORM says nothing we could answer to (RFC 2131 4.4.3): ignored.
        ack = await peer.silence(port, request(INFORM, MAC1, PLAIN, xid=50),
                                 then=request(INFORM, MAC1, PLAIN, xid=51, ciaddr=IPv4Address("127.0.0.1")))
        assert ack.message_type == ACK and ack.yiaddr == IPv4Address(0) and ack.ciaddr == IPv4Address("127.0.0.1")
        assert ack.options[1] == IPv4Address("255.0.0.0").packed and ack.options[3] == IPv4Address("127.0.0.254").packed
        assert ack.options[6] == IPv4Address("127.0.0.53").packed and ack.options[12] == b"node1"
        assert not {51, 58, 59} & set(ack.options), "an INFORM gets no lease"
        assert ack.file == b"" and 60 not in ack.options
        pxe = await peer.ask(port, request(INFORM, MAC2, BIOS_PXE, xid=52, ciaddr=IPv4Address("127.0.0.1")))
        assert pxe.file == b"undionly.kpxe" and pxe.options[60] == b"PXEClient"
        assert app[STORE].leases() == [], "nothing was leased"
        assert [e.detail["message"] for e in app[STORE].events(MAC1)] == ["INFORM"]


async def test_leases_survive_a_restart_and_are_never_handed_out_twice(tmp_path: Path, peer: Peer):
    async with serving(tmp_path, "full") as app:
        port = dhcp_addresses(app)[0][1]
        offer = await peer.ask(port, request(DISCOVER, MAC1, PLAIN, xid=20))
        await peer.ask(port, request(REQUEST, MAC1, {50: offer.yiaddr.packed, 54: offer.options[54]}, xid=21))
    async with serving(tmp_path, "full") as app:  # a new process on the same store file
        port = dhcp_addresses(app)[0][1]
        again = await peer.ask(port, request(DISCOVER, MAC1, PLAIN, xid=22))
        assert again.yiaddr == offer.yiaddr, "a known client gets its address back"
        other = await peer.ask(port, request(DISCOVER, MAC2, PLAIN, xid=23))
        assert other.yiaddr != offer.yiaddr
        nak = await peer.ask(port, request(REQUEST, MAC2, {50: offer.yiaddr.packed}, xid=24))
        assert nak.message_type == NAK


async def test_reservations(tmp_path: Path, peer: Peer):
    machines = {MAC1: {"ip": "127.0.0.101"}, MAC2: {"ip": "127.0.0.50"}}  # one inside the pool, one outside
    async with serving(tmp_path, "full", machines=machines) as app:
        port = dhcp_addresses(app)[0][1]
        assert (await peer.ask(port, request(DISCOVER, MAC3, PLAIN, xid=30))).yiaddr == IPv4Address("127.0.0.100")
        other = request(DISCOVER, "52:54:00:00:10:04", PLAIN, xid=31)
        assert (await peer.ask(port, other)).yiaddr == IPv4Address("127.0.0.102"), "101 is MAC1's, never the pool's"
        assert (await peer.ask(port, request(DISCOVER, MAC1, PLAIN, xid=32))).yiaddr == IPv4Address("127.0.0.101")
        assert (await peer.ask(port, request(DISCOVER, MAC2, PLAIN, xid=33))).yiaddr == IPv4Address("127.0.0.50")
        # A reserved machine may not take a pool address instead.
        nak = await peer.ask(port, request(REQUEST, MAC2, {50: IPv4Address("127.0.0.100").packed}, xid=34))
        assert nak.message_type == NAK


async def test_pool_exhaustion_offers_nothing_and_says_so(tmp_path: Path, peer: Peer, caplog):
    caplog.set_level(logging.WARNING, logger="bootserver.dhcp")
    async with serving(tmp_path, "full", pool="127.0.0.100-127.0.0.101") as app:
        port = dhcp_addresses(app)[0][1]
        first = await peer.ask(port, request(DISCOVER, MAC1, PLAIN, xid=40))
        second = await peer.ask(port, request(DISCOVER, MAC2, PLAIN, xid=41))
        assert (first.yiaddr, second.yiaddr) == (IPv4Address("127.0.0.100"), IPv4Address("127.0.0.101"))
        await peer.silence(port, request(DISCOVER, MAC3, PLAIN, xid=43), then=request(DISCOVER, MAC1, PLAIN, xid=44))
        assert app[STORE].lease_of(MAC3) is None
        # A declined address is held back from everyone: MAC1 declines, comes back, gets nothing.
        peer.transport.sendto(request(4, MAC1, {50: first.yiaddr.packed}, xid=45).encode(), ("127.0.0.1", port))
        await peer.silence(port, request(DISCOVER, MAC1, PLAIN, xid=46), then=request(DISCOVER, MAC2, PLAIN, xid=47))
    assert any("no address to offer" in r.message and MAC3 in r.message for r in caplog.records)
    assert any("declined 127.0.0.100" in r.message for r in caplog.records)


async def test_dhcp_off_opens_no_port(tmp_path: Path):
    config = configuration.parse({"server": {"http": "127.0.0.1:0", "tftp": "off", "data_dir": str(tmp_path)}})
    app = init_app(config)
    async with running(app):
        assert dhcp_addresses(app) == []


async def test_a_port_in_use_is_a_clear_error(tmp_path: Path):
    import socket

    from bootserver.dhcp import DhcpStartError

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", 0))  # no SO_REUSEADDR: our bind must fail
        port = holder.getsockname()[1]
        with pytest.raises(DhcpStartError, match=f"port {port}.*another DHCP server"):
            async with serving(tmp_path, "proxy", port=port):
                pass


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dhcp", "named"), [
    ({"mode": "relay"}, "mode: expected one of off, proxy, full"),
    ({"mode": "proxy"}, "server_address: required"),
    ({"mode": "proxy", "server_address": "10.0.0.300"}, "server_address: '10.0.0.300' is not an IPv4"),
    ({"mode": "proxy", "server_address": "10.0.0.1", "answer": "some"}, "answer: expected one of all, known"),
    ({"mode": "proxy", "server_address": "10.0.0.1", "port": 70000}, "port: expected a port number"),
    ({"mode": "proxy", "server_address": "10.0.0.1", "colour": "x"}, "unknown key 'colour'"),
    ({"mode": "full", "server_address": "10.0.0.1", "netmask": "255.255.255.0"}, "pool: required"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20"}, "netmask: required"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10", "netmask": "255.255.255.0"},
     "pool: expected FIRST-LAST"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.20-10.0.0.10", "netmask": "255.255.255.0"},
     "pool: 10.0.0.20 comes after"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.1.10-10.0.1.20", "netmask": "255.255.255.0"},
     "is not inside 10.0.0.0/24"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.1-10.0.0.20", "netmask": "255.255.255.0"},
     "holds server_address"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.0.255.0"},
     "netmask: '255.0.255.0' is not a netmask"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.255.255.0",
      "router": "192.168.1.1"}, "router: 192.168.1.1 is not inside"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.255.255.0",
      "dns": "10.0.0.1"}, "dns: expected a list"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.255.255.0",
      "lease_seconds": 0}, "lease_seconds"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.255.255.0",
      "domain": "lab_1.example"}, "domain: 'lab_1.example' is not a DNS name"),
    ({"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.255.255.0",
      "domain": "lab..example"}, "domain: 'lab..example' is not a DNS name"),
])
def test_bad_dhcp_config_is_refused_with_the_key_named(dhcp: dict, named: str):
    with pytest.raises(ConfigError, match=r"\[dhcp\]") as info:
        configuration.parse({"dhcp": dhcp})
    assert named in str(info.value)


@pytest.mark.parametrize(("machines", "named"), [
    ({MAC1: {"ip": "not-an-ip"}}, "ip: 'not-an-ip' is not an IPv4 address"),
    ({MAC1: {"ip": "10.0.0.50"}, MAC2: {"ip": "10.0.0.50"}}, "10.0.0.50 is reserved for 52:54:00:00:10:01"),
    ({MAC1: {"ip": "10.9.0.50"}}, "not a free address of 10.0.0.0/24"),
    ({MAC1: {"ip": "10.0.0.1"}}, "not a free address of 10.0.0.0/24"),
])
def test_bad_reservations_are_refused(machines: dict, named: str):
    dhcp = {"mode": "full", "server_address": "10.0.0.1", "pool": "10.0.0.10-10.0.0.20", "netmask": "255.255.255.0"}
    with pytest.raises(ConfigError) as info:
        configuration.parse({"dhcp": dhcp, "machines": machines})
    assert named in str(info.value) and "[machines." in str(info.value)


def test_dhcp_is_off_by_default():
    config = configuration.parse({})
    assert config.dhcp.mode == "off"
