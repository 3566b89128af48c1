"""The agent image: what the initramfs holds, and that it really boots, phones home and lets
the server in with SSH to partition, format and copy files.

The image comes from the session fixture `agent_image` (conftest.py), built once into a cache
directory that survives runs. The `vm` tests boot it under QEMU (TCG) with user-mode networking,
so the guest's 10.0.2.2:PORT is this process's 127.0.0.1:PORT, and a hostfwd brings the guest's
SSH server to a port of our 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import ipaddress
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
from pathlib import Path

import asyncssh
import libarchive
import pytest
from aiohttp import web
from support.net import free_port
from support.qemu import DEFAULT_MAC, Vm
from support.require import require, require_root

from bootserver.errors import BootserverError
from bootserver.overlay import overlay_cpio
from bootserver.tools import apt, contents, image, initramfs
from bootserver.tools.contents import AGENT_MODULES
from bootserver.tools.image import AgentImage


def read_initramfs(path: Path) -> dict[str, dict]:
    entries = {}
    with libarchive.file_reader(str(path)) as archive:
        for entry in archive:
            entries[entry.pathname] = {
                "type": stat.S_IFMT(entry.mode),
                "perm": stat.S_IMODE(entry.mode),
                "uid": entry.uid,
                "gid": entry.gid,
                "size": entry.size,
                "link": entry.linkpath if entry.issym else None,
                "rdev": (entry.rdevmajor, entry.rdevminor),
                "data": b"".join(entry.get_blocks()) if entry.isreg else None,
            }
        # known once a header has been read
        assert archive.format_name == b"ASCII cpio (SVR4 with no CRC)", archive.format_name  # newc
        assert archive.filter_names == [b"gzip"], archive.filter_names
    return entries


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert image.default_cache_dir() == tmp_path / "bootserver"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert image.default_cache_dir() == tmp_path / "home" / ".cache" / "bootserver"


def test_empty_apt_lists_say_run_apt_get_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "apt-cache"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'E: No packages found' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(BootserverError, match="run apt-get update"):
        image.build_agent_image(tmp_path / "out", cache_dir=tmp_path / "cache", progress=lambda _: None)


def test_image_files(agent_image: AgentImage) -> None:
    assert agent_image.kernel.name == "vmlinuz" and agent_image.initrd.name == "initrd.img"
    assert (agent_image.kernel.parent / "version").read_text().strip() == agent_image.version
    assert agent_image.version.endswith("-amd64")
    assert agent_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert agent_image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip


def test_initramfs_contents(agent_image: AgentImage) -> None:
    entries = read_initramfs(agent_image.initrd)
    reg, lnk = stat.S_IFREG, stat.S_IFLNK

    init = entries["init"]
    assert init["type"] == reg and init["perm"] == 0o755
    assert init["data"] == (initramfs.AGENT_DIR / "init.sh").read_bytes()
    assert init["data"].startswith(b"#!/bin/sh\n")
    assert b"bootserver.url" in init["data"] and b"/phone-home" in init["data"]
    assert b"/booted" not in init["data"]

    busybox = entries["bin/busybox"]
    assert busybox["type"] == reg and busybox["perm"] == 0o755 and busybox["size"] > 1_000_000
    assert entries["bin/sh"] == {**entries["bin/sh"], "type": lnk, "link": "busybox"}
    for applet in ("udhcpc", "wget", "insmod", "ip", "setsid", "cttyhack", "timeout", "mount"):
        assert entries[f"bin/{applet}"]["link"] == "busybox", applet
    # every symlink has a target (libarchive-c alone writes them empty) and none loops to itself
    for path, entry in entries.items():
        if entry["type"] == lnk:
            assert entry["link"] and entry["link"] != path.rsplit("/", 1)[-1], path

    script = entries["etc/udhcpc/default.script"]
    assert script["type"] == reg and script["perm"] == 0o755
    assert script["data"] == (initramfs.AGENT_DIR / "udhcpc.sh").read_bytes()
    assert entries["dev/console"]["type"] == stat.S_IFCHR and entries["dev/console"]["rdev"] == (5, 1)
    assert entries["tmp"]["perm"] == 0o1777
    assert all(e["uid"] == 0 and e["gid"] == 0 for e in entries.values())

    # the modules, uncompressed, and a load order with dependencies first
    moddir = f"lib/modules/{agent_image.version}/"
    order = entries["etc/bootserver/modules"]["data"].decode().split()
    names = [m.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_") for m in order]
    for wanted in AGENT_MODULES:
        assert wanted in names, (wanted, names)
    for module in order:
        entry = entries[moddir + module]
        assert entry["type"] == reg and entry["size"] > 0, module
        assert module.endswith(".ko")
    for before, after in (("virtio_ring", "virtio"), ("virtio", "virtio_pci"), ("virtio", "virtio_net"),
                          ("failover", "net_failover"), ("net_failover", "virtio_net")):  # fmt: skip
        assert names.index(before) < names.index(after), (before, after, names)
    assert moddir + "modules.dep" in entries


def resolve(entries: dict[str, dict], path: str) -> str | None:
    """Where path leads in the archive, following symlinks (absolute or relative); None if nowhere."""
    path = path.lstrip("/")
    for _ in range(20):
        # a link in a parent directory (usr/bin -> ../bin) counts too
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if entries.get(parent, {}).get("link"):
                target = entries[parent]["link"]
                base = "" if target.startswith("/") else posixpath.dirname(parent)
                path = posixpath.normpath(posixpath.join(base, target.lstrip("/"), *parts[i:]))
                break
        else:
            entry = entries.get(path)
            if entry is None:
                return None
            if entry["type"] != stat.S_IFLNK:
                return path
            target = entry["link"]
            base = "" if target.startswith("/") else posixpath.dirname(path)
            path = posixpath.normpath(posixpath.join(base, target.lstrip("/")))
    return None


def readelf(path: Path) -> tuple[str | None, list[str]]:
    """(interpreter, NEEDED) of an ELF file, as binutils' readelf sees them."""
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    headers = subprocess.run(["readelf", "-l", str(path)], capture_output=True, text=True, check=True).stdout
    interp = re.search(r"Requesting program interpreter: ([^\]]+)\]", headers)
    return (interp.group(1) if interp else None), needed


