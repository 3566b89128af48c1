"""Provisioning over real SSH (tests/support/sshd.py on 127.0.0.1): commands and SFTP do real work in temp dirs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import jinja2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from support.csr import forged_request
from support.require import require, require_root
from support.sshd import TestSSHServer, ssh_server
from support.wait import until_async

from bootserver.config import DeployFile, Deployment, DiskLayout, Partition, Unit
from bootserver.config.deploy import deployment_from_toml
from bootserver.errors import BootserverError, ConfigError
from bootserver.provision import deploy as deploy_module
from bootserver.provision import steps
from bootserver.provision.deploy import DeployError, deploy
from bootserver.provision.pki import ServerKeys
from bootserver.provision.ssh import HostKeyMismatch, NodeAccess, NodeLost, StepFailed, session
from bootserver.provision.steps import Job, provision


class Events(list):
    """What `record` was told, in order."""

    def __call__(self, kind: str, detail: dict[str, Any]) -> None:
        self.append((kind, detail))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [detail for k, detail in self if k == kind]


def render(source: Path, context: dict[str, Any]) -> str:
    """What the caller passes in: jinja2 with StrictUndefined, so a missing variable is an error."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(source.parent), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template(source.name).render(context)


@pytest.fixture
def keys(tmp_path: Path) -> ServerKeys:
    return ServerKeys.load_or_create(tmp_path / "keys")


@pytest.fixture
async def sshd(keys: ServerKeys) -> AsyncIterator[TestSSHServer]:
    async with ssh_server(keys.ssh_public) as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    (data / "templates").mkdir()
    (data / "units").mkdir()
    (data / "files/raftd").write_bytes(b"#!/bin/sh\necho raftd\n" + bytes(range(256)) * 4096)  # 1 MiB, binary
    (data / "templates/raft.toml.j2").write_text(
        'name = "{{ hostname }}"\npeers = [{% for p in peers %}"{{ p }}", {% endfor %}]\n')
    (data / "templates/broken.j2").write_text("x = {{ no_such_variable }}\n")
    (data / "units/raftd.service").write_text(
        "[Unit]\nDescription=raft\n\n[Service]\nExecStart=/usr/local/bin/raftd\n\n"
        "[Install]\n# a comment\nWantedBy=multi-user.target\nWantedBy=graphical.target \\\n  extra.target\n"
        "Alias=raft.service\n")
    (data / "units/helper.service").write_text("[Service]\nExecStart=/bin/true\n")
    return data


def access(server: TestSSHServer, host_key: str | None = None) -> NodeAccess:
    return NodeAccess("127.0.0.1", server.port, host_key or server.host_key_line)


def job(server: TestSSHServer, *, disk: DiskLayout | None = None, deployment: Deployment | None = None,
        host_key: str | None = None, context: dict[str, Any] | None = None) -> Job:
    return Job(mac="52:54:00:12:34:56", access=access(server, host_key), hostname="node1", ips=("127.0.0.1",),
               disk=disk, wipe=False, deployment=deployment, context=context or {})


# --- deploy onto a mounted target ---------------------------------------------------------------

