"""Builds the TFTP transfer loop (bootserver/tftp/engine.c) into bootserver/tftp/_engine.so with the wheel.

A hatchling build hook: with a C compiler, the wheel carries the library and is tagged for this platform (py3-none:
the library is loaded with ctypes, so any Python 3 can use it); without one, the wheel stays pure Python and the
server runs its transfers in Python (bootserver/tftp/native.py says so at start). An editable install builds the
library in the checkout. After editing engine.c: `python hatch_build.py` (native.py refuses a library built from
another engine.c, by the source's hash compiled into it).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "bootserver" / "tftp" / "engine.c"
LIBRARY = "bootserver/tftp/_engine.so"


def compiler() -> list[str] | None:
    command = shlex.split(os.environ.get("CC", "cc"))
    return command if command and shutil.which(command[0]) else None


def build(output: Path) -> None:
    """Compile engine.c into `output`, with the source's SHA-256 inside (native.py checks it)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, or $CC)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    subprocess.run([*cc, "-O2", "-Wall", "-shared", "-fPIC", f'-DSOURCE_SHA256="{digest}"', "-o", str(output),
                    str(SOURCE), "-lpthread"], check=True)


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script, outside a build
    BuildHookInterface = object  # type: ignore[assignment,misc]


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        if compiler() is None:
            print("hatch_build: no C compiler: the TFTP transfers will run in Python", file=sys.stderr)
            return
        if version == "editable":
            build(Path(self.root) / LIBRARY)
            return
        self._tmp = tempfile.TemporaryDirectory()
        output = Path(self._tmp.name) / "_engine.so"
        build(output)
        build_data["force_include"][str(output)] = LIBRARY
        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()


if __name__ == "__main__":
    build(SOURCE.with_name("_engine.so"))
    print(f"built {SOURCE.with_name('_engine.so')}")