def test_programs_have_all_their_libraries(agent_image: AgentImage, tmp_path: Path) -> None:
    require("readelf")
    entries = read_initramfs(agent_image.initrd)

    # dropbear runs its SFTP subsystem by the path compiled into it: that must be sftp-server
    dropbear = entries[resolve(entries, "usr/sbin/dropbear")]["data"]
    sftp_path = re.search(rb"\0(/[\w./+-]*sftp-server)\0", dropbear).group(1).decode()
    sftp = resolve(entries, sftp_path)
    assert sftp is not None and b"[-d start_directory]" in entries[sftp]["data"], sftp_path

    programs = ["dropbear", "dropbearkey", "sfdisk", "parted", "partprobe", "mkfs.ext4", "mke2fs", "e2fsck",
                "tune2fs", "mkfs.vfat", "mkfs.fat", "mkdosfs", "fsck.vfat", "blkid", "wipefs", "lsblk",
                "openssl"]  # fmt: skip
    todo = [resolve(entries, f"sbin/{name}") for name in programs] + [sftp]
    for name, path in zip(programs, todo, strict=False):
        assert path is not None and path != "bin/busybox", (name, path)  # the real one, not busybox's
        assert entries[path]["perm"] & 0o111, path
    checked: set[str] = set()
    while todo:
        path = todo.pop()
        if path in checked:
            continue
        checked.add(path)
        copy = tmp_path / path.replace("/", "_")
        copy.write_bytes(entries[path]["data"])
        interp, needed = readelf(copy)
        assert contents.elf_dependencies(copy) == (interp, needed), path  # pyelftools agrees
        if interp is not None:
            found = resolve(entries, interp)
            assert found is not None, (path, interp)
            todo.append(found)
        for soname in needed:
            dirs = contents.LIBRARY_DIRS
            found = next((f for d in dirs if (f := resolve(entries, f"{d}/{soname}")) is not None), None)
            assert found is not None, f"{path} needs {soname}, which is not in the archive"
            todo.append(found)
    libraries = {posixpath.basename(p) for p in checked}
    assert {"libc.so.6", "ld-linux-x86-64.so.2"} <= libraries, sorted(libraries)
    assert any(name.startswith("libtomcrypt.so.") for name in libraries), sorted(libraries)  # dropbear's
    assert {"libssl.so.3", "libcrypto.so.3"} <= libraries, sorted(libraries)  # openssl's

    assert b"[defaults]" in entries["etc/mke2fs.conf"]["data"]
    assert entries["etc/shells"]["data"] == b"/bin/sh\n"
    assert entries["etc/passwd"]["data"].startswith(b"root:x:0:0:root:/root:/bin/sh\n")
    assert entries["root"]["perm"] == 0o700


