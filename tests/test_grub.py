"""The Secure Boot chain's server side: who takes it, what DHCP names, the signed binaries and the GRUB
configurations served over real HTTP and TFTP on loopback, golden configs, and values quoted for GRUB.

The shim and GRUB served here are stand-in bytes (named so below): what the firmware does with the real signed
ones is the VM test's to show.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path

import pytest
from support.golden import URLS, golden
from support.installer import MAC, PATH, http_get, installer_site, tftp_get

from bootserver import config as configuration
from bootserver import grubcfg
from bootserver.app import STORE, http_address, init_app, running, tftp_address
from bootserver.booter import GRUB, Booter, Urls
from bootserver.errors import NotFound
from bootserver.firmware import dhcp_answer
from bootserver.templates import Templates

STAND_IN_SHIM = b"stand-in for shimx64.efi.signed"
STAND_IN_GRUB = b"stand-in for grubnetx64.efi.signed"


# -- quoting ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "quoted"), [
    ("plain", "'plain'"),
    ("it's", "'it'\\''s'"),
    ("$(reboot); echo ${x}", "'$(reboot); echo ${x}'"),
    ("", "''"),
])
def test_quote_is_one_literal_grub_word(value: str, quoted: str):
    assert grubcfg.quote(value) == quoted


def test_words_keep_the_kernels_own_split():
    assert grubcfg.words('console=ttyS0  quiet foo="a b" x=$y;z') == \
        "'console=ttyS0' 'quiet' 'foo=\"a b\"' 'x=$y;z'"


@pytest.mark.parametrize(("url", "root"), [
    ("http://10.0.0.1", "(http,10.0.0.1)"),
    ("http://10.0.0.1:80", "(http,10.0.0.1)"),
    ("http://10.0.0.1:8080", "(http,10.0.0.1:8080)"),  # GRUB 2.12 (Debian 13's) takes a port
    ("tftp://10.0.0.1:69", "(tftp,10.0.0.1)"),
    ("http://[fd00::1]", "(http,[fd00::1])"),
])
def test_root_is_a_device_grub_can_reach(url: str, root: str):
    assert grubcfg.root(url) == root


# -- who takes the chain -----------------------------------------------------------------------------------


def site(tmp_path: Path, *, machine: str = "", group: str = "", profile: str = "", cmdline: str = "console=ttyS0",
         **server) -> configuration.Config:
    tmp_path = tmp_path / "site"  # beside the fixtures' data directory
    tmp_path.mkdir()
    machines = f'[machines."{MAC}"]\nhostname = "node1"\n{machine}'
    config = installer_site(tmp_path, {}, cmdline=cmdline, machines=machines, **server)
    text = (tmp_path / "site.toml").read_text()
    text = text.replace('[groups.all]\nprofile = "installer"\n', f'[groups.all]\nprofile = "installer"\n{group}')
    text = text.replace('cmdline = ', f'{profile}cmdline = ', 1)
    (tmp_path / "site.toml").write_text(text)
    secure = config.server.data_dir / "secureboot"
    secure.mkdir()
    (secure / "shimx64.efi").write_bytes(STAND_IN_SHIM)
    (secure / "grubx64.efi").write_bytes(STAND_IN_GRUB)
    return configuration.load(tmp_path / "site.toml")


@pytest.mark.parametrize("where", ["machine", "group", "profile"])
def test_secure_boot_is_set_on_a_machine_a_group_or_a_profile(tmp_path: Path, where: str, store, keys):
    config = site(tmp_path, **{where: "secure_boot = true\n"})
    booter = Booter(config, store, Templates(), keys)
    assert booter.boot_spec(MAC).secure_boot
    assert not booter.boot_spec("52:54:00:00:16:02").secure_boot or where != "machine"


def test_dhcp_names_the_signed_shim_to_secure_boot_uefi_only():
    api = "http://192.0.2.1:8080"
    assert dhcp_answer(7, False, False, api, secure_boot=True).bootfile == "shimx64.efi"
    assert dhcp_answer(9, False, False, api, secure_boot=True).bootfile == "shimx64.efi"
    http = dhcp_answer(16, False, True, api, secure_boot=True)
    assert (http.bootfile, http.http) == (f"{api}/secureboot/shimx64.efi", True)
    assert dhcp_answer(0, False, False, api, secure_boot=True).bootfile == "undionly.kpxe"  # BIOS: no such chain
    assert dhcp_answer(7, False, False, api).bootfile == "ipxe.efi"
    # A machine already in iPXE (an operator's signed build) still gets the script.
    assert dhcp_answer(7, True, False, api, secure_boot=True).bootfile == f"{api}/boot.ipxe"


def test_a_deployed_secure_boot_machine_gets_the_shim_and_its_grub_the_local_disk(tmp_path: Path, store, keys):
    """Over HTTP boot as over PXE: the shim, whose GRUB (2.12 reads over HTTP) gets the local-disk configuration,
    which starts the disk's own shim."""
    booter = Booter(site(tmp_path, machine="secure_boot = true\n"), store, Templates(), keys)
    store.record(MAC, "deployed", {}, state="deployed")
    http = booter.dhcp_boot(MAC, 16, False, True, URLS)
    assert (http.bootfile, http.http) == (f"{URLS.api}/secureboot/shimx64.efi", True)
    assert booter.dhcp_boot(MAC, 7, False, False, URLS).bootfile == "shimx64.efi"
    config = booter.machine_script(MAC, {"platform": "efi"}, URLS, "http", loader=GRUB).data.decode()
    assert "chainloader" in config and "linux " not in config, config


