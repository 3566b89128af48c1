"""Server keys: files and modes, reloading, refusals, and certificates and SSH keys that really work."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import inspect
import ipaddress
import json
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.csr import forged_request, node_key, request

from bootserver.errors import BootserverError
from bootserver.provision import pki


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> pki.ServerKeys:
    return pki.ServerKeys.load_or_create(tmp_path_factory.mktemp("data") / "keys")


@dataclass(frozen=True)
class Node:
    """What a node ends up with: the key it made itself, and the certificate the server signed for it."""

    key_pem: bytes
    cert_pem: bytes
    issued: pki.IssuedCertificate


IPS = ["127.0.0.1", "192.0.2.7", "2001:db8::7"]


@pytest.fixture(scope="module")
def node(keys: pki.ServerKeys) -> Node:
    key = node_key()
    issued = keys.sign(request(key), "node1.example", IPS)
    return Node(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()), issued.cert_pem, issued)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_files(tmp_path):
    directory = tmp_path / "data" / "keys"
    keys = pki.ServerKeys.load_or_create(directory)
    assert _mode(directory) == 0o700
    names = {pki.SSH_KEY_FILE, pki.CA_KEY_FILE, pki.CA_CERT_FILE}
    assert {p.name for p in directory.iterdir()} == names  # no temporary files left behind
    for name in names:
        assert _mode(directory / name) == 0o600, name
    assert (directory / pki.SSH_KEY_FILE).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (directory / pki.CA_CERT_FILE).read_bytes() == keys.ca_pem


def test_reload_keeps_the_same_keys(tmp_path):
    first = pki.ServerKeys.load_or_create(tmp_path / "keys")
    files = {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()}
    again = pki.ServerKeys.load_or_create(tmp_path / "keys")
    assert again.ssh_public == first.ssh_public
    assert again.ca_pem == first.ca_pem
    assert {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()} == files


def test_ssh_public_is_one_authorized_keys_line(keys):
    line = keys.ssh_public
    kind, blob, comment = line.split(" ")
    assert kind == "ssh-ed25519" and blob.startswith("AAAA")
    assert comment == f"bootserver@{socket.gethostname()}"
    assert "\n" not in line


def test_ca_certificate(keys):
    ca = x509.load_pem_x509_certificate(keys.ca_pem)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.subject.rfc4514_string() == f"CN=bootserver CA {socket.gethostname()}"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650


@pytest.mark.parametrize("name", [pki.SSH_KEY_FILE, pki.CA_KEY_FILE, pki.CA_CERT_FILE])
def test_loose_file_permissions_are_refused(tmp_path, name):
    pki.ServerKeys.load_or_create(tmp_path / "keys")
    path = tmp_path / "keys" / name
    path.chmod(0o644)
    with pytest.raises(BootserverError, match=rf"{path}.*chmod 600 {path}"):
        pki.ServerKeys.load_or_create(tmp_path / "keys")
    assert _mode(path) == 0o644  # refused, not silently "fixed"


def test_loose_directory_permissions_are_refused(tmp_path):
    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(BootserverError, match="chmod 700"):
        pki.ServerKeys.load_or_create(tmp_path / "keys")


def test_half_a_ca_is_refused_not_replaced(tmp_path):
    pki.ServerKeys.load_or_create(tmp_path / "keys")
    (tmp_path / "keys" / pki.CA_CERT_FILE).unlink()
    with pytest.raises(BootserverError, match=r"ca\.crt is missing but .*ca\.key exists"):
        pki.ServerKeys.load_or_create(tmp_path / "keys")
    assert not (tmp_path / "keys" / pki.CA_CERT_FILE).exists()


def test_issued_certificate(keys, node):
    cert = x509.load_pem_x509_certificate(node.cert_pem)
    ca = x509.load_pem_x509_certificate(keys.ca_pem)
    cert.verify_directly_issued_by(ca)
    assert node.issued.ca_pem == keys.ca_pem
    assert cert.subject.rfc4514_string() == "CN=node1.example"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in IPS]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_certificate_is_for_the_key_in_the_request_and_holds_no_private_key(node):
    cert = x509.load_pem_x509_certificate(node.cert_pem)
    node_public = serialization.load_pem_private_key(node.key_pem, None).public_key()
    assert cert.public_key() == node_public  # the node's own key, not one the server made
    # What signing returns has nowhere to carry a private key, and carries none.
    assert not [f.name for f in dataclasses.fields(pki.IssuedCertificate) if "key" in f.name]
    assert b"PRIVATE KEY" not in repr(node.issued).encode() + node.issued.cert_pem + node.issued.ca_pem


def test_the_server_cannot_make_a_node_key():
    """Signing needs a request: there is no path that makes a key pair for a node on the server."""
    assert not hasattr(pki.ServerKeys, "issue") and not hasattr(pki, "NodeCertificate")
    assert list(inspect.signature(pki.ServerKeys.sign).parameters)[:4] == ["self", "csr_pem", "hostname", "ips"]


def test_issued_facts_match_the_certificate(node):
    cert = x509.load_pem_x509_certificate(node.cert_pem)
    issued = node.issued
    assert issued.serial == cert.serial_number
    assert issued.sans == ("node1.example", *IPS)
    assert issued.not_after == cert.not_valid_after_utc and issued.not_before == cert.not_valid_before_utc
    assert issued.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    detail = issued.event_detail()
    assert detail == {"serial": f"{cert.serial_number:x}", "sans": ["node1.example", *IPS],
                      "not_before": cert.not_valid_before_utc.isoformat(),
                      "not_after": cert.not_valid_after_utc.isoformat(),
                      "fingerprint_sha256": issued.fingerprint}
    assert datetime.datetime.fromisoformat(detail["not_after"]) == cert.not_valid_after_utc
    assert json.loads(json.dumps(detail)) == detail  # storable as an event


def test_names_in_the_request_are_ignored(keys):
    """A node (or whoever answers at its address) asks for another host's names, and a CA: it gets ours."""
    asked = request(node_key(), common_name="other.example",
                    sans=[x509.DNSName("other.example"), x509.DNSName("*.example"),
                          x509.IPAddress(ipaddress.ip_address("10.9.9.9"))],
                    extensions=[x509.BasicConstraints(ca=True, path_length=None)])
    cert = x509.load_pem_x509_certificate(keys.sign(asked, "node1", ["127.0.0.1"]).cert_pem)
    assert cert.subject.rfc4514_string() == "CN=node1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["node1", "127.0.0.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "other.example" not in cert.public_bytes(serialization.Encoding.PEM).decode()


