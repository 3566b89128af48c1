"""One-time tokens, signed by the server: `<id>.<claims>.<signature>`, each id spent once.

A boot token is issued each time a machine's boot script is rendered and rides on the kernel command line. An
installed OS gets a token of its own ("report") on its disk, for its first-boot report: the purpose is signed, so an
agent's token cannot report a boot, nor a report token phone home.

The signature (HMAC-SHA256 under ServerKeys.token_key, which replicas share, kept in the store only encrypted with
secret_key_file) covers the machine, the purpose, the id, the issue and expiry times, the address that fetched the
script and the UUID its firmware reported. Checking a token therefore needs no row: serving a script writes nothing
before it answers (its event and the token's row are written behind, Store.record_behind), and a machine still phones
home when the server that issued its token died before writing them. What needs the store is "once": the phone-home
spends the id in one statement (Store.phoned_home), a machine's newer token retires its older ones, and a spent or
retired id is refused. Nothing in the database makes a token, so a copy of it cannot phone home for anyone.

A phone-home from any other address than the one that fetched the script is refused, so a token read off a console
or a log cannot be used from another machine on the network.

The standard library's hmac rather than a token library (itsdangerous, JWT): four claims in a fixed order (spaces
apart: no claim holds one), and the token must stay short on a kernel command line. Tokens of the earlier kind
(`<id>.<secret>`, checked against the hash of the secret in their row) are still accepted until they expire.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .admission import strict_ip
from .errors import BadRequest, Forbidden, Unauthorized
from .store import Token

PURPOSES = {"boot": "phone-home token", "report": "report token"}
SIGNED = "hmac-sha256"  # the hash column of a signed token's row: there is no secret to hash


@dataclass(frozen=True)
class Signer:
    """Issues tokens and knows its own: `key`, the replicas' shared token key (ServerKeys.token_key)."""

    key: bytes = dataclasses.field(repr=False)

    def issue(self, mac: str, minutes: float, ip: str | None = None, uuid: str | None = None,
              purpose: str = "boot") -> tuple[str, Token]:
        """The token to hand out, and its row; `ip`: the address the script is sent to, `uuid`: the SMBIOS UUID
        its firmware reported with the request (the agent must report the same)."""
        token_id, now = secrets.token_urlsafe(9), time.time()
        row = Token(token_id, SIGNED, mac, round(now, 3), round(now + minutes * 60, 3), ip=client_address(ip),
                    uuid=uuid, purpose=purpose)
        claims = _b64(f"{row.issued!r} {row.expires!r} {row.ip or ''} {row.uuid or ''}".encode())
        return f"{token_id}.{claims}.{self._signature(purpose, mac, token_id, claims)}", row

    def signed(self, token_id: str, claims: str, signature: str, mac: str, purpose: str) -> Token | None:
        """The token these parts make if we signed them for `mac` and `purpose`; None if we did not."""
        if not hmac.compare_digest(signature, self._signature(purpose, mac, token_id, claims)):
            return None
        issued, expires, ip, uuid = _unb64(claims).decode().split(" ")
        return Token(token_id, SIGNED, mac, float(issued), float(expires), ip=ip or None, uuid=uuid or None,
                     purpose=purpose)

    def _signature(self, purpose: str, mac: str, token_id: str, claims: str) -> str:
        message = f"bootserver token 1\n{purpose}\n{mac}\n{token_id}\n{claims}".encode()
        return _b64(hmac.digest(self.key, message, "sha256"))


def check(text: object, mac: str, signer: Signer, stored: Callable[[str], Token | None], *, ip: str | None = None,
          purpose: str = "boot", now: float | None = None) -> Token:
    """The token `text` presents, if it is ours, for `mac` and `purpose`, neither spent nor retired nor expired, and
    presented from the address it was issued to; else Unauthorized (none given) or Forbidden saying why.

    `stored`: the row of a token id, None when there is none (a signed token needs none: its row may not be written
    yet). `ip` None: the caller does not know where the request came from, so no address check."""
    if not isinstance(text, str) or not text:
        raise Unauthorized(f"no {PURPOSES[purpose]} given")
    parts = text.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise Forbidden(f"malformed {PURPOSES[purpose]}")
    row = stored(parts[0])
    token = _genuine(signer, parts, mac, purpose, row)
    if token is None and row is not None and row.mac != mac:  # ours, but another machine's? Then say so.
        token = _genuine(signer, parts, row.mac, purpose, row)
    if token is None:
        raise Forbidden(f"unknown {PURPOSES[purpose]}")
    if token.mac != mac:
        raise Forbidden(f"this token was issued to another machine ({token.mac})")
    if row is not None and row.used is not None:
        raise Forbidden("this token was used already (a replay, or a newer boot replaced it)")
    if token.expires <= (now or time.time()):
        raise Forbidden("this token has expired: reboot the machine for a new one")
    here = client_address(ip)
    if token.ip is not None and here is not None and here != token.ip:
        raise Forbidden(f"this token was issued to {token.ip}, which fetched the boot script, and is used "
                        f"from {here}: reboot the machine for a new one (a NAT or proxy between them must "
                        f"show one address for both)")
    return token


def _genuine(signer: Signer, parts: list[str], mac: str, purpose: str, row: Token | None) -> Token | None:
    """The token the parts make if we issued it to `mac` for `purpose`: signed, or of the earlier kind."""
    if len(parts) == 2:
        return _hashed(row, parts[1], purpose)
    try:
        return signer.signed(*parts, mac=mac, purpose=purpose)
    except (ValueError, TypeError, binascii.Error):  # not ASCII; or signed by us but unreadable (cannot happen)
        return None


def _hashed(row: Token | None, secret: str, purpose: str) -> Token | None:
    """A token of the earlier kind: its row, if the secret's hash is the one kept there."""
    if row is None or row.purpose != purpose:
        return None
    return row if hmac.compare_digest(row.hash, hashlib.sha256(secret.encode()).hexdigest()) else None


@lru_cache(maxsize=4096)  # every script and phone-home asks, for the few addresses of the machines booting
def client_address(text: str | None) -> str | None:
    """One spelling per address: an IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d."""
    if not text:
        return None
    try:
        return strict_ip(text.split("%", 1)[0])  # a socket's peer may carry a scope id: not part of the address
    except BadRequest:
        return text


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
