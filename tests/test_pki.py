"""Server keys: files and modes, reloading, refusals, and certificates and SSH keys that really work."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from bootserver import pki
from bootserver.errors import BootserverError


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> pki.ServerKeys:
    return pki.ServerKeys.load_or_create(tmp_path_factory.mktemp("data") / "keys")


@pytest.fixture(scope="module")
def node(keys: pki.ServerKeys) -> pki.NodeCertificate:
    return keys.issue("node1.example", ["127.0.0.1", "192.0.2.7", "2001:db8::7"])


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
    assert node.ca_pem == keys.ca_pem
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("127.0.0.1", "192.0.2.7", "2001:db8::7")
    ]
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
    assert node.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert "key_pem" not in repr(node)


def test_each_issue_has_its_own_key_and_serial(keys, node):
    other = keys.issue("node1.example", ["127.0.0.1"])
    assert other.key_pem != node.key_pem
    first, second = (x509.load_pem_x509_certificate(n.cert_pem) for n in (node, other))
    assert first.serial_number != second.serial_number


def test_certificate_starts_in_the_past_and_ends_with_the_ca(keys):
    import datetime

    cert = x509.load_pem_x509_certificate(keys.issue("n", [], days=100_000).cert_pem)
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
        keys.issue(hostname, ips)


# --- a real TLS handshake ----------------------------------------------------------------------

def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _handshake(tmp_path: Path, node: pki.NodeCertificate, ca_pem: bytes, server_hostname: str) -> str:
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
