"""Config: defaults, the example file, and every refusal naming the key it refuses."""

from pathlib import Path

import pytest

from bootserver import config as configuration
from bootserver.errors import ConfigError


def test_embedded_defaults_boot_the_agent_image(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    config = configuration.load(None)
    assert config.source is None
    assert config.profiles["agent"].kernel == "agent-kernel"
    assert [g.name for g in config.groups] == ["default"]
    assert config.assets["agent-initrd"].name == "initrd.img"
    # Unprivileged ports unless we run as root.
    import os
    expected = (80, 69) if os.geteuid() == 0 else (8080, 6969)
    assert (config.server.http.port, config.server.tftp.port) == expected


def test_example_file_parses(config):
    assert set(config.profiles) == {"discovery", "raft", "disk"}
    assert config.machines["52:54:00:00:00:02"].hostname == "node2"  # hyphenated key made canonical
    assert config.assets["vmlinuz"].is_absolute()
    assert config.groups[3].selector == {"mac": "52:54:00:00:00:99"}


def test_replica_settings(tmp_path: Path):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\ndatabase = "postgresql://u:p@db/boot"\nreplica = "boot-a"\n'
                    'peers = ["http://192.0.2.11:8080/"]\njob_lease_seconds = 10\n')
    server = configuration.load(path).server
    assert (server.database, server.replica, server.peers, server.job_lease_seconds) == (
        "postgresql://u:p@db/boot", "boot-a", ("http://192.0.2.11:8080",), 10)
    assert server.secret_key_path == tmp_path / "secret.key"


@pytest.mark.parametrize(("value", "expected"), [
    ("store.sqlite3", "DATA/store.sqlite3"),  # relative: under data_dir
    ("/srv/boot/store.sqlite3", "/srv/boot/store.sqlite3"),
    ("sqlite:///srv/boot/store.sqlite3", "/srv/boot/store.sqlite3"),
    ("postgres://u@db/boot", "postgres://u@db/boot"),
])
def test_database_is_a_url_or_an_sqlite_file(tmp_path: Path, value: str, expected: str):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\ndatabase = "{value}"\n')
    assert str(configuration.load(path).server.database) == expected.replace("DATA", str(tmp_path))


@pytest.mark.parametrize(("toml", "named"), [
    ('[server]\nhttp_port = 1', "unknown key 'http_port'"),
    ('[server]\nhttp = "nohost"', "http"),
    ('[server]\nhttp = "0.0.0.0:99999"', "http"),
    ('[server]\ndata_dir = 5', "data_dir"),
    ('[server]\ntoken_minutes = 0', "token_minutes"),
    ('[server]\napi_token = "short"', "api_token"),
    ('[bogus]\nx = 1', "unknown key 'bogus'"),
    ('[profiles.p]\nkernel = "missing"\n[groups.g]\nprofile = "p"', "asset 'missing'"),
    ('[assets]\nk = "k"\n[profiles.p]\nkernel = "k"\ncolour = "red"', "[profiles.p]: unknown key 'colour'"),
    ('[assets]\nk = "k"\n[profiles.p]\nkernel = "k"\n[groups.g]\nprofile = "nope"', "profile 'nope'"),
    ('[assets]\nk = "k"\n[profiles.p]\nkernel = "k"\n[groups.g]\nselector = {}', "missing key 'profile'"),
    ('[assets]\nk = "k"\n[profiles.p]\nkernel = "k"\n[groups.a]\nprofile = "p"\n[groups.b]\nprofile = "p"',
     "same selector"),
    ('[machines."zz:zz"]\nhostname = "x"', "not a MAC address: 'zz:zz'"),
    ('[machines."52:54:00:00:00:01"]\nhostname = "a"\n[machines."525400000001"]\nhostname = "b"',
     "same MAC"),
    ('[machines."52:54:00:00:00:01"]\nlabels = { mac = "x" }', "reserved"),
    ('[machines."52:54:00:00:00:01"]\nlabels = { role = 3 }', "labels"),
    ('[assets]\n"bad/name" = "x"', "name 'bad/name'"),
    ('[server\n', "not valid TOML"),
    ('[server]\ndatabase = "mysql://x"', "database: expected postgresql://"),
    ('[server]\ndatabase = "postgresql://u@db/boot?colour=red"', "database: not a URL libpq understands"),
    ('[server]\nreplica = "a b"', "replica"),
    ('[server]\npeers = ["ftp://x"]', "peers"),
    ('[server]\njob_lease_seconds = 0', "job_lease_seconds"),
    ('[server]\nevent_days = 0', "event_days"),
])
def test_bad_config_is_refused_with_the_key_named(tmp_path: Path, toml: str, named: str):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        configuration.load(path)
    assert named in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        configuration.load(tmp_path / "nope.toml")


OS_PROFILE = """
[assets]
k = "k"
debian = "images/os/debian-bookworm.tar.zst"
[profiles.cluster]
kernel = "k"
[profiles.cluster.disk]
device = "/dev/vda"
[[profiles.cluster.disk.partitions]]
label = "bios"
size = "1MiB"
type = "bios"
[[profiles.cluster.disk.partitions]]
label = "root"
size = "rest"
mount = "/"
"""


def test_an_installed_os_and_its_health_checks(tmp_path: Path):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\nboot_minutes = 7\n' + OS_PROFILE +
                    '[profiles.cluster.os]\nrootfs = "debian"\n'
                    '[profiles.cluster.health]\ncommands = ["systemctl is-active raftd"]\n'
                    'urls = ["http://{ip}:7000/peers"]\n')
    config = configuration.load(path)
    profile = config.profiles["cluster"]
    assert profile.os == configuration.OperatingSystem("debian", "console=tty0 console=ttyS0,115200")
    assert profile.health == configuration.Health(("systemctl is-active raftd",), ("http://{ip}:7000/peers",))
    assert profile.disk.partitions[0].filesystem == "none"
    assert (config.server.boot_minutes, config.server.running_minutes) == (7, 10)


@pytest.mark.parametrize(("extra", "message"), [
    ('[profiles.cluster.os]\nrootfs = "nope"\n', "names asset 'nope', which is not in \\[assets\\]"),
    ('[profiles.cluster.os]\nimage = "debian"\ndevice = "/dev/vda"\n', "a whole-disk image brings its own partitions"),
    ('[profiles.cluster.os]\nrootfs = "debian"\nsize = 3\n', "unknown key 'size'"),
    ('[profiles.cluster.health]\ncommands = ["true"]\n', "health checks an installed OS: add \\[profiles"),
    ('[profiles.cluster.os]\nrootfs = "debian"\n[profiles.cluster.health]\nurls = ["ftp://x"]\n',
     "urls: expected a list of http:// URLs"),
    ('[profiles.cluster.os]\nrootfs = "debian"\n[profiles.cluster.health]\ncommands = [" "]\n',
     "commands: expected a list of shell commands"),
])
def test_os_and_health_refusals_name_the_cause(tmp_path: Path, extra: str, message: str):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n' + OS_PROFILE + extra)
    with pytest.raises(ConfigError, match=message):
        configuration.load(path)


def test_an_os_needs_a_root_partition_to_install_onto(tmp_path: Path):
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[assets]\nk = "k"\nd = "d.tar"\n[profiles.p]\nkernel = "k"\n'
                    '[profiles.p.os]\nrootfs = "d"\n')
    with pytest.raises(ConfigError, match='a rootfs needs a disk to install onto.*mounted at "/"'):
        configuration.load(path)
