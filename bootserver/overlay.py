"""The per-machine initrd overlay: a small cpio (newc) the kernel unpacks over any initramfs.

iPXE loads it as a second `initrd`, so our agent image or a NixOS netboot image finds its SSH keys
and phone-home settings without being rebuilt. It holds public keys and the boot's token, never a
private key.
"""

from __future__ import annotations

import json
from typing import Any

import libarchive

# The overlay's file name: the kernel command line names it for UEFI's stub.
OVERLAY_NAME = "bootserver.cpio"
# Fixed times make the same config give the same bytes.
_MTIME = 1704067200


def overlay_cpio(config: dict[str, Any], after: int = 0) -> bytes:
    """/etc/bootserver/config.json and /etc/bootserver/authorized_keys as an uncompressed newc archive.

    `after`: bytes of the initrds joined before it without padding. UEFI's kernel stub joins initrds end to
    end, and the kernel reads a newc header's padding by its offset in the whole: an overlay starting off a
    4-byte boundary is misread and silently dropped. Leading zeros (which the kernel skips) put it on the
    boundary. Under BIOS iPXE aligns each initrd itself: `after` must then be 0, or the zeros would misalign it.

    The agent reads the flat string fields of config.json with sed, so they may hold no quote,
    backslash or newline; keys are one a line.
    """
    for key, value in config.items():
        if isinstance(value, str) and any(c in value for c in '"\\\n'):
            raise ValueError(f"overlay: {key} {value!r} holds a quote, backslash or newline")
    if any("\n" in key for key in config["authorized_keys"]):
        raise ValueError("overlay: an authorized key spans lines")
    files = {  # path: (mode, bytes); config.json holds this boot's token: root only
        "etc/bootserver/config.json": (0o600, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()),
        "etc/bootserver/authorized_keys": (0o644, "".join(f"{k}\n" for k in config["authorized_keys"]).encode()),
    }
    chunks: list[bytes] = []
    attrs = {"uid": 0, "gid": 0, "mtime": _MTIME}
    with libarchive.custom_writer(lambda data: chunks.append(bytes(data)) or len(data), "cpio_newc") as archive:
        for directory in ("etc", "etc/bootserver"):  # the kernel does not create missing parents
            archive.add_file_from_memory(directory, 0, b"", filetype=libarchive.entry.FileType.DIRECTORY,
                                         permission=0o755, **attrs)
        for path, (mode, data) in files.items():
            archive.add_file_from_memory(path, len(data), data, permission=mode, **attrs)
    return bytes(-after % 4) + b"".join(chunks)
