"""The `bootserver` command as a user runs it: a real subprocess each time."""

import subprocess
import sys
import urllib.request
from pathlib import Path

from support.boots import FULL_BOOT, FULL_PHASES, failing_boot, record
from support.config import section, server_section
from support.net import free_port
from support.serve import answers, serve_command
from support.wait import until

from bootserver.phases import LABELS
from bootserver.store import Store


def bootserver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootserver", *args], capture_output=True, text=True, timeout=60)


def test_render_explains_its_choice(config_file: Path):
    result = bootserver("--config", str(config_file), "render", "52-54-00-00-00-01", "--platform", "efi",
                        "--url", "http://192.0.2.1:8080")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# 52:54:00:00:00:01: configured as node1; facts {'platform': 'efi'}"
    assert lines[1] == "# matched: group raft-efi (platform=efi, role=raft); also matched, less specific: default, raft"
    assert lines[2] == "# profile: raft (template linux.ipxe.j2)"
    assert lines[3] == "#!ipxe"
    assert "kernel http://192.0.2.1:8080/boot/52-54-00-00-00-01/vmlinuz" in result.stdout


def test_render_without_a_match_says_so(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(section("server", data_dir=tmp_path) + '[assets]\nk = "k"\n[profiles.p]\nkernel = "k"\n'
                    '[groups.only-raft]\nprofile = "p"\nselector = { role = "raft" }\n')
    result = bootserver("--config", str(path), "render", "52:54:00:00:00:05")
    assert result.returncode == 1
    assert "unknown machine and no group matches" in result.stdout


def test_bad_mac_and_bad_config_are_clear_errors(config_file: Path, tmp_path: Path):
    result = bootserver("--config", str(config_file), "render", "nope")
    assert result.returncode == 2 and "not a MAC address: 'nope'" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nhtpp = "0.0.0.0:80"\n')
    result = bootserver("--config", str(bad), "serve")
    assert result.returncode == 2 and "unknown key 'htpp'" in result.stderr
    assert "Traceback" not in result.stderr


def test_nodes_lists_machines(config_file: Path, config):
    assert "no machines yet" in bootserver("--config", str(config_file), "nodes").stdout
    store = Store(config.server.database)
    store.record("52:54:00:00:00:01", "script-served", state="script-served", facts={"platform": "efi"})
    store.close()
    lines = bootserver("--config", str(config_file), "nodes").stdout.splitlines()
    assert lines[0].split() == ["MAC", "HOSTNAME", "STATE", "PROFILE", "PLATFORM", "LAST", "SEEN"]
    assert lines[1].split()[:5] == ["52:54:00:00:00:01", "node1", "script-served", "raft", "efi"]


def test_show_prints_the_timeline_and_why(config_file: Path, config):
    result = bootserver("--config", str(config_file), "show", "52-54-00-00-00-01")
    assert result.returncode == 2 and "no machine 52:54:00:00:00:01" in result.stderr
    store = Store(config.server.database)
    store.record("52:54:00:00:00:01", "script-served", {"profile": "raft", "group": "raft", "reason": "group raft",
                                                        "transport": "http"}, state="script-served")
    store.record("52:54:00:00:00:01", "command", {"step": "disk", "command": "sfdisk /dev/vda", "exit_status": 1,
                                                  "seconds": 0.5, "stdout_tail": "", "stderr_tail": "no\x1b[2Jdisk\n"})
    store.close()
    result = bootserver("--config", str(config_file), "show", "525400000001")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "script-served  profile raft over http: group raft" in lines[0]
    replaced = "\N{REPLACEMENT CHARACTER}"
    assert lines[1].endswith(f"command        [disk] sfdisk /dev/vda → exit 1 in 0.5 s — no{replaced}[2Jdisk")
    assert "\x1b" not in result.stdout  # a node's output cannot drive the operator's terminal
    assert "machine:  52:54:00:00:00:01 (node1)" in lines
    assert "profile:  raft (group raft)" in lines
    assert "why:      group raft (role=raft); also matched, less specific: default" in lines
    assert "host key: not pinned yet (pinned when the node phones home)" in lines


def test_serve_starts_answers_and_stops_on_sigterm(tmp_path: Path):
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(server_section(tmp_path / "data", http=f"127.0.0.1:{port}"))
    server = subprocess.Popen(serve_command(path), stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 10, what="bootserver serve to answer /healthz")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/boot/52-54-00-00-00-03.ipxe", timeout=2) as response:
            script = response.read().decode()
        # Embedded defaults and no image built yet: a no-boot script that says what to do.
        assert "bootserver image build" in script and "exit 0" in script
    finally:
        server.terminate()
        assert server.wait(10) == 0
    assert (tmp_path / "data" / "bootserver.sqlite3").is_file()


def test_plan_prints_the_disk_commands_and_files(tmp_path: Path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "raftd").write_text("#!/bin/sh\n")
    path = tmp_path / "c.toml"
    path.write_text(section("server", data_dir=tmp_path) + '[assets]\nk = "k"\n'
                    '[profiles.p]\nkernel = "k"\n[profiles.p.disk]\ndevice = "/dev/vda"\n'
                    '[[profiles.p.disk.partitions]]\nlabel = "boot"\nsize = "512MiB"\ntype = "esp"\nmount = "/boot"\n'
                    '[[profiles.p.disk.partitions]]\nlabel = "nixos"\nsize = "rest"\nmount = "/"\n'
                    '[profiles.p.deploy]\n[[profiles.p.deploy.files]]\nsource = "files/raftd"\n'
                    'dest = "/usr/local/bin/raftd"\nmode = "0755"\n'
                    '[groups.all]\nprofile = "p"\n')
    result = bootserver("--config", str(path), "plan", "52:54:00:00:00:01", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# disk /dev/vda (wipe refused if it holds partitions):" in out
    assert "refusing to repartition /dev/vda" in out and "mkfs.ext4 -F -L nixos /dev/vda2" in out
    assert f"put {tmp_path}/files/raftd -> /mnt/usr/local/bin/raftd (mode 0755)" in out
    assert "refusing to repartition" not in bootserver("--config", str(path), "plan", "52:54:00:00:00:01",
                                                       "--wipe").stdout


def test_reprovision_marks_a_known_machine(config_file: Path, config):
    result = bootserver("--config", str(config_file), "reprovision", "52:54:00:00:00:01")
    assert result.returncode == 2 and "no machine 52:54:00:00:00:01" in result.stderr
    store = Store(config.server.database)
    store.record("52:54:00:00:00:01", "deployed", state="deployed")
    result = bootserver("--config", str(config_file), "reprovision", "525400000001")
    assert result.returncode == 0, result.stderr
    node = store.node("52:54:00:00:00:01")
    assert node.reprovision and node.state == "reprovision"
    store.close()


def test_show_prints_the_latest_boot_as_a_waterfall(config_file: Path, config):
    store = Store(config.server.database)
    record(store, "52:54:00:00:00:01", FULL_BOOT, 1_700_000_000.0)
    record(store, "52:54:00:00:00:01", failing_boot("step disk failed: \x1b[2Jno disk", at=9), 1_700_001_000.0)
    store.close()
    result = bootserver("--config", str(config_file), "show", "52:54:00:00:00:01")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("boot of ")))
    assert lines[start].endswith(": failed, 25.0 s")  # the newest boot, from its DHCP to its failure
    phases = lines[start + 1:]
    assert [line.split("|")[0].strip() for line in phases[:6]] == [LABELS[p] for p, _ in FULL_PHASES[:6]]
    assert phases[3].split("|")[2].strip() == "11.0 s  40.0 MiB at 6.7 MiB/s"  # kernel: its files' bytes and rate
    assert "x" in phases[5].split("|")[1]  # the failed phase's bar
    replaced = "\N{REPLACEMENT CHARACTER}"
    assert phases[6].strip() == f"failed here: step disk failed: {replaced}[2Jno disk"  # no escape reaches the terminal


def test_nodes_stuck_lists_the_machines_in_a_phase_too_long(config_file: Path, config):
    store = Store(config.server.database)
    for i in range(5):
        record(store, f"52:54:00:00:01:{i:02x}", FULL_BOOT, 1_700_000_000.0)
    result = bootserver("--config", str(config_file), "nodes", "--stuck")
    assert result.returncode == 0 and "no machine is stuck" in result.stdout
    record(store, "52:54:00:00:02:01", FULL_BOOT[:11], 1_700_000_000.0)  # in its OS install ever since
    store.close()
    result = bootserver("--config", str(config_file), "nodes", "--stuck")
    assert result.returncode == 1, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["MAC", "HOSTNAME", "PHASE", "IN", "IT", "FOR", "P90", "x", "3"]
    assert row.split()[:4] == ["52:54:00:00:02:01", "node-525400000201", "OS", "install"]
    assert row.endswith("3 min 0 s")  # the install took every other machine 60 s
