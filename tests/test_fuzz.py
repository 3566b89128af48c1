"""The fuzzing harness in its quick mode (fuzz/run --quick: 10^4 TFTP datagrams, 10^3 DHCP packets,
10^3 HTTP requests at a real `bootserver serve`): no crash, no internal error, no leaked descriptor,
memory within 10%. The full run (10^6/10^5/10^5) is on demand: `sudo fuzz/run` (README, Hardening)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_fuzz_run_passes():
    result = subprocess.run([str(ROOT / "fuzz" / "run"), "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "\nPASS\n" in report, report
    assert "alive and /healthz 200: True" in report, report
