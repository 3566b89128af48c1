"""GRUB's side of the Secure Boot chain: how its configuration names our files, and how values are quoted in it.

A Secure Boot machine runs Debian's signed shim, which loads Debian's signed network GRUB (grubnetx64.efi, served
as grubx64.efi beside shim; Debian 13's, GRUB 2.12: tools/secureboot.py); that GRUB reads `$prefix/grub.cfg` from
where it came from (TFTP or HTTP), which sends it on to `$prefix/MAC.cfg`: the machine's own configuration, the
twin of its iPXE script (templates in `grub/`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import urlsplit

# A kernel command line's words as the kernel splits them: on blanks, except inside double quotes.
_WORD = re.compile(r'(?:[^\s"]|"[^"]*")+')


def quote(value: object) -> str:
    """One GRUB word holding `value` literally: single quotes, in which GRUB expands nothing."""
    return "'" + str(value).replace("'", "'\\''") + "'"


def words(cmdline: str) -> str:
    """A kernel command line as GRUB words, each quoted: GRUB joins a `linux` command's arguments with spaces, so
    the kernel gets the line back as written, and no `$`, `;` or quote in it is GRUB's."""
    return " ".join(quote(word) for word in _WORD.findall(cmdline))


@lru_cache(maxsize=64)  # a server's few URLs, asked for on every boot script
def root(url: str) -> str:
    """The GRUB device of our server at `url`: (http,HOST) or (http,HOST:PORT) for our HTTP, else (tftp,HOST).

    GRUB 2.12 takes a port in a device name (2.06 did not: Debian 12's GRUB reaches our HTTP on port 80 only)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    if parts.scheme == "http":
        return f"(http,{host})" if (parts.port or 80) == 80 else f"(http,{host}:{parts.port})"
    return f"(tftp,{host})"