async def test_deploy_files_templates_tls_units_and_check(sshd, keys, data_dir, tmp_path):
    target = tmp_path / "mnt"
    deployment = Deployment(
        files=(DeployFile(data_dir / "files/raftd", "/usr/local/bin/raftd", 0o755),),
        templates=(DeployFile(data_dir / "templates/raft.toml.j2", "/etc/raft/raft.toml", 0o640),),
        tls_dir="/etc/raft/tls",
        units=(Unit(data_dir / "units/raftd.service"), Unit(data_dir / "units/helper.service", enable=False)),
        check='test -x "$TARGET/usr/local/bin/raftd" && echo "$TARGET" > "$TARGET/checked"',
    )
    events = Events()
    async with session(access(sshd), keys, events) as runner:
        await deploy(runner, deployment, target=str(target), context={"hostname": "node1", "peers": ["a", "b"]},
                     sign=lambda csr: keys.sign(csr, "node1", ["127.0.0.1"]), render=render)

    binary = target / "usr/local/bin/raftd"
    assert binary.read_bytes() == (data_dir / "files/raftd").read_bytes()
    assert _mode(binary) == 0o755
    config = target / "etc/raft/raft.toml"
    assert config.read_text() == 'name = "node1"\npeers = ["a", "b", ]\n'
    assert _mode(config) == 0o640
    assert not list(target.rglob(".*.bootserver-tmp"))  # every temporary name was renamed into place

    tls = target / "etc/raft/tls"
    assert {p.name: _mode(p) for p in tls.iterdir()} == {"node.crt": 0o644, "node.key": 0o600, "ca.crt": 0o644}
    assert (tls / "ca.crt").read_bytes() == keys.ca_pem
    _assert_chains(tls / "node.crt", keys.ca_pem)
    assert _public_key(tls / "node.key") == _certificate(tls / "node.crt").public_key()

    system = target / "etc/systemd/system"
    assert (system / "raftd.service").read_bytes() == (data_dir / "units/raftd.service").read_bytes()
    assert (system / "helper.service").is_file()  # installed, not enabled
    for link in ("multi-user.target.wants/raftd.service", "graphical.target.wants/raftd.service",
                 "extra.target.wants/raftd.service", "raft.service"):
        assert os.readlink(system / link) == "/etc/systemd/system/raftd.service", link  # absolute, as systemctl
    assert not list(system.glob("*.wants/helper.service"))

    assert (target / "checked").read_text() == f"{target}\n"
    assert any("TARGET=" in c["command"] and c["exit_status"] == 0 for c in events.of("command"))


async def test_deploy_twice_replaces_everything(sshd, keys, data_dir, tmp_path):
    """A retry after a failure must not trip over what the first attempt left."""
    target = str(tmp_path / "mnt")
    deployment = Deployment(files=(DeployFile(data_dir / "files/raftd", "/bin/raftd", 0o700),),
                            units=(Unit(data_dir / "units/raftd.service"),))
    async with session(access(sshd), keys, Events()) as runner:
        for _ in range(2):
            await deploy(runner, deployment, target=target, context={}, sign=None, render=render)
    assert _mode(tmp_path / "mnt/bin/raftd") == 0o700


async def test_unit_without_install_section_cannot_be_enabled(sshd, keys, data_dir, tmp_path):
    deployment = Deployment(units=(Unit(data_dir / "units/helper.service", enable=True),))
    async with session(access(sshd), keys, Events()) as runner:
        with pytest.raises(DeployError, match=r"helper\.service has enable = true but no WantedBy=.*\[Install\]"):
            await deploy(runner, deployment, target=str(tmp_path / "mnt"), context={}, sign=None, render=render)


async def test_undefined_template_variable_fails_the_step_naming_both(sshd, keys, data_dir, tmp_path):
    # Target "/" with an absolute temporary dest: what a diskless node gets, without touching our own /etc.
    dest = str(tmp_path / "etc/broken.conf")
    deployment = Deployment(templates=(DeployFile(data_dir / "templates/broken.j2", dest),))
    events = Events()
    with pytest.raises(StepFailed) as failed:
        await provision(job(sshd, deployment=deployment, context={"hostname": "node1"}), keys, events,
                        render=render, reboot=False)
    message = str(failed.value)
    assert "broken.j2" in message and "no_such_variable" in message and "hostname" in message
    assert failed.value.step == "deploy"
    assert events.kinds() == ["step-started", "step-failed"]
    assert "no_such_variable" in events.of("step-failed")[0]["error"]
    assert not Path(dest).exists()


async def test_failing_check_fails_the_step(sshd, keys, data_dir, tmp_path):
    deployment = Deployment(check='echo "raftd is not there in $TARGET" >&2; exit 4')
    events = Events()
    with pytest.raises(StepFailed, match=r"exited with status 4: raftd is not there in /"):
        await provision(job(sshd, deployment=deployment), keys, events, render=render, reboot=False)


