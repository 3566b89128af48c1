"""One-time phone-home tokens: `<id>.<secret>`, looked up by id, secret compared in constant time.

A token is issued each time a machine's boot script is rendered and rides on the kernel command line.
Only a hash of the secret is stored, so a copy of the database cannot phone home for anyone. The token
also remembers the address that fetched the script: a phone-home from any other address is refused, so
a token read off a console or a log cannot be used from another machine on the network.

An installed OS gets a token of its own ("report") on its disk, for its first-boot report: an agent's
token cannot report a boot, nor a report token phone home.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from .admission import strict_ip
from .errors import BadRequest, Forbidden, Unauthorized
from .store import Token

PURPOSES = {"boot": "phone-home token", "report": "report token"}


def new_token(mac: str, minutes: float, ip: str | None = None, uuid: str | None = None,
              purpose: str = "boot") -> tuple[str, Token]:
    """The token to hand out, and the record to store; `ip`: the address the script is sent to, `uuid`: the
    SMBIOS UUID its firmware reported with the request (the agent must report the same)."""
    token_id, secret = secrets.token_urlsafe(9), secrets.token_urlsafe(32)
    now = time.time()
    return f"{token_id}.{secret}", Token(token_id, _hash(secret), mac, now, now + minutes * 60,
                                         ip=client_address(ip), uuid=uuid, purpose=purpose)


def client_address(text: str | None) -> str | None:
    """One spelling per address: an IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d."""
    if not text:
        return None
    try:
        return strict_ip(text.split("%", 1)[0])  # a socket's peer may carry a scope id: not part of the address
    except BadRequest:
        return text


def split(text: object, purpose: str = "boot") -> tuple[str, str]:
    """(id, secret) of a presented token; Unauthorized when there is none."""
    if not isinstance(text, str) or not text:
        raise Unauthorized(f"no {PURPOSES[purpose]} given")
    token_id, dot, secret = text.partition(".")
    if not dot or not token_id or not secret:
        raise Forbidden(f"malformed {PURPOSES[purpose]}")
    return token_id, secret


def check(stored: Token | None, secret: str, mac: str, now: float | None = None, ip: str | None = None,
          purpose: str = "boot") -> Token:
    """The stored token if `secret` matches it and it may still be used by `mac` at `ip` for `purpose`; else
    Forbidden saying why. `ip` None: the caller does not know where the request came from, so no address check."""
    if stored is None or not hmac.compare_digest(stored.hash, _hash(secret)) or stored.purpose != purpose:
        raise Forbidden(f"unknown {PURPOSES[purpose]}")
    if stored.mac != mac:
        raise Forbidden(f"this token was issued to another machine ({stored.mac})")
    if stored.used is not None:
        raise Forbidden("this token was used already (a replay, or a newer boot replaced it)")
    if stored.expires <= (now or time.time()):
        raise Forbidden("this token has expired: reboot the machine for a new one")
    here = client_address(ip)
    if stored.ip is not None and here is not None and here != stored.ip:
        raise Forbidden(f"this token was issued to {stored.ip}, which fetched the boot script, and is used "
                        f"from {here}: reboot the machine for a new one (a NAT or proxy between them must "
                        f"show one address for both)")
    return stored


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
