"""Which iPXE binary a firmware gets, by DHCP or by name."""

import pytest

from bootserver.errors import NotFound
from bootserver.firmware import IPXE_BINARIES, dhcp_answer, firmware_binary, ipxe_binary


@pytest.mark.parametrize(("arch", "binary"), [(0, "undionly.kpxe"), (7, "ipxe.efi"), (9, "ipxe.efi"),
                                               (11, "snponly-arm64.efi")])
def test_firmware_binary_by_client_arch(arch, binary):
    assert firmware_binary(arch) == binary


def test_unknown_client_arch_is_not_found():
    with pytest.raises(NotFound, match="architecture 99"):
        firmware_binary(99)


@pytest.mark.parametrize(("arch", "ipxe", "http", "bootfile"), [
    (0, False, False, "undionly.kpxe"),
    (7, False, False, "ipxe.efi"),
    (16, False, False, "http://h:8080/ipxe/ipxe.efi"),  # UEFI HTTP boot: the binary as a URL
    (0, True, False, "http://h:8080/boot.ipxe"),  # iPXE itself: the bootstrap, never a binary again
    (None, False, False, None),  # an OS's own DHCP client: an address only
    (99, False, False, None),
])
def test_what_dhcp_tells_each_client(arch, ipxe, http, bootfile):
    answer = dhcp_answer(arch, ipxe, http, "http://h:8080")
    assert answer.bootfile == bootfile and answer.reason
    assert answer.http == (arch == 16)


def test_ipxe_binaries_are_served_by_name_only_from_the_ipxe_dir(tmp_path):
    (tmp_path / "ipxe.efi").write_bytes(b"EFI")
    assert ipxe_binary("ipxe.efi", tmp_path).path == tmp_path / "ipxe.efi"
    with pytest.raises(NotFound, match="not an iPXE binary"):
        ipxe_binary("../etc/passwd", tmp_path)
    with pytest.raises(NotFound, match="missing"):
        ipxe_binary("undionly.kpxe", tmp_path)
    assert "undionly.kpxe" in IPXE_BINARIES
