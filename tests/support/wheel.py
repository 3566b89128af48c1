"""bootserver as a user installs it: `python -m build` of this checkout, and the wheel installed with its
dependencies (from the package index, as pip finds them) into a virtualenv of its own, with no path back here."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


def build_dists(out: Path) -> Dists:
    """The sdist, and the wheel build makes from it (not from the checkout: whatever the sdist leaves out, the
    wheel lacks too)."""
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return Dists(sdists[0], wheels[0])


def clean_env() -> dict[str, str]:
    """The environment without anything that would lead Python back to this checkout or the test venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def install_wheel(wheel: Path, venv: Path) -> Path:
    """A new virtualenv (no system site-packages) with `wheel` and its dependencies; its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(wheel)],
                            capture_output=True, text=True, env=clean_env(), cwd=venv, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv / "bin"
