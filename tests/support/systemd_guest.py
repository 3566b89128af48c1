#!/usr/bin/python3
"""Run inside the Debian VM of tests/test_vm_systemd.py by a oneshot unit at boot, as root, with the guest's own
Python (standard library only). It installs the unit as the README says (install.sh in the working directory:
the README's commands), then drives it as an operator would and reports what it saw as one JSON line on the
second serial port; the test on the host judges it. Then it powers the VM off.

Nothing here asserts: a fact that is missing or wrong fails the test on the host, with the whole report.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
import urllib.request
from pathlib import Path

BASE = "http://127.0.0.1"
CONFIG = "/etc/bootserver/bootserver.toml"
MAC = "52-54-00-00-00-42"
# a profile and group for one machine, added by the reload step: its script must change without a restart
RELOADED = f"""
[profiles.disk]
template = "localdisk.ipxe.j2"
[groups.disk]
profile = "disk"
selector = {{ mac = "{MAC.replace('-', ':')}" }}
"""


def sh(command: str) -> str:
    result = subprocess.run(command, shell=True, capture_output=True, text=True)
    return f"{result.stdout}{result.stderr}".strip()


def show(*properties: str) -> dict[str, str]:
    lines = sh(f"systemctl show bootserver {' '.join('-p ' + p for p in properties)}").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def get(path: str) -> str:
    try:
        with urllib.request.urlopen(BASE + path, timeout=10) as response:
            return response.read().decode(errors="replace")
    except OSError as exc:
        return f"error: {exc}"


def until(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def process(pid: str) -> dict[str, object]:
    """The service's main process: owner, capabilities, and the sockets it listens on."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    sockets = [line for line in sh("ss -Hltunp").splitlines() if f"pid={pid}," in line]
    return {"uid": status["Uid"].split()[0], "cap_eff": status["CapEff"], "sockets": sockets}


def running(timeout: float) -> dict[str, object]:
    """Once /healthz answers: the unit's state, its process, what it serves."""
    up = until(lambda: get("/healthz").startswith("{"), timeout)
    unit = show("MainPID", "ActiveState", "NRestarts", "User")
    facts: dict[str, object] = {"healthz": up, "unit": unit}
    if unit.get("MainPID", "0") != "0":
        facts["process"] = process(unit["MainPID"])
    return facts


def report(facts: dict[str, object]) -> None:
    """Fills `facts` step by step: when a step breaks, what came before it is reported too."""
    facts["install"] = sh("bash -ex install.sh")
    facts["first"] = running(90)
    facts["bootstrap"] = get("/boot.ipxe")
    facts["state_dir"] = sh("stat -c '%U %a %n' /var/lib/bootserver /var/lib/bootserver/*")
    facts["security"] = sh("systemd-analyze security bootserver --no-pager | tail -1")

    before = get(f"/boot/{MAC}.ipxe")
    with open(CONFIG, "a") as config:
        config.write(RELOADED)
    sh("systemctl reload bootserver")
    until(lambda: "local disk" in get(f"/boot/{MAC}.ipxe"), 30)
    facts["reload"] = {"before": before, "after": get(f"/boot/{MAC}.ipxe"), "unit": show("MainPID", "NRestarts")}

    sh(f"kill -9 {show('MainPID')['MainPID']}")
    until(lambda: show("NRestarts")["NRestarts"] != "0", 60)  # RestartSec=5s
    facts["restarted"] = running(90)
    facts["journal"] = sh("journalctl -u bootserver -o cat --no-pager")


def main() -> None:
    facts: dict[str, object] = {}
    try:
        report(facts)
    except Exception:  # the report says what broke; the host fails the test with it
        facts["error"] = traceback.format_exc()
    with open("/dev/ttyS1", "w") as port:
        port.write(json.dumps(facts) + "\n")
    os.sync()
    subprocess.run(["systemctl", "poweroff"])


if __name__ == "__main__":
    main()
