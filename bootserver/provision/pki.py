"""The server's keys: its SSH provisioning key and a small CA that issues node TLS certificates.

The CA signs certificate requests: each node makes its own key pair and sends only the request
(over the pinned SSH session), so no node's private key is ever made, held or sent by the server.

With the SQLite store all of it lives in one directory (data_dir/keys, mode 0700), created on first
start (replicas on PostgreSQL keep it in the database instead, encrypted: load_or_create_shared):

    provisioning_ed25519   the SSH key the server logs in to nodes with (OpenSSH format)
    ca.key                 the CA's private key (PKCS8 PEM)
    ca.crt                 the CA's self-signed certificate (PEM)

Every file is 0600. Like ssh, we refuse to use key files that others can read: a key that leaked
once is not made safe again by tightening its mode, so the operator has to decide.

The CA key is ECDSA P-256 rather than Ed25519: Go's crypto/tls, OpenSSL and every TLS stack we
know of verify P-256 chains, while Ed25519 certificates are still refused by some clients.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import BootserverError

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)

SSH_KEY_FILE = "provisioning_ed25519"
SHARED_KEYS = "server-keys"  # the secret (in the store) holding all three, for replicas
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"

CA_VALIDITY = datetime.timedelta(days=3650)
# Node clocks may run a little behind ours right after boot, before NTP has settled.
CLOCK_SKEW = datetime.timedelta(minutes=5)

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# Public keys we sign for: what the agent makes (P-256), and P-384. RSA and the rest are refused.
ACCEPTED_CURVES = ("secp256r1", "secp384r1")
MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True)
class IssuedCertificate:
    """A node certificate signed for a key the node made and kept: there is no private key here."""

    cert_pem: bytes
    ca_pem: bytes
    serial: int
    sans: tuple[str, ...]  # as put in the certificate: the DNS name, then the IP addresses
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str  # SHA-256 of the DER certificate, hex

    def event_detail(self) -> dict[str, Any]:
        """What the `certificate-issued` event records: public facts about the certificate, no key material."""
        return {"serial": f"{self.serial:x}", "sans": list(self.sans), "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "fingerprint_sha256": self.fingerprint}


class ServerKeys:
    """The provisioning SSH key and the CA, loaded from (or created in) one directory."""

    def __init__(self, ssh_key: asyncssh.SSHKey, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate):
        self.ssh_key = ssh_key
        self._ca_key = ca_key
        self._ca_cert = ca_cert
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path) -> ServerKeys:
        """Load the keys in `directory`, creating whatever is missing. Never replaces an existing key."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(directory, 0o700)
        name = socket.gethostname()
        ssh_key = _load_or_create_ssh_key(directory / SSH_KEY_FILE, f"bootserver@{name}")
        ca_key, ca_cert = _load_or_create_ca(directory / CA_KEY_FILE, directory / CA_CERT_FILE, name)
        return cls(ssh_key, ca_key, ca_cert)

    @classmethod
    def load_or_create_shared(cls, store: Store, key_file: Path, directory: Path) -> ServerKeys:
        """The keys every replica on one database uses, kept in it encrypted with the key in `key_file`.

        The first replica to start stores them: the keys of `directory` when it holds some (a server
        moving from SQLite keeps its nodes' pinned key and certificates valid), else new ones. Replicas
        that start together each make a set, and all adopt the one stored first.
        """
        box = Fernet(_load_or_create_secret_key(key_file))
        stored = store.secret(SHARED_KEYS)
        if stored is None:
            fresh = cls.load_or_create(directory) if (Path(directory) / SSH_KEY_FILE).exists() else cls.generate()
            stored = store.put_secret_once(SHARED_KEYS, box.encrypt(fresh._bundle()))
        try:
            bundle = json.loads(box.decrypt(stored))
        except InvalidToken:
            raise BootserverError(f"the server keys in the database were encrypted with another key than {key_file}: "
                                  f"copy secret_key_file from the replica that started first") from None
        return cls(asyncssh.import_private_key(bundle["ssh_key"]),
                   _pem_ca_key(bundle["ca_key"].encode()), x509.load_pem_x509_certificate(bundle["ca_cert"].encode()))

    @classmethod
    def generate(cls) -> ServerKeys:
        name = socket.gethostname()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        return cls(asyncssh.generate_private_key("ssh-ed25519", comment=f"bootserver@{name}"), ca_key,
                   _self_signed_ca(ca_key, f"bootserver CA {name}"))

    def _bundle(self) -> bytes:
        return json.dumps({"ssh_key": self.ssh_key.export_private_key("openssh").decode(),
                           "ca_key": _pkcs8(self._ca_key).decode(), "ca_cert": self.ca_pem.decode()}).encode()

    @property
    def token_key(self) -> bytes:
        """The key one-time tokens are signed with (tokens.Signer): derived from the CA's key, so every replica has
        the same one and no new secret needs keeping, and useless for anything but tokens."""
        private = self._ca_key.private_numbers().private_value.to_bytes(66, "big")
        return HKDF(hashes.SHA256(), 32, salt=None, info=b"bootserver one-time tokens").derive(private)

    @property
    def ssh_public(self) -> str:
        """One authorized_keys line: "ssh-ed25519 AAAA... bootserver@<hostname>"."""
        return self.ssh_key.export_public_key("openssh").decode().strip()

    def sign(self, csr_pem: bytes, hostname: str, ips: Sequence[str], days: int = 365) -> IssuedCertificate:
        """A certificate for the key in the node's certificate request `csr_pem`, valid for `hostname`
        and `ips`, for server and client auth.

        The request must be signed by its own key (so the node holds that key) and carry a public key
        we accept; every name it asks for is ignored: the subject and SANs are ours alone."""
        _check_hostname(hostname)
        addresses = _parse_ips(ips, hostname)
        if days < 1:
            raise BootserverError(f"certificate for {hostname}: validity must be at least 1 day, not {days}")
        public_key = _checked_csr(csr_pem, hostname).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # _checked_csr refuses any other kind
        now = datetime.datetime.now(datetime.UTC)
        # A certificate outliving its CA would fail to verify anyway; end it with the CA instead.
        not_after = min(now + datetime.timedelta(days=days), self._ca_cert.not_valid_after_utc)
        ca_ski = self._ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        san = [x509.DNSName(hostname), *(x509.IPAddress(a) for a in addresses)]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
            # Raft peers use mutual TLS: each node is both a server and a client.
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        return IssuedCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self.ca_pem,
            serial=cert.serial_number,
            sans=(hostname, *(str(a) for a in addresses)),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        )


