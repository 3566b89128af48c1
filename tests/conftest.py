"""Shared fixtures: a config on a temporary data directory, with small real files as assets."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from support.postgres import PostgresServer

from bootserver import config as configuration
from bootserver.app import init_app, running
from bootserver.booter import Booter
from bootserver.provision.pki import ServerKeys
from bootserver.store import Store
from bootserver.templates import Templates

EXAMPLE_TOML = """
[server]
http = "127.0.0.1:0"
tftp = "127.0.0.1:0"
data_dir = "{data_dir}"
workers = 1  # one process: the tests read the store the server writes through (test_workers.py runs several)

[assets]
vmlinuz = "images/vmlinuz"
initrd = "images/initrd.img"
raft-initrd = "images/raft.img"

[profiles.discovery]
kernel = "vmlinuz"
initrd = ["initrd"]
cmdline = "console=ttyS0 quiet"

[profiles.raft]
kernel = "vmlinuz"
initrd = ["initrd", "raft-initrd"]
cmdline = "console=ttyS0 hostname={{{{ hostname }}}}"

[profiles.disk]
template = "localdisk.ipxe.j2"

[groups.default]
profile = "discovery"

[groups.raft]
profile = "raft"
selector = {{ role = "raft" }}

[groups.raft-efi]
profile = "raft"
selector = {{ role = "raft", platform = "efi" }}

[groups.done]
profile = "disk"
selector = {{ mac = "52:54:00:00:00:99" }}

[machines."52:54:00:00:00:01"]
hostname = "node1"
labels = {{ role = "raft" }}

[machines."52-54-00-00-00-02"]
hostname = "node2"
labels = {{ role = "raft" }}
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"K" * 100_000 + b"kernel-end")
    (images / "initrd.img").write_bytes(b"I" * 50_000)
    (images / "raft.img").write_bytes(b"R" * 1000)
    return tmp_path / "data"


@pytest.fixture
def config_file(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "bootserver.toml"
    path.write_text(EXAMPLE_TOML.format(data_dir=data_dir))
    return path


@pytest.fixture
def config(config_file: Path) -> configuration.Config:
    return configuration.load(config_file)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (tests/support/postgres.py), started on first use, for the whole session."""
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, config: configuration.Config):
    """The store on each backend: every test using it (and the booter) runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        location = config.server.database
    else:
        location = request.getfixturevalue("postgres").new_database()
    store = Store(location, replica="test-replica")
    yield store
    store.close()


@pytest.fixture
async def app(config):
    # Machines reach this server as 127.0.0.1 in these tests; the VM tests use 10.0.2.2.
    server = dataclasses.replace(config.server, public_address="127.0.0.1")
    app = init_app(dataclasses.replace(config, server=server))
    async with running(app):
        yield app


@pytest.fixture
def keys(config: configuration.Config) -> ServerKeys:
    return ServerKeys.load_or_create(config.server.data_dir / "keys")


@pytest.fixture
def booter(config: configuration.Config, store: Store, keys: ServerKeys) -> Booter:
    return Booter(config, store, Templates(), keys)


# The VM tests of these modules are the second VM group: about half of the VM tests' time (CI of adbc15a).
SECOND_VM_GROUP = {"test_vm_vde.py", "test_vm_power.py", "test_vm_powercut.py", "test_vm_systemd.py"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`./setup test` runs two workers, --dist loadgroup) the real-firmware tests and the
    tests of the images run in two groups, each in one worker, one test after another: a booting VM keeps a core
    busy, so two cores run at most two VMs at once. One group alone left the other worker idle for two thirds of
    CI (its share done in 10 minutes, the VMs' in 30). The images are built into one cache directory under a
    lock (the agent_image and os_image fixtures)."""
    for item in items:
        if item.get_closest_marker("vm") or {"agent_image", "os_image"} & set(getattr(item, "fixturenames", ())):
            group = "vm2" if item.path.name in SECOND_VM_GROUP else "vm"
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI ($CI set, as every CI service does) a skipped test is a failed one: a test that needs a missing tool
    must say so, not pass for having proved nothing (tests/support/require.py fails such tests anywhere)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


_TIMINGS: list[tuple[str, str, float]] = []  # (test, what, seconds) of this session's real-firmware boots


@pytest.fixture
def timing(request):
    """Record a measured time of a VM test: printed as it happens, and written with the run's commit and command
    to benchmarks/results/vm-timings-latest.md when the session ends (the README quotes a committed copy)."""
    def record(what: str, seconds: float) -> None:
        print(f"{what}: {seconds:.1f} s")
        _TIMINGS.append((request.node.nodeid.split("@")[0], what, seconds))  # without xdist's "@vm" group
    return record


_RUN: dict[str, str] = {}  # the commit the session tests, taken at its start (a commit may land meanwhile)


def pytest_sessionstart(session):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    _RUN["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "unknown"
    _RUN["dirty"] = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()


def pytest_sessionfinish(session, exitstatus):
    if not _TIMINGS:
        return
    import platform
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    commit, dirty = _RUN.get("commit", "unknown"), _RUN.get("dirty")
    lines = [f"# VM test timings, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
             f"- command: `{' '.join(['python -m pytest', *sys.argv[1:]])}`",
             f"- machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}; QEMU TCG",
             f"- pytest exit status: {exitstatus}", "", "| test | what | seconds |", "| --- | --- | --- |"]
    lines += [f"| `{test}` | {what} | {seconds:.1f} |" for test, what, seconds in _TIMINGS]
    (root / "benchmarks" / "results" / "vm-timings-latest.md").write_text("\n".join(lines) + "\n")


# --- the agent image (tests/test_image.py, and VM tests that netboot it) ---------------------


@pytest.fixture(scope="session")
def agent_image():
    """The agent image, built once into $BOOTSERVER_TEST_IMAGE_DIR or ~/.cache/bootserver/test-image and rebuilt
    only when its sources change (tests/support/agent_image.py)."""
    from support.agent_image import agent_image_dir, build_test_agent_image
    from support.lock import exclusive

    with exclusive(agent_image_dir()):  # both workers may ask at once (two VM groups)
        return build_test_agent_image()


@pytest.fixture(scope="session")
def os_image():
    """The Debian OS image (`bootserver image os debian`), built once into $BOOTSERVER_TEST_OS_IMAGE_DIR or
    ~/.cache/bootserver/test-os-image and rebuilt only when its inputs change (tests/support/os_image.py)."""
    from support.lock import exclusive
    from support.os_image import build_test_os_image, os_image_dir

    with exclusive(os_image_dir()):
        return build_test_os_image()