def extract_initramfs(entries: dict[str, dict], root: Path) -> None:
    """Directories, regular files and symlinks of the archive under root (device nodes left out)."""
    for path, entry in entries.items():
        dest = root / path
        if entry["type"] == stat.S_IFDIR:
            dest.mkdir(parents=True, exist_ok=True)
            dest.chmod(entry["perm"])
        elif entry["type"] == stat.S_IFREG:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(entry["data"])
            dest.chmod(entry["perm"])
        elif entry["type"] == stat.S_IFLNK:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(entry["link"])


def test_openssl_makes_the_tls_key_and_request_inside_the_agent(agent_image: AgentImage, tmp_path: Path) -> None:
    """The deploy step's own command, run by the agent's busybox sh and openssl in a chroot of the
    initramfs: no /usr/lib/ssl, no /proc, nothing of the host's. The key stays, the request verifies."""
    require_root("a chroot of the initramfs")
    require("chroot")
    chroot = shutil.which("chroot")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from bootserver.provision.deploy import _csr_pem, _key_and_csr_command

    root = tmp_path / "agent"
    extract_initramfs(read_initramfs(agent_image.initrd), root)
    assert not (root / "usr/lib/ssl").exists() and not (root / "etc/ssl").exists()
    command = _key_and_csr_command("/mnt/etc/tls", "/mnt/etc/tls/.node.key.new")
    result = subprocess.run([chroot, str(root), "/bin/env", "-i", "PATH=/bin", "/bin/sh", "-c", command],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key_file = root / "mnt/etc/tls/.node.key.new"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(_csr_pem(result.stdout).encode())
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    assert not list((root / "tmp").iterdir())  # the config file went


def test_agent_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install shellcheck")
    scripts = sorted(initramfs.AGENT_DIR.glob("*.sh"))
    assert {p.name for p in scripts} >= set(initramfs.AGENT_SCRIPTS.values()), scripts
    # each script says `# shellcheck shell=sh`: busybox's ash runs them, so POSIX sh rules
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def shell_functions(*names: str) -> str:
    """The definitions of these functions in /init, to run them on their own."""
    init = (initramfs.AGENT_DIR / "init.sh").read_text()
    found = []
    for name in names:
        match = re.search(rf"^{re.escape(name)}\(\) {{.*?^}}\n", init, re.M | re.S)
        assert match, name
        found.append(match.group(0))
    return "".join(found)


def test_init_reads_config_json(agent_image: AgentImage, tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(read_initramfs(agent_image.initrd)["bin/busybox"]["data"])
    busybox.chmod(0o755)
    # a key comment that looks like a field must not count
    keys = ["ssh-ed25519 AAAAC3Nza key-1", 'ssh-ed25519 AAAAC3Nzb "token": "no"']
    config = {"mac": "52:54:00:00:00:07", "hostname": "node7", "url": "http://10.0.2.2:8080", "token": "t0k/en+=",
              "authorized_keys": keys}  # fmt: skip
    overlay = read_overlay(overlay_cpio({**config, "authorized_keys": config["authorized_keys"][:1]}))
    for text in (json.dumps(config), json.dumps(config, indent=2), overlay["etc/bootserver/config.json"].decode()):
        (tmp_path / "config.json").write_text(text)
        script = f"CONFIG={tmp_path}/config.json\n" + shell_functions("config_field", "json_string")
        script += 'for f in mac hostname url token missing; do echo "$f=$(config_field $f)"; done\n'
        script += "json_string 'a \"quoted\" back\\slash'\n"
        out = subprocess.run([str(busybox), "sh", "-c", script], capture_output=True, text=True, check=True).stdout
        assert out.splitlines() == [
            "mac=52:54:00:00:00:07",
            "hostname=node7",
            "url=http://10.0.2.2:8080",
            "token=t0k/en+=",
            "missing=",
            '"a \\"quoted\\" back\\\\slash"',
        ], text


def read_overlay(data: bytes) -> dict[str, bytes]:
    entries = {}
    with libarchive.memory_reader(data) as archive:
        for entry in archive:
            assert (entry.uid, entry.gid) == (0, 0)
            if entry.isreg:
                entries[entry.pathname] = b"".join(entry.get_blocks())
    return entries


def concatenate_initrds(parts: list[bytes]) -> bytes:
    """One initrd from several, as iPXE loads them: each padded with zeros to a multiple of 4 bytes."""
    out = bytearray()
    for part in parts:
        out += part
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def test_console_progress() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    progress = image.ConsoleProgress(plain)
    progress("start")
    for done in range(0, 1001, 50):
        progress.bar("downloading", done * 1000, 1_000_000)
    progress("done")
    lines = plain.getvalue().splitlines()
    assert lines[0] == "start" and lines[-1] == "done"
    assert [line.split()[1] for line in lines[1:-1]] == ["0%", "25%", "50%", "75%", "100%"], lines
    assert "\r" not in plain.getvalue()

    tty = Terminal()
    progress = image.ConsoleProgress(tty)
    progress.bar("downloading", 250_000, 1_000_000)
    progress("interrupting message")
    progress.bar("downloading", 1_000_000, 1_000_000)
    out = tty.getvalue()
    assert out.startswith("\rdownloading: [#######.......................]  25% (0.2 of 1.0 MB)"), repr(out)
    assert "\ninterrupting message\n" in out and out.endswith("100% (1.0 of 1.0 MB)\x1b[K\n"), repr(out)

    messages: list[str] = []  # a plain callable gets a message every 25 %
    last = [-1]
    for done in (0, 10, 30, 60, 99, 100):
        apt._show_bytes(messages.append, "dl", done, 100, last)
    assert messages == ["dl: 0%", "dl: 30%", "dl: 60%", "dl: 99%", "dl: 100%"]


# --- booting it -------------------------------------------------------------------------------


class PhoneHomeServer:
    """A tiny server on 127.0.0.1 taking POST /boot/{mac}/phone-home: the first requests get the
    `answers` (status, reason) given, later ones 200; every request is recorded."""

    def __init__(self, answers: list[tuple[int, str]] = ()) -> None:
        self.answers = list(answers)
        self.requests: list[dict] = []
        self.seen = asyncio.Event()  # any request
        self.accepted = asyncio.Event()  # a 200
        self.runner: web.AppRunner | None = None

    async def phone_home(self, request: web.Request) -> web.Response:
        self.requests.append({"mac_path": request.match_info["mac"], "body": await request.json()})
        self.seen.set()
        if len(self.requests) <= len(self.answers):
            status, reason = self.answers[len(self.requests) - 1]
            return web.Response(status=status, reason=reason, text=f"{reason}\n")
        self.accepted.set()
        return web.json_response({"ok": True})

    async def start(self, port: int = 0) -> int:
        app = web.Application()
        app.router.add_post("/boot/{mac}/phone-home", self.phone_home)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def check_phone_home(server: PhoneHomeServer, vm: Vm, version: str) -> dict:
    assert server.requests, vm.report()
    request = server.requests[-1]
    assert request["mac_path"] == DEFAULT_MAC.replace(":", "-"), vm.report()
    body = request["body"]
    assert set(body) == {"mac", "ip", "host_key", "token", "kernel", "disks", "uuid", "secure_boot"}, body
    assert body["secure_boot"] is None, body  # direct -kernel on SeaBIOS: no UEFI, so nothing to say
    assert body["mac"] == DEFAULT_MAC, (body, vm.report())
    assert ipaddress.ip_address(body["ip"]) in ipaddress.ip_network("10.0.2.0/24"), (body, vm.report())
    assert body["kernel"] == version, body
    assert re.fullmatch(r"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\S+", body["host_key"]), body
    return body


def boot_args(**settings: str) -> str:
    # panic=-1 reboots on a panic, and -no-reboot then ends QEMU: a failure shows at once
    return "console=ttyS0 panic=-1 " + " ".join(f"bootserver.{k}={v}" for k, v in settings.items())


@pytest.mark.vm
async def test_agent_phones_home_and_lets_the_server_in(agent_image: AgentImage, tmp_path: Path, timing) -> None:
    """The provisioning path end to end: overlay with keys, phone-home, SSH with the pinned host
    key, partitioning, mkfs, mounts, SFTP, and `reboot -f` ending the VM."""
    server = PhoneHomeServer()
    port = await server.start()
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    overlay = overlay_cpio({
        "mac": DEFAULT_MAC,
        "hostname": "node7",
        "url": f"http://10.0.2.2:{port}",  # only here: the overlay's settings count
        "token": "from-the-overlay",  # the command line's wins
        "authorized_keys": [client_key.export_public_key().decode().strip()],
    })
    # one -initrd for QEMU: the agent's and the overlay, as iPXE would load them. The overlay
    # uncompressed (as bootserver.overlay serves it): the kernel's stricter case, a cpio that
    # must start 4-byte aligned after a gzip member of any length
    initrd = tmp_path / "initrd-with-overlay.img"
    initrd.write_bytes(concatenate_initrds([agent_image.initrd.read_bytes(), overlay]))
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    ssh_port = free_port()
    vm = Vm(workdir=tmp_path, kernel=agent_image.kernel, initrd=initrd, disk=disk, hostfwd={ssh_port: 22},
            append=boot_args(mac=DEFAULT_MAC, token="from-the-cmdline"))  # fmt: skip
    try:
        await vm.start()
        await vm.wait_until(server.accepted, timeout=120, what="POST /boot/.../phone-home")
        phoned = vm.elapsed
        body = check_phone_home(server, vm, agent_image.version)
        assert body["token"] == "from-the-cmdline", body
        assert body["disks"] == [{"name": "vda", "size_bytes": 64 << 20, "partitions": 0, "removable": False}], body
        await vm.wait_for_serial(rf"bootserver agent: phoned home to http://10\.0\.2\.2:{port}/boot/"
                                 r"52-54-00-12-34-56/phone-home ok", timeout=20)  # fmt: skip
        assert f"SSH host key: {body['host_key']}" in vm.serial_log, vm.report()

        # trust exactly the key the agent reported: never on first use
        known_hosts = asyncssh.import_known_hosts(f"[127.0.0.1]:{ssh_port} {body['host_key']}\n")
        async with asyncssh.connect("127.0.0.1", ssh_port, username="root", client_keys=[client_key],
                                    known_hosts=known_hosts, agent_path=None, password=None,
                                    connect_timeout=30) as conn:  # fmt: skip
            connected = vm.elapsed

            async def run(command: str, input: str | None = None) -> str:
                result = await asyncio.wait_for(conn.run(command, input=input), 60)
                output = f"{result.stdout}{result.stderr}"
                assert result.exit_status == 0, f"{command}: exit {result.exit_status}\n{output}{vm.report()}"
                return output

            assert (await run("hostname")).strip() == "node7"
            assert "util-linux" in await run("sfdisk --version")
            assert "GNU parted" in await run("parted --version")
            assert "mke2fs 1.47" in await run("mkfs.ext4 -V")
            assert "mkfs.fat 4" in await run("mkfs.vfat --help || true")

            await run("wipefs -a /dev/vda")
            await run("sfdisk --label gpt /dev/vda", input="size=16MiB, type=uefi, name=esp\ntype=linux, name=root\n")
            await run("for i in $(seq 50); do [ -b /dev/vda2 ] && break; sleep 0.1; done; [ -b /dev/vda2 ]")
            await run("mkfs.vfat -n ESP /dev/vda1 && mkfs.ext4 -q -F -L root /dev/vda2")
            await run("mkdir -p /mnt/esp /mnt/root && mount -t vfat /dev/vda1 /mnt/esp && mount /dev/vda2 /mnt/root")
            printed = await run("parted -s /dev/vda print")
            assert "gpt" in printed and "esp" in printed and "ext4" in printed, printed

            payload = tmp_path / "payload.bin"
            payload.write_bytes(os.urandom(300_000))
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(payload), "/mnt/root/payload.bin")
                await sftp.put(str(payload), "/mnt/esp/PAYLOAD.BIN")
                await sftp.get("/mnt/esp/PAYLOAD.BIN", str(tmp_path / "back.bin"))
            assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
            sums = await run("sha256sum /mnt/root/payload.bin /mnt/esp/PAYLOAD.BIN")
            assert sums.count(hashlib.sha256(payload.read_bytes()).hexdigest()) == 2, sums
            await run("umount /mnt/esp /mnt/root")
            found = await run("blkid /dev/vda1 /dev/vda2")
            assert 'LABEL="ESP"' in found and 'TYPE="vfat"' in found and 'TYPE="ext4"' in found, found
            # (lsblk's FSTYPE would come from udev's database: there is no udev, ask blkid)
            tree = json.loads(await run("lsblk -J -b -o NAME,SIZE /dev/vda"))
            vda1, vda2 = tree["blockdevices"][0]["children"]
            assert (vda1["name"], vda1["size"], vda2["name"]) == ("vda1", 16 << 20, "vda2"), tree
            assert 40 << 20 < vda2["size"] < 48 << 20, tree  # the rest, less GPT and alignment
            provisioned = vm.elapsed

            # the server's last word; the connection dies with the machine
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.run("reboot -f"), 10)
        await vm.wait_for_exit(30)  # -no-reboot: the guest's reboot ends QEMU
        assert disk.read_bytes()[512:520] == b"EFI PART"
        timing("direct -kernel agent: QEMU start to phone-home", phoned)
        timing("direct -kernel agent: QEMU start to SSH session", connected)
        timing("direct -kernel agent: QEMU start to disk provisioned", provisioned)
    finally:
        await vm.stop()
        await server.stop()