def _checked_csr(csr_pem: bytes, hostname: str) -> x509.CertificateSigningRequest:
    """The request in `csr_pem` if it is one, signed by its own key, for a key we accept."""
    where = f"the certificate request from {hostname}"
    if not isinstance(csr_pem, bytes):
        raise BootserverError(f"{where}: expected PEM bytes, not {type(csr_pem).__name__}")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise BootserverError(f"{where} is {len(csr_pem)} bytes long; a request is at most {MAX_CSR_BYTES}")
    if b"PRIVATE KEY" in csr_pem:
        # Never parse, keep or log what the node must keep to itself.
        raise BootserverError(f"{where} holds a private key, not a certificate request: the key stays on the node")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise BootserverError(f"{where} is not a PEM certificate request ({exc})") from None
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BootserverError(f"{where}: its public key cannot be read ({exc})") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in ACCEPTED_CURVES:
        kind = (f"an EC key on {public_key.curve.name}" if isinstance(public_key, ec.EllipticCurvePublicKey)
                else f"a {type(public_key).__name__.removeprefix('_')}")
        raise BootserverError(f"{where} is for {kind}; we sign EC keys on {' or '.join(ACCEPTED_CURVES)} only")
    if not csr.is_signature_valid:
        raise BootserverError(f"{where} has a signature that does not verify with its own public key: "
                              f"corrupted, or made by something that does not hold the key")
    return csr


# --- loading and creating ----------------------------------------------------------------------

def open_keys(store: Store, data_dir: Path, secret_key_path: Path) -> ServerKeys:
    """The server's keys: in data_dir/keys with SQLite; shared through the database by PostgreSQL replicas."""
    if store.kind == "postgresql":
        return ServerKeys.load_or_create_shared(store, secret_key_path, data_dir / "keys")
    return ServerKeys.load_or_create(data_dir / "keys")


def _load_or_create_ssh_key(path: Path, comment: str) -> asyncssh.SSHKey:
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        _write_private(path, key.export_private_key("openssh"))
        return key
    try:
        return asyncssh.import_private_key(_read_private(path))
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise BootserverError(f"{path}: not an SSH private key we can read ({exc}); "
                              f"restore it from a backup, or remove it to make a new one "
                              f"(nodes will then need the new public key)") from None


def _load_or_create_ca(key_path: Path, cert_path: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey,
                                                                                x509.Certificate]:
    if not key_path.exists() and not cert_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _self_signed_ca(key, f"bootserver CA {name}")
        # The certificate is written last: a crash in between leaves a key without a certificate,
        # which the next start reports rather than silently pairing with a new one.
        _write_private(key_path, _pkcs8(key))
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return key, cert
    for present, missing in ((key_path, cert_path), (cert_path, key_path)):
        if not missing.exists():
            raise BootserverError(f"{missing} is missing but {present} exists: restore {missing.name} from a "
                                  f"backup, or remove {present} to make a new CA (every node certificate "
                                  f"must then be issued again)")
    key = _load_ca_key(key_path)
    cert = _load_ca_cert(cert_path)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise BootserverError(f"{cert_path} does not belong to the key in {key_path}: restore the matching "
                              f"pair from a backup")
    return key, cert


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return _pem_ca_key(_read_private(path), str(path))


