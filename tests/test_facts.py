"""What machines say about themselves, reduced to what we keep."""

import asyncssh
import pytest

from bootserver.errors import BadRequest
from bootserver.facts import clean_facts, disks, firmware_uuid, host_key, secure_boot, selector_facts


def test_hostile_facts_are_refused():
    with pytest.raises(BadRequest):
        clean_facts({"serial": "x\nkernel http://evil/"})
    with pytest.raises(BadRequest):
        clean_facts({"uuid": "u" * 500})
    assert clean_facts({"colour": "red", "platform": "efi"}) == {"platform": "efi"}


def test_groups_select_on_mac_arch_and_platform_only():
    assert selector_facts({"platform": "efi", "arch": "x86_64", "serial": "S1"}) == {"platform": "efi",
                                                                                   "arch": "x86_64"}


def test_a_garbage_firmware_uuid_counts_as_none():
    assert firmware_uuid({"uuid": "not-a-uuid"}) is None
    assert firmware_uuid({"uuid": "4C4C4544-0042-3510-8056-B4C04F4E3132"}) == "4c4c4544-0042-3510-8056-b4c04f4e3132"


def test_phone_home_reports_are_checked_and_cut_to_size():
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    line, fingerprint = host_key(key + " with a comment\n")
    assert line.startswith("ssh-ed25519 ") and fingerprint.startswith("SHA256:")
    with pytest.raises(BadRequest):
        host_key("ssh-ed25519 garbage")
    reported = [{"name": "vda", "size_bytes": 1 << 30, "partitions": True}, "junk", {"name": 7}] * 20
    kept = disks(reported)
    assert len(kept) == 11 and kept[0] == {"name": "vda", "size_bytes": 1 << 30, "partitions": 0}
    assert disks("vda") == []


def test_secure_boot_is_a_boolean_or_nothing():
    assert secure_boot(True) is True and secure_boot(False) is False
    for said in (None, "true", 1, [], {"on": True}):
        assert secure_boot(said) is None
