"""Per-machine files for installers ([profiles.X.files]): where each one is, and who may fetch it.

A distribution's installer (Debian's with a preseed, Anaconda with a kickstart, cloud-init's NoCloud, Ignition)
fetches its answers over HTTP or TFTP from /boot/{mac-hyphenated}/files/{name}, rendered for that machine.

Such a file may hold secrets (a password hash, a key), and anyone on the boot network can ask as any MAC. So a
machine's files go only where its boot went: to the address holding its live boot token, which it got with its
boot script, and only while its provisioning window was open (enrollment.py, `[server] enroll`). So a MAC
that never asked for its script, one waiting for approval, one whose claims are held, and an address other
than the one that booted it get nothing; nor does anyone once the token is spent (the machine phoned home)
or expired (`[server] token_minutes` after the script). An installer that fetches files later than that
needs a longer token_minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from .errors import BadRequest, ConfigError
from .mac import hyphenated
from .store import Node, Token
from .tokens import client_address


def file_path(mac: str, name: str) -> str:
    """The file's path under our base URL, over HTTP and TFTP alike."""
    return f"boot/{hyphenated(mac)}/files/{name}"


def file_urls(base: str, mac: str, names: Collection[str]) -> Callable[[str], str]:
    """`file_url(name)` for templates: the URL of one of the machine's files under `base` (its scripts' own).
    The load checks the names in command lines and files (config/files.py), not those in an operator's own
    iPXE template: one the profile lacks fails loudly here, as the operator's mistake."""
    def file_url(name: str) -> str:
        if name not in names:
            raise ConfigError(f"file_url({name!r}): the machine's profile has no such file in its files table")
        return f"{base}/{file_path(mac, name)}"
    return file_url


def checked_name(text: str) -> str:
    """A file name as a request gives it: what [profiles.X.files] allows as a name, or 400."""
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
        raise BadRequest(f"{text[:64]!r} is not a file name: only letters, digits, '-', '_' and '.', "
                         f"not starting with '.'")
    return text


def refusal(mac: str, node: Node | None, live: Token | None, client_ip: str | None) -> str | None:
    """Why `client_ip` may not have `mac`'s installer files now; None when it may (the rule above)."""
    if node is None:
        return f"{mac} has not asked for its boot script: its files go only to the address that booted it"
    if node.held:
        return f"{mac}'s claims are held ({node.held}): an operator must approve it (bootserver approve {mac})"
    if live is None:
        return (f"{mac} holds no live boot token (its window is closed, its token expired after [server] "
                f"token_minutes, or it phoned home already): boot it again to fetch its files")
    here = client_address(client_ip)
    if here is None or live.ip != here:
        return f"{mac}'s boot token was issued to {live.ip or 'no address'}, not to {here or 'an unknown address'}"
    return None