class CommandLog:
    """A stand-in Runner for what must not run on this machine: systemctl on our own root."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def run(self, step: str, command: str, **_: Any) -> str:
        self.commands.append(command)
        return ""


async def test_units_on_a_running_system_are_enabled_by_its_systemd(data_dir):
    runner = CommandLog()
    units = (Unit(data_dir / "units/raftd.service"), Unit(data_dir / "units/helper.service", enable=False))
    await deploy_module._enable_live(runner, units)  # type: ignore[arg-type]
    assert runner.commands == ["systemctl daemon-reload", "systemctl enable --now raftd.service",
                               "systemctl is-active raftd.service"]


# --- TLS: the key is made on the node, the server signs its request ------------------------------

@pytest.fixture
def no_server_keygen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Key generation refused to bootserver's own code (asyncssh's key exchange may still make its
    ephemeral keys); returns where anything in bootserver tried."""
    tried: list[str] = []

    def guard(original: Any, name: str) -> Any:
        def generate(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("bootserver"):
                tried.append(f"{caller}: {name}")
                raise AssertionError(f"{caller} made a key pair ({name}) during provisioning")
            return original(*args, **kwargs)
        return generate

    monkeypatch.setattr(ec, "generate_private_key", guard(ec.generate_private_key, "ec"))
    monkeypatch.setattr(rsa, "generate_private_key", guard(rsa.generate_private_key, "rsa"))
    for cls in (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey):
        monkeypatch.setattr(cls, "generate", staticmethod(guard(cls.generate, cls.__name__)))
    return tried


@pytest.fixture
def sftp_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the server opens over SFTP."""
    paths: list[str] = []
    original = asyncssh.SFTPClient.open

    def spy(self: asyncssh.SFTPClient, path: Any, *args: Any, **kwargs: Any) -> Any:
        paths.append(path.decode() if isinstance(path, bytes) else str(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(asyncssh.SFTPClient, "open", spy)
    return paths


def fake_openssl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, req: str) -> None:
    """Put an `openssl` first on the PATH of the node's commands (the test sshd runs them with ours):
    the real one, except that `openssl req ...` runs `req` (shell) instead, with "$@" the arguments."""
    real = shutil.which("openssl")
    assert real is not None, "the tests need Debian's openssl on the host"
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "openssl"
    script.write_text(f'#!/bin/sh\nOPENSSL={real}\nif [ "$1" = req ]; then\n{req}\nfi\nexec {real} "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


async def test_tls_key_is_made_on_the_node_and_only_its_certificate_comes_back(
        sshd, keys, tmp_path, no_server_keygen, sftp_opens, monkeypatch):
    # No openssl configuration at all, as on the agent (which has no /usr/lib/ssl).
    monkeypatch.setenv("OPENSSL_CONF", str(tmp_path / "no-such-openssl.cnf"))
    tls = tmp_path / "node/etc/raft/tls"
    events = Events()
    await provision(job(sshd, deployment=Deployment(tls_dir=str(tls))), keys, events, render=render, reboot=False)

    assert events.kinds() == ["step-started", "command", "certificate-issued", "command", "step-done",
                              "step-started", "command", "step-done"]
    assert {p.name: _mode(p) for p in tls.iterdir()} == {"node.crt": 0o644, "node.key": 0o600, "ca.crt": 0o644}
    key = serialization.load_pem_private_key((tls / "node.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = _certificate(tls / "node.crt")
    assert cert.public_key() == key.public_key()  # certified: the key the node made
    _assert_chains(tls / "node.crt", keys.ca_pem)

    # The server never had the key: it made none, read none over SFTP, and none came back on any channel.
    assert no_server_keygen == []
    assert not [p for p in sftp_opens if p.endswith("node.key") or "node.key." in p], sftp_opens
    assert "openssl genpkey" in events.of("command")[0]["command"]
    key_text = (tls / "node.key").read_text()
    everything = json.dumps(list(events)) + "".join(sshd.commands)
    assert "PRIVATE KEY" not in everything and key_text.splitlines()[1] not in everything

    (issued,) = events.of("certificate-issued")
    assert issued == {"serial": f"{cert.serial_number:x}", "sans": ["node1", "127.0.0.1"],
                      "not_before": cert.not_valid_before_utc.isoformat(),
                      "not_after": cert.not_valid_after_utc.isoformat(),
                      "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex()}


async def test_a_new_key_every_time(sshd, keys, tmp_path):
    tls = tmp_path / "node/tls"
    deployment = Deployment(tls_dir=str(tls))
    first = None
    for _ in range(2):
        await provision(job(sshd, deployment=deployment), keys, Events(), render=render, reboot=False)
        key = (tls / "node.key").read_bytes()
        assert key != first and _mode(tls / "node.key") == 0o600
        assert _public_key(tls / "node.key") == _certificate(tls / "node.crt").public_key()
        first = key


async def test_names_the_node_asks_for_are_not_certified(sshd, keys, tmp_path, monkeypatch):
    """A node asking for another host's name and address gets a certificate for its own, chosen by the server."""
    fake_openssl(tmp_path, monkeypatch, 'exec "$OPENSSL" "$@" -subj /CN=other.example '
                                        '-addext "subjectAltName=DNS:other.example,IP:10.9.9.9"')
    tls = tmp_path / "node/tls"
    events = Events()
    await provision(job(sshd, deployment=Deployment(tls_dir=str(tls))), keys, events, render=render, reboot=False)

    asked = x509.load_pem_x509_csr(events.of("command")[0]["stdout_tail"].encode())  # what the node sent
    assert asked.subject.rfc4514_string() == "CN=other.example"
    asked_san = asked.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert asked_san.get_values_for_type(x509.DNSName) == ["other.example"]
    cert = _certificate(tls / "node.crt")
    assert cert.subject.rfc4514_string() == "CN=node1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(name.value) for name in san] == ["node1", "127.0.0.1"]
    assert events.of("certificate-issued")[0]["sans"] == ["node1", "127.0.0.1"]


async def test_request_with_a_bad_signature_fails_the_step(sshd, keys, tmp_path, monkeypatch):
    forged = tmp_path / "forged.csr"
    forged.write_bytes(forged_request())
    fake_openssl(tmp_path, monkeypatch, f"cat {forged}; exit 0")
    tls = tmp_path / "node/tls"
    events = Events()
    with pytest.raises(StepFailed) as failed:
        await provision(job(sshd, deployment=Deployment(tls_dir=str(tls))), keys, events, render=render,
                        reboot=False)
    assert failed.value.step == "deploy"
    assert "certificate request from node1 has a signature that does not verify" in str(failed.value)
    assert str(failed.value).startswith("deploy: TLS certificate for ")
    assert "certificate-issued" not in events.kinds()
    assert events.kinds()[-1] == "step-failed"
    assert list(tls.iterdir()) == []  # no certificate, and the unsigned key was removed


async def test_node_that_prints_no_request_fails_the_step(sshd, keys, tmp_path, monkeypatch):
    fake_openssl(tmp_path, monkeypatch, "echo 'req: unable to load config' >&2; exit 0")
    with pytest.raises(StepFailed, match="the node printed no certificate request"):
        await provision(job(sshd, deployment=Deployment(tls_dir=str(tmp_path / "tls"))), keys, Events(),
                        render=render, reboot=False)


async def test_node_without_openssl_fails_the_step_saying_so(sshd, keys, tmp_path, monkeypatch):
    fake_openssl(tmp_path, monkeypatch, "echo 'sh: openssl: not found' >&2; exit 127")
    with pytest.raises(StepFailed, match="exited with status 127: sh: openssl: not found") as failed:
        await provision(job(sshd, deployment=Deployment(tls_dir=str(tmp_path / "tls"))), keys, Events(),
                        render=render, reboot=False)
    assert "openssl req" in (failed.value.command or "")


# --- commands, events, failures -----------------------------------------------------------------

async def test_events_of_a_successful_run(keys, data_dir, tmp_path):
    dest = tmp_path / "srv/raftd"
    deployment = Deployment(files=(DeployFile(data_dir / "files/raftd", str(dest), 0o755),),
                            check=f"test -x {dest}")
    events = Events()
    # The test server never runs a reboot; it drops the connection instead, as a rebooting node does.
    async with ssh_server(keys.ssh_public, drop_on="reboot -f") as server:
        await provision(job(server, deployment=deployment), keys, events, render=render, reboot=True)
        assert server.commands[-1].startswith("sync && ") and "reboot -f" in server.commands[-1]
    assert events.kinds() == ["step-started", "command", "step-done", "step-started", "command", "step-done"]
    assert [d["step"] for d in events.of("step-started")] == ["deploy", "finish"]
    check, finish = events.of("command")
    assert check == {"step": "deploy", "command": f"TARGET=/ sh -c 'test -x {dest}'", "exit_status": 0,
                     "seconds": check["seconds"], "stdout_tail": "", "stderr_tail": ""}
    assert finish["exit_status"] is None  # the connection dropped: a reboot, and that is success here
    assert dest.is_file()


async def test_command_failure_names_status_and_stderr(sshd, keys):
    events = Events()
    async with session(access(sshd), keys, events) as runner:
        with pytest.raises(StepFailed) as failed:
            await runner.run("disk", "echo progress; echo 'sfdisk: /dev/vda: device busy' >&2; exit 7")
    assert failed.value.exit_status == 7
    assert "exited with status 7: sfdisk: /dev/vda: device busy" in str(failed.value)
    (command,) = events.of("command")
    assert command["exit_status"] == 7 and command["stdout_tail"] == "progress\n"
    assert command["stderr_tail"] == "sfdisk: /dev/vda: device busy\n"


async def test_command_failure_inside_provision_records_step_failed(sshd, keys):
    events = Events()
    deployment = Deployment(check="echo 'no space left on device' >&2; exit 28")
    with pytest.raises(StepFailed):
        await provision(job(sshd, deployment=deployment), keys, events, render=render, reboot=False)
    assert events.kinds() == ["step-started", "command", "step-failed"]
    (failed,) = events.of("step-failed")
    assert failed["step"] == "deploy" and failed["exit_status"] == 28
    assert failed["stderr_tail"] == "no space left on device\n"
    assert "exited with status 28: no space left on device" in failed["error"]
    assert "finish" not in [d["step"] for d in events.of("step-started")]  # no reboot after a failure


async def test_input_and_timeout(sshd, keys, tmp_path):
    pidfile = tmp_path / "sleep.pid"
    async with session(access(sshd), keys, Events()) as runner:
        assert await runner.run("disk", "cat", input="label: gpt\n") == "label: gpt\n"
        assert await runner.run("disk", "cat") == ""  # stdin is at EOF without input: nothing waits for it
        started = time.monotonic()
        with pytest.raises(StepFailed, match=r"did not finish within 0.5 s"):
            await runner.run("disk", f"sleep 30 & echo $! > {pidfile}; wait", timeout=0.5)
        assert time.monotonic() - started < 5
    # The timed-out command was killed on the node, not left running behind a closed channel.
    pid = int(pidfile.read_text())
    await until_async(lambda: not _running(pid), 2.5, what=f"the timed-out command (pid {pid}) to end")


async def test_host_key_mismatch_runs_nothing(sshd, keys):
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    events = Events()
    with pytest.raises(HostKeyMismatch, match=rf"host key of 127.0.0.1:{sshd.port} does not match the key pinned"):
        await provision(job(sshd, deployment=Deployment(check="true"), host_key=impostor), keys, events,
                        render=render, reboot=False)
    assert events.kinds() == ["host-key-mismatch"]
    assert sshd.commands == []


async def test_pinned_key_of_another_type_is_a_mismatch_too(sshd, keys):
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key().decode()
    events = Events()
    with pytest.raises(HostKeyMismatch):
        await provision(job(sshd, host_key=rsa), keys, events, render=render, reboot=False)
    assert events.kinds() == ["host-key-mismatch"]
    assert sshd.commands == []


async def test_garbage_pinned_key_is_refused_before_connecting(sshd, keys):
    with pytest.raises(BootserverError, match="not an OpenSSH public key line"):
        await provision(job(sshd, host_key="ssh-ed25519 AAAA\n@cert-authority * ssh-ed25519 AAAA"), keys,
                        Events(), render=render, reboot=False)
    assert sshd.commands == []


async def test_unreachable_node(keys):
    free = _free_port()
    events = Events()
    node = NodeAccess("127.0.0.1", free, asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode())
    with pytest.raises(NodeLost, match=f"cannot reach 127.0.0.1:{free}"):
        async with session(node, keys, events, connect_timeout=5):
            pass
    assert events.kinds() == ["connect-failed"]


async def test_node_that_stops_answering_is_lost_within_keepalive_time(keys):
    events = Events()
    deployment = Deployment(check="echo HANG")
    async with ssh_server(keys.ssh_public, hang_on="HANG") as server:
        started = time.monotonic()
        with pytest.raises(NodeLost, match="connection lost: .*keepalive"):
            await asyncio.wait_for(
                provision(job(server, deployment=deployment), keys, events, render=render, reboot=False,
                          keepalive_interval=0.5, keepalive_count_max=2),
                timeout=20)
        elapsed = time.monotonic() - started
    assert elapsed < 5  # ~interval * (count_max + 1), not command_timeout's 600 s
    assert events.kinds() == ["step-started", "command", "step-failed"]
    (failed,) = events.of("step-failed")
    assert failed["step"] == "deploy" and failed["error"].startswith("connection lost: ")


async def test_node_that_drops_mid_step_is_lost(keys, data_dir, tmp_path):
    events = Events()
    deployment = Deployment(files=(DeployFile(data_dir / "files/raftd", str(tmp_path / "raftd")),),
                            check="echo DROP")
    async with ssh_server(keys.ssh_public, drop_on="DROP") as server:
        with pytest.raises(NodeLost, match="connection lost"):
            await provision(job(server, deployment=deployment), keys, events, render=render, reboot=False)
    assert events.kinds() == ["step-started", "command", "step-failed"]


# --- the disk step, on a real loop device -------------------------------------------------------

@pytest.fixture
def loop_device(tmp_path: Path) -> Any:
    require_root("the disk step runs on a real loop device")
    require("losetup")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(128 * 1024 * 1024)  # sparse
    device = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["umount", "-R", str(tmp_path / "mnt")], capture_output=True)
        subprocess.run(["umount", str(tmp_path / "check")], capture_output=True)
        subprocess.run(["losetup", "-d", device], check=True)


