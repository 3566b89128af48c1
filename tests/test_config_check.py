"""bootserver.config.check: one shape for every check, a left-out default making the key required."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from bootserver.config import check
from bootserver.errors import ConfigError

WHERE = "config: [t]"

# Every check of a value under a key: (function, extra keyword arguments, a good value, what it reads as).
CHECKS: list[tuple[Any, dict[str, Any], Any, Any]] = [
    (check.string, {}, "x", "x"),
    (check.positive, {}, 3, 3),
    (check.port, {}, 69, 69),
    (check.boolean, {}, False, False),
    (check.table, {}, {"a": 1}, {"a": 1}),
    (check.string_table, {}, {"a": "b"}, {"a": "b"}),
    (check.strings, {"expected": "a list of names"}, ["a"], ("a",)),
    (check.ipv4, {}, "192.0.2.1", IPv4Address("192.0.2.1")),
    (check.uuid, {}, "4C4C4544-0042-3510-8056-B4C04F4E3132", "4c4c4544-0042-3510-8056-b4c04f4e3132"),
]


@pytest.mark.parametrize(("read", "extra", "good", "expected"), CHECKS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_check_has_the_one_shape(read, extra, good, expected):
    assert read({"k": good}, "k", WHERE, **extra) == expected
    assert read({}, "k", WHERE, **extra, default=None) is None
    with pytest.raises(ConfigError, match=r"^config: \[t\] k: "):
        read({"k": object()}, "k", WHERE, **extra)


@pytest.mark.parametrize(("read", "extra"), [(c[0], c[1]) for c in CHECKS if c[0] is not check.strings],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_a_key_without_a_default_is_required(read, extra):
    with pytest.raises(ConfigError, match=r"^config: \[t\]: missing key 'k'$"):
        read({}, "k", WHERE, **extra)


def test_choice_defaults_to_the_first():
    assert check.choice({}, "mode", WHERE, choices=("off", "on")) == "off"
    with pytest.raises(ConfigError, match="mode: expected one of off, on, got 'maybe'"):
        check.choice({"mode": "maybe"}, "mode", WHERE, choices=("off", "on"))


def test_sections_name_each_table_and_check_its_name():
    raw = {"profiles": {"a": {"kernel": "k"}}}
    assert list(check.sections(raw, "profiles", "config")) == [("a", {"kernel": "k"}, "config: [profiles.a]")]
    with pytest.raises(ConfigError, match=r"\[profiles.b/c\]: name 'b/c'"):
        list(check.sections({"profiles": {"b/c": {}}}, "profiles", "config"))
    with pytest.raises(ConfigError, match=r"\[profiles.d\]: expected a table"):
        list(check.sections({"profiles": {"d": 1}}, "profiles", "config"))


def test_a_sub_table_is_named_inside_its_table():
    assert check.subtable_where("config: [profiles.raft]", "disk") == "config: [profiles.raft.disk]"
