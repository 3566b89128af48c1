"""The agent image the VM tests netboot (and benchmarks/bench_install.py), built once into a directory that
survives runs and rebuilt only when its sources change."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bootserver.tools import apt, contents, image, initramfs


def agent_image_dir() -> Path:
    """$BOOTSERVER_TEST_IMAGE_DIR, or ~/.cache/bootserver/test-image."""
    return Path(os.environ.get("BOOTSERVER_TEST_IMAGE_DIR") or Path.home() / ".cache/bootserver/test-image")


def build_test_agent_image() -> image.AgentImage:
    """Rebuilt only when a file is missing or the sources changed since it was built (the image build's modules
    in bootserver/tools/ and every file under bootserver/tools/agent/: one SHA256 of them all is kept beside the
    image), so that editing /init is never tested against a stale initrd."""
    out = agent_image_dir()
    agent_dir = initramfs.AGENT_DIR
    modules = [Path(m.__file__) for m in (image, apt, contents, initramfs)]
    sources = [*modules, *sorted(p for p in agent_dir.rglob("*") if p.is_file())]
    digest = hashlib.sha256()
    for path in sources:  # names too: a renamed script is a change
        digest.update(f"{path.relative_to(agent_dir.parent)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    source = digest.hexdigest()
    stamp = out / "image.py.sha256"
    files = [out / "vmlinuz", out / "initrd.img", out / "version"]
    if all(f.is_file() for f in files) and stamp.is_file() and stamp.read_text().strip() == source:
        return image.AgentImage(kernel=files[0], initrd=files[1], version=files[2].read_text().strip())
    built = image.build_agent_image(out)
    stamp.write_text(source + "\n")
    return built
