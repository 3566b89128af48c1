"""No test skips itself: a test that needs a missing tool or root fails (tests/support/require.py), and in CI the
conftest turns any skip that still happens (a plugin's, a fixture's) into a failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SKIP = "skip"  # spelled apart, so that this file holds no skip construct of its own
SKIPS = re.compile(rf"pytest\.{SKIP}\b|\.mark\.{SKIP}(if)?\b|importor{SKIP}|unittest\.{SKIP}")


def test_no_test_module_skips():
    found = [f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
             for path in sorted(TESTS.rglob("*.py")) if path != Path(__file__)
             for number, line in enumerate(path.read_text().splitlines(), 1) if SKIPS.search(line)]
    assert found == []


def test_a_skip_fails_in_ci(tmp_path: Path):
    """A throwaway test module that skips, run with this conftest: reported skipped locally, failed under CI=true."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_skipping.py").write_text("import pytest\n\n\ndef test_needs_a_tool():\n"
                                              f"    pytest.{SKIP}('frobnicate is not installed')\n")

    def run(ci: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs",
                               str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    local, ci = run(None), run("true")
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout + ci.stderr
    assert "skipped in CI, where every test must run: frobnicate is not installed" in ci.stdout, ci.stdout
