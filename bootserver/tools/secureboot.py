"""`bootserver image secureboot`: the signed binaries of the Secure Boot chain, from Debian's packages.

shim-signed's `shimx64.efi.signed` (Debian's shim, signed with Microsoft's UEFI CA key, which the firmware of most
x86-64 machines trusts) becomes `shimx64.efi`; grub-efi-amd64-signed's `grubnetx64.efi.signed` (Debian's network
GRUB image, signed with Debian's key, which shim trusts) becomes `grubx64.efi`, the name shim loads from its own
directory. Downloaded with apt-get download (no package is installed: their scripts would run grub-install) into
the same .deb cache as the agent image, then extracted.

They come from Debian 13 (trixie) whatever the host runs: Debian 12's network GRUB (2.06) has no `http` module, so
started by the firmware's own HTTP boot it can read nothing (its `$prefix` is an HTTP device); Debian 13's (2.12)
reads its configuration, kernel and initrds over HTTP as over TFTP. The agent's kernel stays Debian's signed one,
whichever release it comes from: shim trusts every binary signed with Debian's key.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import BootserverError
from ..firmware import SHIM
from .apt import DEBIAN_MIRROR, Suite, fetch_debs, run

SUITE = "trixie"

# package -> (path in the package, name we serve it by)
SIGNED_FILES = {
    "shim-signed": ("usr/lib/shim/shimx64.efi.signed", SHIM),
    "grub-efi-amd64-signed": ("usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed", "grubx64.efi"),
}


def fetch_secure_boot_files(dest: Path, cache_dir: Path, progress: Callable[[str], None], *, suite: str = SUITE,
                            mirror: str = DEBIAN_MIRROR) -> list[Path]:
    """shimx64.efi and grubx64.efi in dest, from the signed packages of Debian `suite`; their paths."""
    apt = Suite(suite, cache_dir / "apt" / suite, mirror)
    debs = fetch_debs(list(SIGNED_FILES), cache_dir / "debs", progress, apt)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="secureboot-", dir=cache_dir) as tmp:
        for (package, (inside, name)), deb in zip(SIGNED_FILES.items(), debs, strict=True):
            root = Path(tmp) / package
            run(["dpkg", "-x", str(deb), str(root)], what=f"dpkg -x {deb.name}")
            if not (root / inside).is_file():
                raise BootserverError(f"{deb.name} has no {inside}: Debian moved it; bootserver needs updating")
            part = dest / f".{name}.part"
            shutil.copyfile(root / inside, part)
            part.replace(dest / name)
            progress(f"{dest / name}: {deb.name}")
            written.append(dest / name)
    return written