async def test_disk_step_partitions_formats_mounts_and_deploys(sshd, keys, data_dir, tmp_path, loop_device):
    # The ESP is formatted but not mounted: the test kernel may have no vfat (this one has not).
    layout = DiskLayout(loop_device, (Partition("ESP", "64MiB", "esp", "vfat"),
                                      Partition("var", "24MiB", "linux", "ext4", "/var"),
                                      Partition("root", "rest", "linux", "ext4", "/")))
    deployment = Deployment(files=(DeployFile(data_dir / "files/raftd", "/usr/local/bin/raftd", 0o755),),
                            check='mountpoint -q "$TARGET" && mountpoint -q "$TARGET/var"')
    events = Events()
    target = tmp_path / "mnt"
    await provision(job(sshd, disk=layout, deployment=deployment), keys, events, render=render, reboot=False,
                    target_root=str(target))

    assert [d["step"] for d in events.of("step-done")] == ["disk", "deploy", "finish"]
    assert any(c["command"].startswith("sfdisk") or "| sfdisk" in c["command"] for c in events.of("command"))
    assert not os.path.ismount(target)  # finish unmounted it

    table = json.loads(subprocess.run(["sfdisk", "--json", loop_device], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    esp, var, root = table["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and esp["name"] == "ESP"
    assert esp["size"] * 512 == 64 * 1024 * 1024
    assert var["type"] == root["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    assert (var["name"], root["name"]) == ("var", "root")
    assert _blkid(esp["node"]) == {"TYPE": "vfat", "LABEL": "ESP"}
    assert _blkid(var["node"]) == {"TYPE": "ext4", "LABEL": "var"}
    assert _blkid(root["node"]) == {"TYPE": "ext4", "LABEL": "root"}

    # The file went onto the new root filesystem, not into the directory beneath the mount point.
    check = tmp_path / "check"
    check.mkdir()
    subprocess.run(["mount", "-o", "ro", root["node"], str(check)], check=True)
    try:
        assert (check / "usr/local/bin/raftd").read_bytes() == (data_dir / "files/raftd").read_bytes()
    finally:
        subprocess.run(["umount", str(check)], check=True)
    assert not (target / "usr").exists()


async def test_disk_step_refuses_a_disk_with_partitions_without_wipe(sshd, keys, tmp_path, loop_device):
    subprocess.run(["sfdisk", loop_device], input="label: gpt\n,\n", text=True, check=True, capture_output=True)
    layout = DiskLayout(loop_device, (Partition("root", "rest", "linux", "ext4", "/"),))
    events = Events()
    with pytest.raises(StepFailed, match="refusing to repartition .* holds partitions"):
        await provision(job(sshd, disk=layout), keys, events, render=render, reboot=False,
                        target_root=str(tmp_path / "mnt"))
    assert events.kinds() == ["step-started", "command", "step-failed"]
    assert events.of("step-failed")[0]["step"] == "disk"


# --- deployment_from_toml -----------------------------------------------------------------------

def test_deployment_from_toml(data_dir):
    raw = {
        "check": "test -x $TARGET/usr/local/bin/raftd",
        "files": [{"source": "files/raftd", "dest": "/usr/local/bin/raftd", "mode": "0755"}],
        "templates": [{"source": str(data_dir / "templates/raft.toml.j2"), "dest": "/etc/raft/raft.toml"}],
        "tls": {"dir": "/etc/raft/tls/"},
        "units": [{"source": "units/raftd.service"}, {"source": "units/helper.service", "enable": False}],
    }
    deployment = deployment_from_toml(raw, "config: [profiles.raft.deploy]", data_dir)
    assert deployment == Deployment(
        files=(DeployFile(data_dir / "files/raftd", "/usr/local/bin/raftd", 0o755),),
        templates=(DeployFile(data_dir / "templates/raft.toml.j2", "/etc/raft/raft.toml", 0o644),),
        tls_dir="/etc/raft/tls",
        units=(Unit(data_dir / "units/raftd.service", True), Unit(data_dir / "units/helper.service", False)),
        check="test -x $TARGET/usr/local/bin/raftd",
    )
    assert deployment_from_toml({}, "here", data_dir) == Deployment()


FILE = {"source": "files/raftd", "dest": "/usr/local/bin/raftd"}


@pytest.mark.parametrize(("raw", "message"), [
    ({"file": []}, r"deploy\]: unknown key 'file'"),
    ({"files": [{**FILE, "owner": "root"}]}, r"files\[0\]: unknown key 'owner'"),
    ({"files": [{"dest": "/x"}]}, r"files\[0\]: missing key 'source'"),
    ({"files": [{"source": "files/raftd"}]}, r"files\[0\]: missing key 'dest'"),
    ({"files": [{**FILE, "dest": "usr/bin/raftd"}]}, r"files\[0\] dest: 'usr/bin/raftd' must be an absolute path"),
    ({"files": [{**FILE, "dest": "/../etc/shadow"}]}, r"files\[0\] dest: .* without '\.\.'"),
    ({"files": [{**FILE, "mode": "rwxr-xr-x"}]}, r"files\[0\] mode: expected an octal mode .*\"0755\""),
    ({"files": [{**FILE, "mode": "0789"}]}, r"files\[0\] mode: expected an octal mode"),
    ({"files": [{**FILE, "mode": 755}]}, r"files\[0\] mode: expected an octal mode as a string"),
    ({"files": [{**FILE, "source": "files/nope"}]}, r"files\[0\] source: .*/data/files/nope does not exist"),
    ({"files": {"source": "x"}}, r"files: expected an array of tables"),
    ({"templates": [{"source": "templates/nope.j2", "dest": "/x"}]}, r"templates\[0\] source: .*nope.j2 does not"),
    ({"tls": {"directory": "/etc/tls"}}, r"tls: unknown key 'directory'"),
    ({"tls": {"dir": "etc/tls"}}, r"tls dir: 'etc/tls' must be an absolute path"),
    ({"tls": {}}, r"tls: missing key 'dir'"),
    ({"units": [{"source": "files/raftd"}]}, r"units\[0\] source: 'raftd' is not a systemd unit name.*\.service"),
    ({"units": [{"source": "units/raftd.service", "enable": "yes"}]}, r"units\[0\] enable: expected true or false"),
    ({"units": [{"source": "units/raftd.service", "dest": "/x"}]}, r"units\[0\]: unknown key 'dest'"),
    ({"check": 3}, r"check: expected a shell command"),
])
def test_deployment_from_toml_refusals(data_dir, raw, message):
    with pytest.raises(ConfigError, match=message):
        deployment_from_toml(raw, "config: [profiles.raft.deploy]", data_dir)


def test_install_links_parse_like_systemd():
    text = ("[Unit]\nWantedBy=ignored.target\n[Install]\nWantedBy=a.target b.target\nWantedBy=c.target\n"
            "RequiredBy=d.target\nAlias=x.service\n; comment\n")
    assert deploy_module.install_links("u.service", text) == [
        "/etc/systemd/system/a.target.wants/u.service", "/etc/systemd/system/b.target.wants/u.service",
        "/etc/systemd/system/c.target.wants/u.service", "/etc/systemd/system/d.target.requires/u.service",
        "/etc/systemd/system/x.service",
    ]
    # An empty assignment resets the list, as in systemd.
    assert deploy_module.install_links("u.service", "[Install]\nWantedBy=a.target\nWantedBy=\n") == []


# --- helpers ------------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_chains(cert_path: Path, ca_pem: bytes) -> None:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert cert.issuer == ca.subject
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)  # raises unless ca's key signed it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1"]


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _public_key(key_path: Path) -> Any:
    return serialization.load_pem_private_key(key_path.read_bytes(), None).public_key()


def _blkid(node: str) -> dict[str, str]:
    out = subprocess.run(["blkid", "-o", "export", "-s", "TYPE", "-s", "LABEL", node], check=True,
                         capture_output=True, text=True).stdout
    fields = dict(line.split("=", 1) for line in out.split())
    fields.pop("DEVNAME", None)  # -o export always names the device
    return fields


def _running(pid: int) -> bool:
    """Whether `pid` is alive; a zombie waiting for its (re)parent to reap it is not."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_disk_that_will_not_unmount_fails_the_finish_step(sshd, keys, tmp_path):
    """busybox umount has no -R, and a `;` chain rebooted anyway: each mount is unmounted deepest first, and
    the first that stays fails the step before any reboot."""
    target, inner = tmp_path / "mnt", tmp_path / "mnt/boot/efi"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    busy = subprocess.Popen(["sleep", "30"], cwd=target)  # holds the outer mount
    try:
        events = Events()
        async with session(access(sshd), keys, events) as runner:
            with pytest.raises(StepFailed, match="busy"):
                await steps._finish(runner, str(target), reboot=False)
        assert not os.path.ismount(inner) and os.path.ismount(target)  # deepest first, then stopped
    finally:
        busy.kill()
        busy.wait()
        subprocess.run(["umount", "-R", str(target)], capture_output=True)


async def test_disk_step_refuses_a_disk_smaller_than_the_layout_before_writing(sshd, keys, tmp_path, loop_device):
    layout = DiskLayout(loop_device, (Partition("ESP", "64MiB", "esp", "vfat"),
                                      Partition("root", "80MiB", "linux", "ext4", "/")))  # 146 MiB on 128 MiB
    events = Events()
    with pytest.raises(StepFailed, match="the layout needs at least 146 MiB and the disk holds only 128 MiB"):
        await provision(job(sshd, disk=layout), keys, events, render=render, reboot=False,
                        target_root=str(tmp_path / "mnt"))
    assert events.of("step-failed")[0]["step"] == "disk"
    assert not any("sfdisk" in c["command"] and "label" in c["command"] for c in events.of("command"))