def test_each_signing_has_its_own_serial(keys, node):
    other = keys.sign(request(node_key()), "node1.example", ["127.0.0.1"])
    first, second = (x509.load_pem_x509_certificate(n.cert_pem) for n in (node, other))
    assert first.serial_number != second.serial_number
    assert first.public_key() != second.public_key()


def test_certificate_starts_in_the_past_and_ends_with_the_ca(keys):
    cert = x509.load_pem_x509_certificate(keys.sign(request(node_key()), "n", [], days=100_000).cert_pem)
    ca = x509.load_pem_x509_certificate(keys.ca_pem)
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc


@pytest.mark.parametrize(("hostname", "ips", "message"), [
    ("", [], "needs a hostname"),
    ("node 1", [], "not a DNS name"),
    ("-node", [], "not a DNS name"),
    ("node1", ["10.0.0.300"], "'10.0.0.300' is not an IP address"),
    ("node1", ["node1"], "'node1' is not an IP address"),
    ("node1", "10.0.0.1", "must be a list"),
])
def test_bad_input_is_refused(keys, hostname, ips, message):
    with pytest.raises(BootserverError, match=message):
        keys.sign(request(node_key()), hostname, ips)


def test_request_with_a_bad_signature_is_refused(keys):
    with pytest.raises(BootserverError, match="signature that does not verify with its own public key"):
        keys.sign(forged_request(), "node1", ["127.0.0.1"])


@pytest.mark.parametrize(("key", "message"), [
    (lambda: rsa.generate_private_key(65537, 2048), "is for a RSAPublicKey; we sign EC keys on secp256r1 or secp384r1"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "is for an EC key on secp521r1"),
    (ed25519.Ed25519PrivateKey.generate, "is for a Ed25519PublicKey"),
])
def test_request_for_a_key_we_do_not_accept_is_refused(keys, key, message):
    with pytest.raises(BootserverError, match=message):
        keys.sign(request(key()), "node1", ["127.0.0.1"])


