"""Certificate requests as a node makes them, and forged ones (a request whose signature another key made), for
tests of the CA that signs node requests."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID


def node_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def request(key, common_name: str = "node", sans: list[x509.GeneralName] | None = None,
            extensions: list[x509.ExtensionType] = ()) -> bytes:
    """A PEM certificate request signed by `key`, as a node (or an impostor) would make it."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _der_items(data: bytes) -> tuple[bytes, list[bytes]]:
    """A DER SEQUENCE's tag byte and its items (each a whole TLV)."""
    def tlv(at: int) -> int:  # where the TLV starting at `at` ends
        length, at = data[at + 1], at + 2
        if length & 0x80:
            count = length & 0x7F
            length, at = int.from_bytes(data[at:at + count]), at + count
        return at + length

    end, at, items = tlv(0), 2 + (data[1] & 0x7F if data[1] & 0x80 else 0), []
    while at < end:
        items.append(data[at:tlv(at)])
        at = tlv(at)
    return data[:1], items


def _der_sequence(tag: bytes, items: list[bytes]) -> bytes:
    body = b"".join(items)
    size = len(body)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes(
        (size.bit_length() + 7) // 8)
    return tag + length + body


def forged_request(key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """A request for `key` whose signature was made by another key: what the CA must refuse."""
    key = key or node_key()
    mine = x509.load_pem_x509_csr(request(key)).public_bytes(serialization.Encoding.DER)
    theirs = x509.load_pem_x509_csr(request(node_key())).public_bytes(serialization.Encoding.DER)
    tag, (info, algorithm, _) = _der_items(mine)
    _, (_, _, signature) = _der_items(theirs)
    der = _der_sequence(tag, [info, algorithm, signature])
    csr = x509.load_der_x509_csr(der)  # still a well-formed request...
    assert not csr.is_signature_valid  # ...that does not verify
    return csr.public_bytes(serialization.Encoding.PEM)