def _pem_ca_key(pem: bytes, where: str = "the CA key") -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BootserverError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BootserverError(f"{where}: the CA key must be an ECDSA key, not {type(key).__name__}")
    return key


# Secrets in the config (BMC passwords) are written as this prefix and a Fernet token of the secret key file.
ENCRYPTED_PREFIX = "encrypted:"


def encrypt_secret(key_file: Path, secret: str) -> str:
    """`secret` as the config holds it: encrypted with the key in `key_file` (made if missing), prefixed."""
    return ENCRYPTED_PREFIX + Fernet(_load_or_create_secret_key(key_file)).encrypt(secret.encode()).decode()


def decrypt_secret(key_file: Path, text: str, where: str) -> str:
    """What `encrypt_secret` wrote, in clear; `where` names the setting in errors."""
    if not text.startswith(ENCRYPTED_PREFIX):
        raise BootserverError(f"{where}: not an encrypted secret (it starts with {ENCRYPTED_PREFIX!r}; "
                              f"make one with `bootserver bmc encrypt-password`)")
    if not key_file.exists():
        raise BootserverError(f"{where}: the secret key file {key_file} is missing: restore it, or encrypt the "
                              f"password again with `bootserver bmc encrypt-password`")
    try:
        return Fernet(_load_or_create_secret_key(key_file)).decrypt(text[len(ENCRYPTED_PREFIX):].encode()).decode()
    except InvalidToken:
        raise BootserverError(f"{where}: encrypted with another key than {key_file}: encrypt it again with "
                              f"`bootserver bmc encrypt-password` on this server") from None


def read_secret_file(path: Path) -> str:
    """A secret kept in a file of its own (a BMC's password_file): refused unless only we may read it."""
    try:
        return _read_private(path).decode().rstrip("\r\n")
    except FileNotFoundError:
        raise BootserverError(f"{path}: no such file") from None


def _load_or_create_secret_key(path: Path) -> bytes:
    """The key that encrypts what replicas share in the database; made on the first replica's first start."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_private(path, Fernet.generate_key())
            log.warning("made %s (it encrypts the keys replicas share and BMC passwords): copy it to every other "
                        "replica (same path, mode 0600) before starting them", path)
        except FileExistsError:
            pass  # another process made it just now: use that one
    key = _read_private(path).strip()
    try:
        Fernet(key)
    except ValueError:
        raise BootserverError(f"{path}: not a key bootserver made (32 url-safe base64 bytes); restore it from "
                              f"another replica") from None
    return key


def _load_ca_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_private(path))
    except ValueError as exc:
        raise BootserverError(f"{path}: not a PEM certificate ({exc})") from None


def _self_signed_ca(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA signs node certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(**usages: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    flags.update(usages)
    return x509.KeyUsage(**flags)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- files -------------------------------------------------------------------------------------

def _check_private(path: Path, mode: int) -> None:
    """Refuse a key file or directory that anyone but its owner can use, as ssh does."""
    st = path.stat()
    if st.st_mode & 0o077:
        raise BootserverError(f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"run `chmod {mode:o} {path}` if nobody else could have read it, otherwise "
                              f"remove it to make a new one")
    if st.st_uid != os.geteuid():
        raise BootserverError(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): "
                              f"run `chown {os.geteuid()} {path}`")


def _read_private(path: Path) -> bytes:
    _check_private(path, 0o600)
    return path.read_bytes()


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start, replacing nothing that exists."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    # O_EXCL with mode 0600: the secret is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    # link() fails if the file appeared meanwhile (another server starting), where rename() would replace it.
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()


# --- input -------------------------------------------------------------------------------------

def _check_hostname(hostname: str) -> None:
    if not isinstance(hostname, str) or not hostname:
        raise BootserverError("a node certificate needs a hostname; give the machine one in [machines]")
    labels = hostname.removesuffix(".").split(".")
    if len(hostname) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise BootserverError(f"hostname {hostname!r} is not a DNS name (letters, digits and '-', "
                              f"in dot-separated labels of at most 63 characters)")


def _parse_ips(ips: Sequence[str], hostname: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if isinstance(ips, str):
        raise BootserverError(f"certificate for {hostname}: ips must be a list of addresses, not the string {ips!r}")
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise BootserverError(f"certificate for {hostname}: {text!r} is not an IP address") from None
        if address not in addresses:
            addresses.append(address)
    return addresses
