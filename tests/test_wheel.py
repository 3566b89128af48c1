"""The wheel as a user installs it: `python -m build` of this checkout, the wheel installed with its dependencies
into a fresh virtualenv (no editable install, no system site-packages, nothing of this checkout on sys.path), and
from there `bootserver image build` and `bootserver serve` on loopback, asked by a real HTTP client.

What only the wheel can get wrong: a template, agent script or page missing from the package data, a lookup that
finds a file in the checkout but not in site-packages, a version that differs between the files that state it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import libarchive
import pytest
from support.net import free_port
from support.serve import serving
from support.wait import until
from support.wheel import ROOT, Dists, build_dists, clean_env, install_wheel

import bootserver
from bootserver.overlay import OVERLAY_NAME

MAC = "52-54-00-00-00-01"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Dists, Path, float]:
    """The sdist and wheel, the venv's bin directory, and the seconds building and installing took."""
    started = time.monotonic()
    dists = build_dists(tmp_path_factory.mktemp("dist"))
    venv_bin = install_wheel(dists.wheel, tmp_path_factory.mktemp("wheel") / "venv")
    return dists, venv_bin, time.monotonic() - started


def installed_run(venv_bin: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv_bin / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          env=clean_env(), timeout=600)


def test_one_version_in_the_names_the_metadata_and_the_command(installed, tmp_path: Path, timing) -> None:
    dists, venv_bin, seconds = installed
    timing("python -m build, then the wheel and its dependencies into a fresh venv", seconds)
    version = bootserver.__version__  # the one place it is written (pyproject: [tool.hatch.version])
    assert dists.sdist.name == f"bootserver-{version}.tar.gz" and dists.wheel.name.startswith(f"bootserver-{version}-")
    with zipfile.ZipFile(dists.wheel) as wheel:
        metadata = wheel.read(f"bootserver-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    assert installed_run(venv_bin, "bootserver", "--version", cwd=tmp_path).stdout == f"bootserver {version}\n"


def test_the_wheel_holds_every_file_of_the_package(installed) -> None:
    """Every tracked file under bootserver/, ipxe/ and grub/ (force-included as bootserver/ipxe and /grub), and the
    TFTP loop compiled from bootserver/tftp/engine.c (hatch_build.py; CI has a C compiler), in a platform wheel."""
    dists, _, _ = installed
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "bootserver", "ipxe", "grub"], capture_output=True,
                             text=True, check=True).stdout.split()
    expected = {name if name.startswith("bootserver/") else f"bootserver/{name}" for name in tracked}
    expected.add("bootserver/tftp/_engine.so")
    assert dists.wheel.name.endswith("-py3-none-linux_x86_64.whl"), dists.wheel.name
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
    assert len(expected) > 100 and not expected - names, sorted(expected - names)


def test_the_installed_packages_lookups_find_their_files_in_the_venv(installed, tmp_path: Path) -> None:
    """The lookups the server and the image builds make, run by the installed package: each finds its files in the
    venv's site-packages (a checkout has them elsewhere: ipxe/ and grub/ beside the package)."""
    _, venv_bin, _ = installed
    probe = """if True:
        import json, bootserver
        from bootserver.templates import builtin_templates_dir
        from bootserver.tools import initramfs, osimage
        from bootserver.web import pages
        files = {"package": bootserver.__file__, "ipxe": str(builtin_templates_dir("ipxe") / "bootstrap.ipxe.j2"),
                 "grub": str(builtin_templates_dir("grub") / "bootstrap.cfg.j2"),
                 "os_customize": str(osimage.CUSTOMIZE_HOOK), "pages": str(pages.PAGES_DIR / "index.html.j2")}
        files |= {name: str(initramfs.AGENT_DIR / script) for name, script in initramfs.AGENT_SCRIPTS.items()}
        print(json.dumps(files))
    """
    result = installed_run(venv_bin, "python", "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    site = (venv_bin.parent / "lib").resolve()
    for what, path in json.loads(result.stdout).items():
        assert Path(path).is_relative_to(site) and Path(path).is_file(), f"{what}: {path}"


# With the image builds of the VM tests (tests/conftest.py): it downloads into the same package cache.
@pytest.mark.xdist_group("vm")
def test_the_installed_wheel_builds_the_agent_image_and_serves_its_boot(installed, tmp_path: Path, timing) -> None:
    _, venv_bin, _ = installed
    data = tmp_path / "data"
    http = free_port()
    config = tmp_path / "bootserver.toml"
    tftp = free_port()
    config.write_text(f'[server]\nhttp = "127.0.0.1:{http}"\ntftp = "127.0.0.1:{tftp}"\n'
                      f'data_dir = "{data}"\n')
    started = time.monotonic()  # the Debian packages come from the user's cache (~/.cache/bootserver), as CI's do
    built = installed_run(venv_bin, "bootserver", "--config", str(config), "image", "build", cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    timing("bootserver image build from the installed wheel", time.monotonic() - started)
    agent = data / "images" / "agent"
    assert read_init(agent / "initrd.img") == (ROOT / "bootserver/tools/agent/init.sh").read_bytes()

    # the default profile boots what `image build` made (README "Getting started"); the server's own lookups do
    with serving(config, tmp_path / "server.log", command=[str(venv_bin / "bootserver")], cwd=tmp_path,
                 env=clean_env()):
        base = f"http://127.0.0.1:{http}"
        bootstrap = get(f"{base}/boot.ipxe").decode()
        assert bootstrap.startswith("#!ipxe\n") and f"chain --autofree {base}/boot/${{mac:hexhyp}}.ipxe?" in bootstrap
        script = get(f"{base}/boot/{MAC}.ipxe?platform=pcbios&arch=x86_64").decode()
        kernel, *initrds = re.findall(r"^(?:kernel|initrd) (\S+)", script, re.M)
        assert get(kernel) == (agent / "vmlinuz").read_bytes()
        assert get(initrds[0]) == (agent / "initrd.img").read_bytes()
        assert initrds[-1].endswith(f"/{OVERLAY_NAME}")  # this boot's keys, written by libarchive-c
        with libarchive.memory_reader(get(initrds[-1])) as overlay:
            assert [entry.pathname for entry in overlay]
        # Two processes answer (workers = the CPUs): the one that served the script writes its record within
        # 100 ms, so the other's pages may show the machine a moment later.
        for page in ("/", f"/machines/{MAC.replace('-', ':')}"):
            html = until(lambda page=page: shows_machine(base + page), 5, what=page)
            assert html.startswith("<!doctype html>"), page
        # TFTP from the C loop the wheel carries (a real client: curl)
        fetched = subprocess.run(["curl", "-sS", "--tftp-blksize", "1468", f"tftp://127.0.0.1:{tftp}/undionly.kpxe"],
                                 capture_output=True, timeout=60)
        assert fetched.returncode == 0 and fetched.stdout == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        assert "transfers in the C loop" in (tmp_path / "server.log").read_text()


def shows_machine(url: str) -> str | None:
    """The page, once it names the machine; None while it does not (or is 404 for it)."""
    try:
        html = get(url).decode()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    return html if "52:54:00:00:00:01" in html else None


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        return response.read()


def read_init(initrd: Path) -> bytes:
    """The /init script packed into the agent's initrd."""
    with libarchive.file_reader(str(initrd)) as archive:
        for entry in archive:
            if entry.pathname.lstrip("./") == "init":
                return b"".join(entry.get_blocks())
    raise AssertionError(f"{initrd} has no /init")