@pytest.mark.vm
async def test_agent_stops_when_the_server_refuses_it(agent_image: AgentImage, tmp_path: Path) -> None:
    server = PhoneHomeServer(answers=[(403, "token not valid for this machine")])
    port = await server.start()
    vm = Vm(workdir=tmp_path, kernel=agent_image.kernel, initrd=agent_image.initrd,
            append=boot_args(url=f"http://10.0.2.2:{port}", mac=DEFAULT_MAC, token="stale"))  # fmt: skip
    try:
        await vm.start()
        await vm.wait_until(server.seen, timeout=120, what="POST /boot/.../phone-home")
        assert check_phone_home(server, vm, agent_image.version)["token"] == "stale"
        await vm.wait_for_serial(r"bootserver agent: phone-home to \S+ refused: server returned error: "
                                 r"HTTP/1.1 403 token not valid for this machine", timeout=20)  # fmt: skip
        await vm.wait_for_serial(r"not trying again", timeout=5)
        await vm.wait_for_serial(r"bootserver agent: ready", timeout=20)  # and it stays up
        await asyncio.sleep(4)  # a retry would have come after 1 s
        assert len(server.requests) == 1, vm.report()
        assert "retrying" not in vm.serial_log, vm.report()
    finally:
        await vm.stop()
        await server.stop()


