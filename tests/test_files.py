"""Per-machine files for installers ([profiles.X.files]): read from the config, rendered for the machine that asks,
served over real HTTP and TFTP on loopback, and only to the address its boot went to. 127.0.0.2 is the real
machine, 127.0.0.3 someone else on the boot network claiming its MAC."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tftpy
from support.installer import MAC, PATH, http_get, installer_site, tftp_get

from bootserver import config as configuration
from bootserver.app import CORE, STORE, http_address, init_app, running, tftp_address
from bootserver.errors import ConfigError

REAL, FORGER = "127.0.0.2", "127.0.0.3"
PRESEED = ("# {{ hostname }} {{ mac }} {{ mac_hyphenated }} group={{ group }} profile={{ profile.name }} "
           "role={{ labels.role }} platform={{ platform }}\n"
           "d-i passwd/root-password-crypted password $6$secret-hash\n"
           "d-i preseed/early_command string wget -O /tmp/proof {{ file_url('proof') }}\n")
FILES = {"preseed.cfg": PRESEED, "proof": "proof for {{ hostname }}\n",
         "config.json": '{"ignition": {"version": "3.4.0"}, "host": "{{ hostname }}"}\n'}
CMDLINE = "auto=true priority=critical url={{ file_url('preseed.cfg') }}"


@contextlib.asynccontextmanager
async def served(config: configuration.Config):
    app = init_app(config)
    async with running(app):
        yield app, f"http://127.0.0.1:{http_address(app)[1]}"


def site(tmp_path: Path, **server) -> configuration.Config:
    return installer_site(tmp_path, FILES, cmdline=CMDLINE, tftp="127.0.0.1:0", **server)


def events(app, kind: str) -> list[dict]:
    return [e.detail for e in app[STORE].events(MAC) if e.kind == kind]


# -- the config --------------------------------------------------------------------------------------------


def profile_with(tmp_path: Path, files: object, cmdline: str = "") -> dict:
    """A document whose one profile has the files table `files`, templates under tmp_path."""
    return {"server": {"data_dir": str(tmp_path)},
            "profiles": {"p": {"template": "localdisk.ipxe.j2", "cmdline": cmdline, "files": files}}}


def test_files_are_templates_under_data_dir(tmp_path):
    (tmp_path / "ks").mkdir()
    (tmp_path / "ks" / "a.cfg.j2").write_text("{{ hostname }}")
    absolute = tmp_path / "b.j2"
    absolute.write_text("{{ file_url('a.cfg') }}")
    config = configuration.parse(profile_with(tmp_path, {"a.cfg": "ks/a.cfg.j2", "user-data": str(absolute)},
                                              cmdline="ks={{ file_url('user-data') }}"))
    assert config.profiles["p"].files == {"a.cfg": tmp_path / "ks" / "a.cfg.j2", "user-data": absolute}


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "", "a b", "a\\b", "x?y"])
def test_a_file_name_is_safe_in_a_path(tmp_path, name):
    (tmp_path / "t.j2").write_text("")
    with pytest.raises(ConfigError, match=r"\[profiles\.p\.files\].*may hold only letters, digits"):
        configuration.parse(profile_with(tmp_path, {name: "t.j2"}))


@pytest.mark.parametrize(("files", "message"), [
    ({"a": "missing.j2"}, r"\[profiles\.p\.files\] a: .*missing\.j2 does not exist \(relative paths are under "
                          r"data_dir\)"),
    ({"a": "."}, r"is a directory, not a template file"),
    ({"a": ""}, r"\[profiles\.p\.files\] a: expected a non-empty string"),
    ({"a": 3}, r"\[profiles\.p\.files\] a: expected a non-empty string, got 3"),
    ("preseed.cfg", r"\[profiles\.p\] files: expected a table"),
])
def test_a_bad_file_is_refused_at_load(tmp_path, files, message):
    with pytest.raises(ConfigError, match=message):
        configuration.parse(profile_with(tmp_path, files))


def test_a_template_that_does_not_parse_is_refused_at_load(tmp_path):
    (tmp_path / "t.j2").write_text("line one\n{% if %}\n")
    with pytest.raises(ConfigError, match=r"a: .*t\.j2, line 2: "):
        configuration.parse(profile_with(tmp_path, {"a": "t.j2"}))


def test_file_url_must_name_a_file_of_the_profile(tmp_path):
    (tmp_path / "t.j2").write_text("{{ file_url('b') }}")
    (tmp_path / "u.j2").write_text("")
    with pytest.raises(ConfigError, match=r"\[profiles\.p\.files\] a: .*file_url\('b'\) names no file .*"
                                          r"\(it has: a, u\)"):
        configuration.parse(profile_with(tmp_path, {"a": "t.j2", "u": "u.j2"}))
    with pytest.raises(ConfigError, match=r"\[profiles\.p\] cmdline: file_url\('preseed'\) names no file"):
        configuration.parse(profile_with(tmp_path, {"u": "u.j2"}, cmdline="url={{ file_url('preseed') }}"))
    with pytest.raises(ConfigError, match=r"file_url takes one file name in quotes"):
        configuration.parse(profile_with(tmp_path, {"u": "u.j2"}, cmdline="url={{ file_url(name) }}"))


# -- served over HTTP ----------------------------------------------------------------------------------------


async def test_the_machine_that_booted_gets_its_files_rendered_for_it(tmp_path):
    async with served(site(tmp_path)) as (app, base):
        status, script = await http_get(f"{base}/boot/{PATH}.ipxe?platform=pcbios", REAL)
        preseed_url = f"{base}/boot/{PATH}/files/preseed.cfg"
        assert status == 200 and f"url={preseed_url} " in script
        status, preseed = await http_get(preseed_url, REAL)
        assert status == 200, preseed
        assert preseed.splitlines()[0] == (f"# node1 {MAC} {PATH} group=all profile=installer role=installer "
                                           f"platform=pcbios")
        assert f"wget -O /tmp/proof {base}/boot/{PATH}/files/proof\n" in preseed
        assert await http_get(f"{base}/boot/{PATH}/files/proof", REAL) == (200, "proof for node1\n")
        # Named like the token routes' files: still the installer's.
        status, ignition = await http_get(f"{base}/boot/{PATH}/files/config.json", REAL)
        assert status == 200 and '"host": "node1"' in ignition

        served_files = events(app, "file-served")
        assert [(d["file"], d["protocol"], d["from"]) for d in served_files] == [
            ("files/preseed.cfg", "http", REAL), ("files/proof", "http", REAL), ("files/config.json", "http", REAL)]
        assert served_files[0]["size"] == served_files[0]["bytes"] == len(preseed.encode())
        assert app[STORE].node(MAC).state == "script-served"  # a file moves no machine on
        status, page = await http_get(f"{base}/machines/{MAC}")
        assert status == 200 and "files/preseed.cfg" in page and f"to {REAL}" in page


async def test_another_address_claiming_the_mac_gets_nothing_and_is_seen(tmp_path):
    async with served(site(tmp_path)) as (app, base):
        await http_get(f"{base}/boot/{PATH}.ipxe", REAL)
        status, text = await http_get(f"{base}/boot/{PATH}/files/preseed.cfg", FORGER)
        assert status == 403 and "secret-hash" not in text
        assert f"issued to {REAL}, not to {FORGER}" in text
        refused = events(app, "refused")
        assert refused[-1]["what"] == "file preseed.cfg" and refused[-1]["from"] == FORGER
        assert events(app, "file-served") == []


async def test_bad_macs_names_and_unknown_files(tmp_path):
    async with served(site(tmp_path)) as (app, base):
        await http_get(f"{base}/boot/{PATH}.ipxe", REAL)
        status, text = await http_get(f"{base}/boot/not-a-mac/files/preseed.cfg", REAL)
        assert status == 400 and "MAC" in text
        status, text = await http_get(f"{base}/boot/{PATH}/files/kickstart.cfg", REAL)
        assert status == 404 and "profile installer has no file 'kickstart.cfg' (it has: config.json, preseed.cfg, " \
                                 "proof)" in text
        assert events(app, "refused")[-1]["reason"].startswith("profile installer has no file")
        for name in ("..%2F..%2Fsite.toml", "%2E%2E", ".hidden", "a%5Cb", "%00"):
            status, text = await http_get(f"{base}/boot/{PATH}/files/{name}", REAL)
            assert status in (400, 404), (name, status, text)
        status, _ = await http_get(f"{base}/boot/{PATH}/files/../../site.toml", REAL)  # the client folds it
        assert status == 404
        assert "secret-hash" not in text


async def test_approve_mode_an_unapproved_machine_gets_no_files(tmp_path):
    async with served(site(tmp_path, enroll="approve")) as (app, base):
        status, script = await http_get(f"{base}/boot/{PATH}.ipxe", REAL)
        assert status == 200 and "waiting for approval" in script
        status, text = await http_get(f"{base}/boot/{PATH}/files/preseed.cfg", REAL)
        assert status == 403 and "holds no live boot token" in text
        app[CORE].approve(MAC)
        await http_get(f"{base}/boot/{PATH}.ipxe", REAL)
        status, text = await http_get(f"{base}/boot/{PATH}/files/preseed.cfg", REAL)
        assert status == 200 and "secret-hash" in text


async def test_held_claims_get_no_files(tmp_path):
    async with served(site(tmp_path, enroll="known")) as (app, base):
        await http_get(f"{base}/boot/{PATH}.ipxe", REAL)
        await http_get(f"{base}/boot/{PATH}.ipxe", FORGER)  # a second claim: both held
        status, text = await http_get(f"{base}/boot/{PATH}/files/preseed.cfg", REAL)
        assert status == 403 and "claims are held" in text


async def test_a_template_that_fails_to_render_is_a_server_error_on_the_machines_page(tmp_path):
    config = installer_site(tmp_path, {"broken": "{{ no_such_variable }}"})
    async with served(config) as (app, base):
        await http_get(f"{base}/boot/{PATH}.ipxe", REAL)
        status, text = await http_get(f"{base}/boot/{PATH}/files/broken", REAL)
        assert status == 500 and "'no_such_variable' is undefined" in text
        assert "'no_such_variable' is undefined" in events(app, "file-failed")[-1]["error"]


async def test_files_asked_for_unseen_macs_make_no_machine_rows(tmp_path):
    async with served(site(tmp_path)) as (app, base):
        for i in range(20):
            status, _ = await http_get(f"{base}/boot/52-54-00-00-17-{i:02x}/files/preseed.cfg", FORGER)
            assert status == 403
            status, _ = await http_get(f"{base}/boot/52-54-00-00-18-{i:02x}/files/nothing", FORGER)
            assert status == 404
        assert app[STORE].node_count() == 0


# -- the TFTP twin -------------------------------------------------------------------------------------------


async def test_over_tftp_the_same_files_to_the_same_address(tmp_path):
    async with served(site(tmp_path)) as (app, _):
        address = tftp_address(app)
        script = await tftp_get(address, f"boot/{PATH}/pcbios/x86_64.ipxe", tmp_path / "script", REAL)
        url = re.search(r"url=(\S+)", script)[1]
        assert url == f"tftp://127.0.0.1:{address[1]}/boot/{PATH}/files/preseed.cfg"
        preseed = await tftp_get(address, f"boot/{PATH}/files/preseed.cfg", tmp_path / "preseed", REAL)
        assert f"tftp://127.0.0.1:{address[1]}/boot/{PATH}/files/proof" in preseed and "platform=pcbios" in preseed
        with pytest.raises(tftpy.TftpException, match="errorcode = 2"):
            await tftp_get(address, f"boot/{PATH}/files/preseed.cfg", tmp_path / "forged", FORGER)
        with pytest.raises(tftpy.TftpException, match="File not found"):
            await tftp_get(address, f"boot/{PATH}/files/nothing", tmp_path / "nothing", REAL)
        with pytest.raises(tftpy.TftpException):
            await tftp_get(address, f"boot/{PATH}/files/../../site.toml", tmp_path / "up", REAL)
        served_files = [d for d in events(app, "file-served") if d["file"].startswith("files/")]  # not the script
        assert [(d["file"], d["protocol"], d["from"]) for d in served_files] == [("files/preseed.cfg", "tftp", REAL)]
        assert events(app, "refused")[-2]["from"] == FORGER


# -- the operator's preview --------------------------------------------------------------------------------


def test_render_previews_a_file_as_the_machine_would_get_it(tmp_path):
    site(tmp_path)
    command = [sys.executable, "-m", "bootserver", "--config", str(tmp_path / "site.toml"), "render", MAC,
               "--url", "http://192.0.2.1:8080"]
    result = subprocess.run([*command, "--file", "preseed.cfg"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "# profile: installer, file preseed.cfg\n# node1 52:54:00:00:16:01" in result.stdout
    assert f"wget -O /tmp/proof http://192.0.2.1:8080/boot/{PATH}/files/proof" in result.stdout
    result = subprocess.run([*command, "--file", "nothing"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "profile installer has no file 'nothing'" in result.stderr
