"""What a test needs of the machine (a tool, root): missing, the test fails saying how to get it, never skips.

CI runs as root with everything `./setup test` installs; a test that skipped there would pass without proving
anything (conftest.py also turns any skip into a failure when $CI is set).

    require("losetup", "mkfs.ext4")      # the packages to install are named from PACKAGES
    require_root("it attaches loop devices")
"""

from __future__ import annotations

import os
import shutil

import pytest

# The Debian package of each tool the tests run, for the failure message (./setup's TEST_APT installs them all).
PACKAGES = {"readelf": "binutils", "chroot": "coreutils", "losetup": "util-linux", "prlimit": "util-linux",
            "unshare": "util-linux", "nsenter": "util-linux", "mount": "mount", "mkfs.ext4": "e2fsprogs",
            "e2fsck": "e2fsprogs", "chattr": "e2fsprogs", "shellcheck": "shellcheck", "curl": "curl",
            "atftp": "atftp", "ip": "iproute2", "dnsmasq": "dnsmasq-base",
            "ipmi_sim": "openipmi", "ipmitool": "ipmitool", "vde_switch": "vde2", "vde_plug": "vde2",
            "qemu-system-x86_64": "qemu-system-x86", "libvirtd": "libvirt-daemon", "virsh": "libvirt-clients"}


def require(*tools: str) -> None:
    """Fail now unless every one of `tools` is on PATH."""
    missing = [f"{tool} ({PACKAGES.get(tool, 'see ./setup')})" for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: apt-get install them (./setup test does)")


def require_root(why: str) -> None:
    """Fail now unless we are root (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.fail(f"needs root: {why} (CI runs as root)")