@pytest.mark.vm
async def test_agent_retries_until_the_server_answers(agent_image: AgentImage, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: the server is "restarting"
    server = PhoneHomeServer(answers=[(503, "starting up")])
    vm = Vm(workdir=tmp_path, kernel=agent_image.kernel, initrd=agent_image.initrd,
            append=boot_args(url=f"http://10.0.2.2:{port}", mac=DEFAULT_MAC))  # fmt: skip
    try:
        await vm.start()
        await vm.wait_for_serial(r"phone-home to \S+ failed: .*refused\s+.*no bootserver answered; retrying in 1s",
                                 timeout=120)
        await server.start(port)
        await vm.wait_until(server.accepted, timeout=60, what="a phone-home after the server came up")
        assert len(server.requests) == 2, vm.report()  # the 503, then the one that worked
        assert check_phone_home(server, vm, agent_image.version)["token"] == ""
        await vm.wait_for_serial(r"failed: server returned error: HTTP/1.1 503 starting up\s+.*retrying in \d+s", 5)
        await vm.wait_for_serial(r"bootserver agent: phoned home to \S+ ok", timeout=20)
    finally:
        await vm.stop()
        await server.stop()


def test_compressed_modules_are_unpacked(tmp_path: Path) -> None:
    import lzma

    elf = b"\x7fELF" + bytes(range(256)) * 4
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "c.ko").write_bytes(elf)
    for name in ("a.ko.xz", "b.ko.gz", "c.ko"):
        assert contents.read_module(tmp_path / name) == elf, name
    assert contents.plain("kernel/drivers/net/virtio_net.ko.xz") == "kernel/drivers/net/virtio_net.ko"
    assert contents.module_name("kernel/net/core/fail-over.ko.zst") == "fail_over"