def test_dhcp_answer_for_a_secure_boot_machine_is_recorded(tmp_path: Path, store, keys):
    booter = Booter(site(tmp_path, machine="secure_boot = true\n"), store, Templates(), keys)
    answer = booter.dhcp_boot(MAC, 7, False, False, URLS)
    assert answer.bootfile == "shimx64.efi"
    event = store.events(MAC)[-1]
    assert event.kind == "dhcp" and event.detail["bootfile"] == "shimx64.efi"
    assert "Secure Boot" in event.detail["answer"]


# -- golden configurations -------------------------------------------------------------------------------------


def test_grub_bootstrap_golden(booter: Booter):
    golden("bootstrap.grub.cfg", booter.grub_bootstrap().data.decode())


def test_raft_grub_config_golden_and_event(booter: Booter, store):
    payload = booter.machine_script("52:54:00:00:00:01", {"platform": "efi"}, Urls("tftp://192.0.2.1:69",
                                    "http://192.0.2.1:8080"), "tftp", "192.0.2.50", loader=GRUB)
    text = payload.data.decode()
    assert payload.name == "52-54-00-00-00-01.cfg"
    token = re.search(r"bootserver\.token='([^']+)'", text)[1]
    golden("raft-efi.grub.cfg", text)
    event = store.events("52:54:00:00:00:01")[-1]
    assert event.kind == "script-served" and event.detail["loader"] == "grub"
    assert event.detail["token_issued"] == token.split(".")[0]


def test_grub_noboot_and_local_disk(booter: Booter, store):
    text = booter.machine_script("52:54:00:00:00:99", {"platform": "efi"}, URLS, "http", loader=GRUB).data.decode()
    assert "exit 1" in text and "local disk" in text and "linux" not in text
    assert "chainloader $loader" in text and "--set=root $loader" in text  # not `exit` alone: see the template


def test_a_config_value_cannot_escape_its_quotes(tmp_path: Path, store, keys):
    hostile = "x'; reboot; echo '$(y)"
    config = site(tmp_path, machine="secure_boot = true\n", cmdline=f"console=ttyS0 note={hostile}")
    booter = Booter(config, store, Templates(), keys)
    text = booter.machine_script(MAC, {}, URLS, "http", "192.0.2.50", loader=GRUB).data.decode()
    linux = next(line for line in text.splitlines() if line.startswith("if linux "))
    # GRUB's single quotes are the shell's: read back as sh would, the words are the command line's, literally.
    words = shlex.split(linux.removesuffix("; then"))
    assert words[:7] == ["if", "linux", f"(http,192.0.2.1:8080)/boot/{PATH}/kernel", "console=ttyS0", "note=x';",
                         "reboot;", "echo"]
    assert words[7] == "'$(y)"


# -- served over real HTTP and TFTP --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(config: configuration.Config):
    app = init_app(config)
    async with running(app):
        yield app, f"http://127.0.0.1:{http_address(app)[1]}"


async def test_the_chain_over_tftp(tmp_path: Path):
    async with served(site(tmp_path, machine="secure_boot = true\n", tftp="127.0.0.1:0")) as (app, _):
        address = tftp_address(app)
        out = tmp_path / "got"
        await tftp_get(address, "shimx64.efi", out)
        assert out.read_bytes() == STAND_IN_SHIM
        await tftp_get(address, "grubx64.efi", out)
        assert out.read_bytes() == STAND_IN_GRUB
        assert "configfile $prefix/${net_default_mac}.cfg" in await tftp_get(address, "grub/grub.cfg", out)
        text = await tftp_get(address, f"grub/{MAC}.cfg", out)  # GRUB's $net_default_mac: colons
        # The kernel and initrds over HTTP all the same (Booter.render_profile says why).
        port = http_address(app)[1]
        assert f"if linux '(http,127.0.0.1:{port})/boot/{PATH}/kernel' 'console=ttyS0'" in text
        assert f"'(http,127.0.0.1:{port})/boot/{PATH}/initrd'" in text
        event = [e for e in app[STORE].events(MAC) if e.kind == "script-served"][-1]
        assert event.detail["loader"] == "grub" and event.detail["transport"] == "tftp"


async def test_the_chain_over_http(tmp_path: Path):
    async with served(site(tmp_path, machine="secure_boot = true\n")) as (app, url):
        status, _ = await http_get(f"{url}/secureboot/shimx64.efi")
        assert status == 200
        # Shim, fetched over the firmware's HTTP boot, joins its URL's directory and "\\grubx64.efi" (seen in the
        # lab's OVMF: GRUB then starts).
        status, body = await http_get(f"{url}/secureboot//grubx64.efi")
        assert (status, body) == (200, STAND_IN_GRUB.decode())
        assert (await http_get(f"{url}/secureboot/ipxe.efi"))[0] == 404  # only the chain's files
        assert (await http_get(f"{url}/secureboot//ipxe.efi"))[0] == 404
        assert (await http_get(f"{url}/secureboot/..%2fapi_token"))[0] == 404
        status, text = await http_get(f"{url}/grub/{MAC}.cfg")
        assert status == 200 and "bootserver.token=" in text
        # Our HTTP is not on port 80 here: GRUB 2.12 names the port in the device.
        port = http_address(app)[1]
        assert f"(http,127.0.0.1:{port})/boot/{PATH}/" in text
        assert (await http_get(f"{url}/grub/not-a-mac.cfg"))[0] == 400


def test_a_missing_shim_says_how_to_get_it(tmp_path: Path, store, keys):
    config = site(tmp_path)
    (config.server.data_dir / "secureboot" / "shimx64.efi").unlink()
    with pytest.raises(NotFound, match="bootserver image secureboot"):
        Booter(config, store, Templates(), keys).secure_boot_binary("shimx64.efi")
