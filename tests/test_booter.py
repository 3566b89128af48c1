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


def test_a_deployed_uefi_machine_leaves_ipxe_for_its_disk_with_an_error_status(booter: Booter, store):
    """A deployed UEFI machine's network boot, the NIC's iPXE or the firmware's HTTP boot and then ipxe.efi, gets
    the local-disk script, after which the bootstrap leaves iPXE with an error status: UEFI's boot manager then tries
    its next entry, the disk. (Answered without a boot file, OVMF's HTTP boot retried for a minute first; an iPXE it
    fetched over HTTP boot that exited with success sent it to its setup menu; the local-disk script's own `exit 1`
    made the bootstrap wait 10 s as for a failed chain: all seen in the lab.)"""
    mac = "52:54:00:00:00:03"
    store.record(mac, "deployed", {}, state="deployed")
    http = booter.dhcp_boot(mac, 16, False, True, URLS)
    assert (http.bootfile, http.http) == (f"{URLS.api}/ipxe/ipxe.efi", True)
    assert store.events(mac)[-1].detail["answer"] == http.reason
    text = booter.machine_script(mac, {"platform": "efi"}, URLS, "http").data.decode()
    assert "local disk" in text and "\nset bootserver-localdisk 1\nexit 0" in text and "sanboot" not in text
    bootstrap = booter.bootstrap(URLS).data.decode()
    assert "|| goto failed\n# A machine sent to its disk" in bootstrap
    assert "\nisset ${bootserver-localdisk} && exit 1 ||\nexit 0\n" in bootstrap
    assert booter.dhcp_boot(mac, 7, False, False, URLS).bootfile == "ipxe.efi"
    assert booter.dhcp_boot(mac, 16, True, True, URLS).bootfile == f"{URLS.api}/boot.ipxe"