def test_p384_requests_are_signed(keys):
    cert = x509.load_pem_x509_certificate(keys.sign(request(ec.generate_private_key(ec.SECP384R1())), "n", []).cert_pem)
    assert cert.public_key().curve.name == "secp384r1"


@pytest.mark.parametrize(("data", "message"), [
    (b"-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n", "holds a private key"),
    (b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n", "holds a private key"),
    (b"garbage", "not a PEM certificate request"),
    (b"x" * (pki.MAX_CSR_BYTES + 1), "at most 16384"),
    ("a string", "expected PEM bytes"),
])
def test_signing_takes_nothing_but_a_request(keys, data, message):
    with pytest.raises(BootserverError, match=message):
        keys.sign(data, "node1", ["127.0.0.1"])


def test_a_certificate_is_not_a_request(keys, node):
    with pytest.raises(BootserverError, match="not a PEM certificate request"):
        keys.sign(node.cert_pem, "node1", ["127.0.0.1"])


# --- a real TLS handshake ----------------------------------------------------------------------

def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _handshake(tmp_path: Path, node: Node, ca_pem: bytes, server_hostname: str) -> str:
    """A TLS 1.2+ server with the node's certificate, and a client trusting only `ca_pem`.

    Returns what the server read from the client; raises the client's ssl.SSLError on failure.
    """
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(_write(tmp_path, "node.crt", node.cert_pem), _write(tmp_path, "node.key", node.key_pem))
    client_ctx = ssl.create_default_context(cafile=_write(tmp_path, "trusted.crt", ca_pem))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 does by default
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                received.append(tls.recv(100))
        except (ssl.SSLError, OSError):
            pass  # the client refused us; the client side reports why

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"hello")
    finally:
        thread.join(5)
        listener.close()
    return b"".join(received).decode()


def test_tls_handshake_with_the_ca(tmp_path, keys, node):
    assert _handshake(tmp_path, node, keys.ca_pem, "node1.example") == "hello"


def test_tls_handshake_by_ip_address(tmp_path, keys, node):
    assert _handshake(tmp_path, node, keys.ca_pem, "127.0.0.1") == "hello"


def test_tls_handshake_with_another_ca_fails(tmp_path, node):
    stranger = pki.ServerKeys.load_or_create(tmp_path / "other-keys")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(tmp_path, node, stranger.ca_pem, "node1.example")


def test_tls_handshake_with_the_wrong_name_fails(tmp_path, keys, node):
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(tmp_path, node, keys.ca_pem, "node2.example")


# --- the SSH key logs in -----------------------------------------------------------------------

async def test_ssh_key_logs_in_to_an_asyncssh_server(keys):
    host_key = asyncssh.generate_private_key("ssh-ed25519")

    def process(proc: asyncssh.SSHServerProcess) -> None:
        proc.stdout.write(f"ok {proc.command}\n")
        proc.exit(0)

    server = await asyncssh.listen(
        "127.0.0.1", 0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(keys.ssh_public + "\n"),
        process_factory=process,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        known_hosts = asyncssh.import_known_hosts(
            f"[127.0.0.1]:{port} {host_key.export_public_key('openssh').decode()}")
        async with asyncssh.connect("127.0.0.1", port, username="root", client_keys=[keys.ssh_key],
                                    known_hosts=known_hosts, agent_path=None) as conn:
            result = await asyncio.wait_for(conn.run("true", check=True), 10)
        assert result.stdout == "ok true\n"
    finally:
        server.close()
        await server.wait_closed()


async def test_another_ssh_key_is_refused(tmp_path, keys):
    stranger = pki.ServerKeys.load_or_create(tmp_path / "other-keys")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1", 0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(keys.ssh_public + "\n"),
        process_factory=lambda proc: proc.exit(0),
    )
    try:
        port = server.sockets[0].getsockname()[1]
        known_hosts = asyncssh.import_known_hosts(
            f"[127.0.0.1]:{port} {host_key.export_public_key('openssh').decode()}")
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", port, username="root", client_keys=[stranger.ssh_key],
                                   known_hosts=known_hosts, agent_path=None, password=None)
    finally:
        server.close()
        await server.wait_closed()