@pytest.mark.vm
async def test_agent_falls_back_to_a_peer_replica(agent_image: AgentImage, tmp_path: Path) -> None:
    """The replica that booted the node is down: the phone-home goes to the next of `peers` (config.json)."""
    server = PhoneHomeServer()
    port = await server.start()
    overlay = overlay_cpio({"mac": DEFAULT_MAC, "url": f"http://10.0.2.2:{free_port()}", "token": "t",
                            "peers": f"http://10.0.2.2:{free_port()} http://10.0.2.2:{port}", "authorized_keys": []})
    initrd = tmp_path / "initrd-with-overlay.img"
    initrd.write_bytes(concatenate_initrds([agent_image.initrd.read_bytes(), overlay]))
    vm = Vm(workdir=tmp_path, kernel=agent_image.kernel, initrd=initrd, append=boot_args())
    try:
        await vm.start()
        await vm.wait_until(server.accepted, timeout=120, what="a phone-home to the second peer")
        assert check_phone_home(server, vm, agent_image.version)["token"] == "t"
        assert len(server.requests) == 1 and vm.serial_log.count("failed: ") == 2, vm.report()  # the two dead ones
        await vm.wait_for_serial(rf"phoned home to http://10\.0\.2\.2:{port}/boot/\S+ ok", timeout=20)
    finally:
        await vm.stop()
        await server.stop()


@pytest.mark.parametrize("after", [0, 1, 2, 3, 10861458])
def test_the_overlay_starts_on_a_4_byte_boundary_after_the_initrds_before_it(after: int):
    """UEFI's kernel stub joins initrds unpadded, and the kernel reads newc padding by absolute offset: leading
    zeros (which it skips) put the overlay's first header on a 4-byte boundary, whatever came before."""
    config = {"mac": "52:54:00:00:00:07", "url": "http://10.0.2.2:8080", "token": "t", "authorized_keys": ["k"]}
    plain = overlay_cpio(config)
    padded = overlay_cpio(config, after=after)
    padding = len(padded) - len(plain)
    assert padded[padding:] == plain and not any(padded[:padding])
    assert (after + padding) % 4 == 0
    assert read_overlay(padded[padding:])["etc/bootserver/authorized_keys"] == b"k\n"
