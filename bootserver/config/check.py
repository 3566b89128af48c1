"""The checks every part of the config shares, all in one shape: `check(raw, key, where, *, default=...)`.

`raw` is a decoded TOML table, `key` the key read from it, and `where` names that table in errors
("config: [server]"), so each refusal says "config: [server] http: ..." and a typo is an error that says
where, never a silent default. A key left out gets `default`; without one the key is required.

What is not a value under a key has the shape `check(text, where)`, `where` naming the thing itself:
a table's own name (`name`), a MAC that is a key (`mac`), an item of an array of tables (`is_table`).
`only_keys(raw, allowed, where)` refuses a key a table has not got; tests/test_settings.py reads its
`allowed` literals to check that every key is documented.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any, TypeVar

from ..errors import BadRequest, ConfigError
from ..mac import canonical_mac

Table = dict[str, Any]
T = TypeVar("T")


class _Required:
    """The default of a key that must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def only_keys(raw: Table, allowed: set[str], where: str) -> None:
    """Refuse a key `raw` has not got: a typo is an error, not a default. Pass `allowed` as a set literal."""
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def given(raw: Table, key: str, where: str, default: Any) -> bool:
    """Whether `key` is in `raw`; a required key left out is refused here."""
    if key in raw:
        return True
    if default is REQUIRED:
        raise ConfigError(f"{where}: missing key {key!r}")
    return False


def table(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> Table | T:
    if not given(raw, key, where, default):
        return default
    return is_table(raw[key], f"{where} {key}")


def is_table(value: Any, where: str) -> Table:
    """`value` itself, which `where` names, when it is a table: for the items of arrays and named sections."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table")
    return value


def sections(raw: Table, key: str, where: str) -> Iterator[tuple[str, Table, str]]:
    """Each named sub-table [key.NAME] of the document: its name, its table, and how errors name it."""
    for text, body in table(raw, key, where, default={}).items():
        here = f"{where}: [{key}.{text}]"
        body = is_table(body, here)
        yield name(text, here), body, here


def string(raw: Table, key: str, where: str, *, default: T = REQUIRED, nonempty: bool = False) -> str | T:
    if not given(raw, key, where, default):
        return default
    value = raw[key]
    if not isinstance(value, str) or (nonempty and not value):
        raise ConfigError(f"{where} {key}: expected a {'non-empty ' if nonempty else ''}string, got {value!r}")
    return value


def positive(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> int | T:
    """A whole number of at least 1: a count, a limit or a number of minutes."""
    if not given(raw, key, where, default):
        return default
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} {key}: expected a whole number of at least 1, got {value!r}")
    return value


def port(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> int | T:
    if not given(raw, key, where, default):
        return default
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{where} {key}: expected a port number 0-65535, got {value!r}")
    return value


def boolean(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> bool | T:
    if not given(raw, key, where, default):
        return default
    value = raw[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{where} {key}: expected true or false, got {value!r}")
    return value


def choice(raw: Table, key: str, where: str, *, choices: tuple[str, ...]) -> str:
    """One of `choices`; the first when the key is left out."""
    value = string(raw, key, where, default=choices[0])
    if value not in choices:
        raise ConfigError(f"{where} {key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def strings(raw: Table, key: str, where: str, *, expected: str,
            accept: Callable[[str], bool] | None = None, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A list of strings, each of which `accept`s; `expected` ("a list of ...") says what it must be, for errors."""
    if not given(raw, key, where, default):
        return default
    values = raw[key]
    if not isinstance(values, list) or not all(isinstance(v, str) and (accept is None or accept(v))
                                               for v in values):
        raise ConfigError(f"{where} {key}: expected {expected}")
    return tuple(values)


def string_table(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> dict[str, str] | T:
    """A table of strings, such as labels or a selector."""
    if not given(raw, key, where, default):
        return default
    value = raw[key]
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where} {key}: expected a table of strings")
    return dict(value)


def ipv4(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> IPv4Address | T:
    if not given(raw, key, where, default):
        return default
    text = string(raw, key, where)
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{where} {key}: {text!r} is not an IPv4 address") from None


def mac(text: Any, where: str) -> str:
    """A MAC address in any common spelling, made canonical; `where` names it (it is often a key itself,
    as in [machines."52:54:00:12:34:56"])."""
    try:
        return canonical_mac(str(text))
    except BadRequest as exc:
        raise ConfigError(f"{where}: {exc}") from None


def uuid(raw: Table, key: str, where: str, *, default: T = REQUIRED) -> str | T:
    """An SMBIOS UUID, in the canonical spelling."""
    if not given(raw, key, where, default):
        return default
    text = string(raw, key, where)
    try:
        return str(uuid_module.UUID(text))
    except ValueError:
        raise ConfigError(f"{where} {key}: {text!r} is not a UUID (as in /sys/class/dmi/id/product_uuid)") from None


def name(text: str, where: str) -> str:
    """A name the operator gives a table (an asset, a profile, a group): safe in paths, URLs and logs."""
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
        raise ConfigError(f"{where}: name {text!r} may hold only letters, digits, '-', '_' and '.'")
    return text


def subtable_where(where: str, key: str) -> str:
    """How errors name the sub-table `key` of the table `where` names: [profiles.raft] -> [profiles.raft.disk]."""
    return f"{where.removesuffix(']')}.{key}]"
