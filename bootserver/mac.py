"""MAC addresses: accepted in any common form, always stored and shown in one canonical form."""

from functools import lru_cache

from netaddr import EUI, AddrFormatError, mac_unix_expanded

from .errors import BadRequest


@lru_cache(maxsize=4096)  # netaddr's parser costs ~30 us; every boot request names its MAC
def canonical_mac(text: str) -> str:
    """`52:54:00:12:34:56` for any common spelling (hyphens, dots, bare hex, upper case).

    Raises BadRequest naming the input when it is not a 48-bit MAC address.
    """
    cleaned = text.strip()
    try:
        eui = EUI(cleaned, dialect=mac_unix_expanded)
    except (AddrFormatError, TypeError, ValueError):
        raise BadRequest(f"not a MAC address: {text!r} (expected e.g. 52:54:00:12:34:56)") from None
    # netaddr also parses EUI-64 and bare integers; a boot server deals in 48-bit MACs written as hex.
    if eui.version != 48 or cleaned.isdigit() and len(cleaned) != 12:
        raise BadRequest(f"not a 48-bit MAC address: {text!r}")
    return str(eui)


def hyphenated(mac: str) -> str:
    """The form iPXE's `${mac:hexhyp}` produces, used in URLs: `52-54-00-12-34-56`."""
    return mac.replace(":", "-")
