"""The core: group matching, golden iPXE scripts, events recorded for every decision."""

import re
from pathlib import Path

import pytest
from support.golden import URLS, golden

from bootserver.booter import Booter, Urls
from bootserver.errors import BadRequest, NotFound


def test_most_specific_group_wins(booter: Booter):
    assert booter.boot_spec("52:54:00:00:00:03").group == "default"  # unknown MAC: the catch-all
    assert booter.boot_spec("52:54:00:00:00:01").group == "raft"  # label role=raft
    efi = booter.boot_spec("52:54:00:00:00:01", {"platform": "efi"})
    assert efi.group == "raft-efi"  # two keys beat one
    assert "also matched, less specific: default, raft" in efi.reason
    assert booter.boot_spec("52:54:00:00:00:99").group == "done"  # selector on MAC


def test_no_group_means_no_profile(booter: Booter, config):
    booter.reload(config.__class__(**{**vars(config), "groups": config.groups[1:]}))
    spec = booter.boot_spec("52:54:00:00:00:03")
    assert spec.profile is None
    assert "unknown machine and no group matches" in spec.reason


def test_bootstrap_script_golden(booter: Booter):
    golden("bootstrap.ipxe", booter.bootstrap(URLS).data.decode())


def test_raft_script_golden_and_event(booter: Booter, store):
    payload = booter.machine_script("52-54-00-00-00-01", {"platform": "efi", "arch": "x86_64", "uuid": ""},
                                    URLS, "http")
    golden("raft-efi.ipxe", payload.data.decode())
    node = store.node("52:54:00:00:00:01")
    assert node.state == "script-served"
    assert node.facts == {"platform": "efi", "arch": "x86_64"}  # empty uuid dropped
    event = store.events("52:54:00:00:00:01")[-1]
    assert event.kind == "script-served"
    assert event.detail["group"] == "raft-efi" and event.detail["profile"] == "raft"
    token = re.search(r"bootserver\.token=(\S+)", payload.data.decode())[1]
    assert event.detail["token_issued"] == token.split(".")[0]  # the timeline shows the id, never the secret
    assert token.split(".")[1] not in str(store.events("52:54:00:00:00:01"))


def test_local_disk_script_golden(booter: Booter):
    golden("localdisk-bios.ipxe", booter.machine_script("52:54:00:00:00:99", {"platform": "pcbios"},
                                                        URLS, "http").data.decode())


def test_missing_asset_gets_noboot_script_naming_it(booter: Booter, store, data_dir: Path):
    (data_dir / "images" / "raft.img").unlink()
    text = booter.machine_script("52:54:00:00:00:01", {}, URLS, "http").data.decode()
    assert "raft-initrd" in text and "missing" in text and "exit 0" in text
    assert store.events("52:54:00:00:00:01")[-1].kind == "no-boot"


def test_boot_file_and_transfer_events(booter: Booter, store):
    booter.machine_script("52:54:00:00:00:01", {}, Urls("http://h", "http://h"), "http", "10.0.0.1")
    payload = booter.boot_file("52:54:00:00:00:01", "vmlinuz")
    assert payload.path.name == "vmlinuz" and payload.mac == "52:54:00:00:00:01"
    booter.file_sent(payload, "tftp", payload.size, 0.5)
    assert store.node("52:54:00:00:00:01").state == "kernel-served"
    booter.file_sent(payload, "http", 10, 0.1, error="client went away")
    assert store.events("52:54:00:00:00:01")[-1].kind == "file-failed"
    with pytest.raises(NotFound):
        booter.boot_file("52:54:00:00:00:01", "nope")
    with pytest.raises(BadRequest):
        booter.boot_file("not-a-mac", "vmlinuz")


def test_unknown_and_known_machines_without_a_profile_are_told_the_same(booter: Booter, store, config):
    booter.reload(config.__class__(**{**vars(config), "groups": config.groups[3:]}))
    known = booter.machine_script("52:54:00:00:00:01", {}, URLS, "http").data.decode()
    unknown = booter.machine_script("52:54:00:00:00:03", {}, URLS, "http").data.decode()
    assert known.replace("00:00:00:01", "X") == unknown.replace("00:00:00:03", "X")
    assert "configured" in store.events("52:54:00:00:00:01")[-1].detail["reason"]  # the log knows


@pytest.mark.parametrize(("platform", "padding"), [("efi", True), ("pcbios", False)])
def test_the_overlay_is_aligned_after_initrds_only_where_they_are_joined_unpadded(booter: Booter, config, platform,
                                                                                 padding):
    """UEFI's kernel stub joins initrds end to end (the overlay must pad itself to a 4-byte boundary); under BIOS
    iPXE aligns each initrd, and padding would misalign it."""
    with config.assets["raft-initrd"].open("ab") as initrd:
        initrd.write(b"odd")  # 51,003 bytes before the overlay
    payload = booter.machine_script("52-54-00-00-00-01", {"platform": platform, "arch": "x86_64"}, URLS, "http")
    token = re.search(r"bootserver\.token=(\S+)", payload.data.decode())[1]
    before = sum(config.assets[name].stat().st_size for name in ("initrd", "raft-initrd"))
    overlay = booter.overlay("52-54-00-00-00-01", token, URLS).data
    zeros = len(overlay) - len(overlay.lstrip(b"\0"))
    assert zeros == (1 if padding else 0) and (before + zeros) % 4 == (0 if padding else 3)
    assert overlay[zeros:].startswith(b"070701")  # the first newc header


def test_uefi_http_boot_of_a_machine_that_boots_its_disk_gets_no_boot_file(booter: Booter, store):
    """After iPXE leaves a deployed UEFI machine for its disk, the firmware tries its own HTTP boot: given iPXE again
    it would loop and end in its setup menu (seen in the lab). PXE and iPXE itself are answered as always."""
    mac = "52:54:00:00:00:03"
    assert booter.dhcp_boot(mac, 16, False, True, URLS).bootfile == f"{URLS.api}/ipxe/ipxe.efi"
    store.record(mac, "deployed", {}, state="deployed")
    http = booter.dhcp_boot(mac, 16, False, True, URLS)
    assert http.bootfile is None and "goes on to the disk" in http.reason
    assert store.events(mac)[-1].detail["answer"] == http.reason
    assert booter.dhcp_boot(mac, 7, False, False, URLS).bootfile == "ipxe.efi"
    assert booter.dhcp_boot(mac, 16, True, True, URLS).bootfile == f"{URLS.api}/boot.ipxe"
    booter.reprovision(mac)
    assert booter.dhcp_boot(mac, 16, False, True, URLS).bootfile == f"{URLS.api}/ipxe/ipxe.efi"
