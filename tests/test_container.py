"""The container image, used for real: `./setup container` builds it with podman, and the README's `podman run`
line serves a whole boot from it.

The container runs on the host network of a lab namespace of the test's own (tests/support/lab.py: its VDE switch,
its tap 10.100.0.1): podman is started inside that namespace (nsenter --net, which unlike `ip netns exec` leaves
/sys and with it the cgroup mounts alone), so `--network host` is the namespace's network, as it would be a
machine's. A SeaBIOS VM with the iPXE ROM on the switch gets its address and bootstrap from the container's DHCP,
the agent image over HTTP, and phones home to it. Then the container is removed and a new one made on the same
volume: the machine, its history (the server's stop marked its boot interrupted, as any stop does) and the
server's secrets are still there.

Needs root, podman and runc (./setup's CONTAINER_APT; mmdebstrap too where no registry gives the base image), and
what the lab needs; a missing one fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.lab import MAC, api, lab_for_test, report, wait_phoned_home
from support.require import require, require_root

from bootserver.tools.image import AgentImage
from bootserver.tools.lab import Lab

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parent.parent


def setup_array(name: str) -> list[str]:
    """A bash array of ./setup, as words."""
    return shlex.split(re.search(rf"^{name}=\((.*)\)$", (ROOT / "setup").read_text(), re.M)[1])


# what podman needs on hosts like CI's (./setup says why), as ./setup passes it
PODMAN, LIMITS = setup_array("PODMAN"), setup_array("PODMAN_LIMITS")
VOLUME = "/var/lib/bootserver"
AGENT = "/srv/agent"  # where the test mounts the agent image: a real install builds it into the volume


def readme_podman_run() -> list[str]:
    """The README's `podman run` line for the server, as words."""
    lines = re.findall(r"^(podman run .*)$", (ROOT / "README.md").read_text(), re.M)
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


@pytest.fixture
def build_seconds() -> float:
    """`./setup container`, as the README says: the seconds it took to build localhost/bootserver:latest."""
    require_root("podman builds and runs the image as root here")
    require("podman", "runc", "nsenter")
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "setup"), "container"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return time.monotonic() - started


def podman(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman, inside the lab's network namespace if given."""
    enter = ["nsenter", f"--net=/run/netns/{namespace}"] if namespace else []
    result = subprocess.run([*enter, *PODMAN, *args], capture_output=True, text=True, timeout=120)
    assert not check or result.returncode == 0, f"podman {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


@contextlib.contextmanager
def container(lab: Lab, name: str, volume: str, config: Path, agent_dir: Path) -> Iterator[str]:
    """The README's `podman run` in the lab's namespace, with the lab's config and the agent image mounted; its
    output goes to the lab's server.log (what report() shows) when it is removed."""
    words = readme_podman_run()
    words[words.index("--name") + 1] = name
    words = [f"{volume}:{w.split(':', 1)[1]}" if w.endswith(f":{VOLUME}") else w for w in words]
    mounts = ["-v", f"{config}:/etc/bootserver/bootserver.toml:ro", "-v", f"{agent_dir}:{AGENT}:ro"]
    podman("run", *LIMITS, *mounts, *words[2:], namespace=lab.namespace)
    try:
        deadline = time.monotonic() + 30
        while "serving HTTP on" not in (logs := output(name)):
            assert time.monotonic() < deadline, f"the container does not serve:\n{logs[-3000:]}"
            time.sleep(0.5)
        yield name
    finally:
        with (lab.dir / "server.log").open("a") as log:
            log.write(output(name))
        podman("rm", "--force", name, check=False)


def output(name: str) -> str:
    logs = podman("logs", name, check=False)
    return logs.stdout + logs.stderr


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"bootserver-test-{os.getpid()}"
    yield name
    podman("volume", "rm", "--force", name, check=False)


async def test_the_image_serves_a_vms_boot_and_keeps_its_state_in_the_volume(build_seconds: float, volume: str,
                                                                             agent_image: AgentImage, tmp_path: Path,
                                                                             timing) -> None:
    timing("./setup container (podman build of the Dockerfile)", build_seconds)
    with lab_for_test(tmp_path) as lab:
        config = container_config(lab, agent_image)
        name = f"bootserver-test-{os.getpid()}"
        with container(lab, name, volume, config, agent_image.kernel.parent):
            podman("healthcheck", "run", name, namespace=lab.namespace)  # exit 0: healthy (and prints nothing)
            assert podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip() == "healthy"
            top = podman("top", name, "user", "capeff", "capbnd").stdout.splitlines()[1].split()
            assert top == ["bootserver", "NET_BIND_SERVICE", "NET_BIND_SERVICE"], top  # non-root, one capability
            started = time.monotonic()
            lab.start_vm(1)
            took = await wait_phoned_home(lab, 1, started)
            timing("the container on a lab namespace's host network, BIOS VM over VDE: QEMU start to phone-home",
                   took)
            before = api(lab, MAC)
            token = podman("exec", name, "cat", f"{VOLUME}/api_token").stdout
            assert "transfers in the C loop" in output(name)  # the engine stage's library, found by the wheel's code
        assert api(lab, MAC) == {}, "the container is gone: nothing answers"

        with container(lab, name, volume, config, agent_image.kernel.parent):  # a new one on the same volume
            after = api(lab, MAC)
            kinds = [event["kind"] for event in after.get("events", [])]
            assert kinds[:len(before["events"])] == [event["kind"] for event in before["events"]], report(lab)
            assert "phoned-home" in kinds and after["host_key_fingerprint"] == before["host_key_fingerprint"]
            assert podman("exec", name, "cat", f"{VOLUME}/api_token").stdout == token  # and the server's secrets


def container_config(lab: Lab, agent_image: AgentImage) -> Path:
    """The lab's config (full DHCP on its tap, the agent image for every machine) as the container sees it: its
    data in the volume, the agent image where the test mounts it."""
    image_dir = agent_image.kernel.parent
    text = lab.write_config(image_dir, machines=0, provision=False).read_text()
    config = lab.dir / "container.toml"
    config.write_text(text.replace(str(lab.data_dir), VOLUME).replace(str(image_dir), AGENT))
    config.chmod(0o644)
    return config
