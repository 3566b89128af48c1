"""Read-only TFTP server on asyncio.

Protocols: RFC 1350 (TFTP), RFC 2347 (option negotiation), RFC 2348 (blksize), RFC 2349 (timeout,
tsize) and RFC 7440 (windowsize). Only reading: a WRQ gets ERROR 2 and nothing is written.

Only octet mode is served. A netascii request is refused with ERROR 4: converting line endings is
never what a boot loader wants, and answering a netascii client with raw bytes would let it mangle
every CR byte of a binary file without anyone noticing.

Layout, bottom to top:

    wire.py     the wire format: requests, ERROR, OACK, option negotiation, the path MTU
    session.py  one transfer (`Session`) on its own socket, and what it reports (`Transfer`)
    engine.c    the same transfer loop in C, for every transfer at once on one thread (built with the package)
    native.py   `Engine` (engine.c, loaded with ctypes) and `NativeSession`, a transfer it runs
    server.py   `TftpServer`: the listening port, admission of new transfers, the retransmission sweep
    routes.py   `Routes`: file names onto calls on the Booter, the only module that knows the core

The server serves whatever a `resolve(filename, peer)` callable returns and reports every transfer to
an `on_done` callable; `Routes` provides both. Everything runs on the event loop, except the blocks of admitted
transfers when the C loop runs them (`[server] tftp_engine`): its thread sends and retransmits, and each ended
transfer comes back to the event loop to be reported.

The boot network is not trusted: anything on it can send requests from many source addresses, and
can forge the source address of a request. Two rules follow: admission keeps room for sources that
hold no transfer (server.py), and a peer never heard from gets at most one retransmission and no
ERROR (session.py).
"""

from .routes import Routes, local_address_towards
from .server import MAX_SESSIONS, MAX_SESSIONS_PER_CLIENT, TftpServer, session_cap
from .session import UNANSWERED_RETRIES, Transfer
from .wire import (
    MAX_ACCEPTED_TIMEOUT,
    MAX_BLKSIZE,
    Address,
    MalformedPacket,
    Negotiated,
    Request,
    clamp_blksize,
    negotiate,
    parse_request,
    path_mtu,
)

__all__ = [
    "MAX_ACCEPTED_TIMEOUT",
    "MAX_BLKSIZE",
    "MAX_SESSIONS",
    "MAX_SESSIONS_PER_CLIENT",
    "UNANSWERED_RETRIES",
    "Address",
    "MalformedPacket",
    "Negotiated",
    "Request",
    "Routes",
    "TftpServer",
    "Transfer",
    "clamp_blksize",
    "local_address_towards",
    "negotiate",
    "parse_request",
    "path_mtu",
    "session_cap",
]
