"""Build an installable Debian root filesystem: `bootserver image os debian`.

mmdebstrap (root mode as root, unshare mode otherwise) installs the minbase variant plus OS_PACKAGES
from the host's own Debian mirror into DATA_DIR/images/os/debian-SUITE.tar.zst, beside it
`debian-SUITE.tar.zst.sha256` (sha256sum's format) and `debian-SUITE.json`, the manifest: suite,
sources, packages with versions, kernel version, sizes, build seconds and the hash of the inputs.

The image is what every installed machine shares (os_customize.sh): a kernel and its initramfs in
/boot, GRUB for BIOS and EFI (grub-install, update-grub, no boot loader installed anywhere),
openssh-server without host keys, systemd-networkd and systemd-resolved enabled, root's password
locked, an empty /etc/machine-id. The install step adds each machine's own: fstab, hostname,
network configuration by MAC, the SSH host key the server made, the boot loader.

Where packages come from: only mirrors the host's apt is configured with (/etc/apt/sources.list
and sources.list.d/*.list, *.sources), unless --mirror or --security-mirror name others: the host's
mirror for its own codename, its -updates suite if the host uses one, and its -security mirror.

A build is cached by the hash of its inputs (suite, sources, packages, the customize hook, options):
with the same inputs the existing tarball is returned at once. The mirror's packages are not an
input: delete the manifest to build again with today's packages.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BootserverError

OS_PACKAGES: tuple[str, ...] = (
    "linux-image-cloud-amd64", "systemd-sysv", "systemd-resolved", "udev", "dbus", "openssh-server",
    "grub-pc-bin", "grub-efi-amd64-bin", "grub2-common", "iproute2", "ca-certificates", "curl", "python3", "zstd",
    # Secure Boot: Debian's Microsoft-signed shim and its signed GRUB, installed to the ESP by the install step
    "shim-signed", "grub-efi-amd64-signed",
)  # fmt: skip
# Documentation and translations nobody reads on a server (~65 MB unpacked); copyright files stay.
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
)  # fmt: skip
CUSTOMIZE_HOOK = Path(__file__).with_name("os_customize.sh")
FORMAT = 1  # bump when the build changes in a way the other inputs do not show
SUITE_NAME = re.compile(r"[a-z][a-z0-9.-]*")
APT_SOURCES = Path("/etc/apt")
TAIL_LINES = 30  # of mmdebstrap's output, in the error when it fails


@dataclass(frozen=True)
class AptSource:
    """One enabled `deb` entry of the host's apt configuration."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


@dataclass(frozen=True)
class OsRecipe:
    """What an OS image is built from: everything its cache key covers."""

    suite: str
    mirror: str
    security_mirror: str | None  # None: no security updates
    updates: bool  # also SUITE-updates from mirror
    packages: tuple[str, ...] = OS_PACKAGES

    def sources(self) -> list[str]:
        """The apt source lines, main suite first (as mmdebstrap takes them, and as the image keeps them)."""
        lines = [f"deb {self.mirror} {self.suite} main"]
        if self.updates:
            lines.append(f"deb {self.mirror} {self.suite}-updates main")
        if self.security_mirror:
            lines.append(f"deb {self.security_mirror} {self.suite}-security main")
        return lines

    def input_hash(self) -> str:
        inputs = {
            "format": FORMAT, "suite": self.suite, "sources": self.sources(), "packages": list(self.packages),
            "dpkg": list(DPKG_OPTIONS), "customize": hashlib.sha256(CUSTOMIZE_HOOK.read_bytes()).hexdigest(),
        }  # fmt: skip
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class OsImage:
    tarball: Path  # debian-SUITE.tar.zst
    sha256: str
    manifest: dict = field(compare=False)
    cached: bool = False  # returned from an earlier build with the same inputs

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.tarball)


def manifest_path(tarball: Path) -> Path:
    return tarball.with_name(tarball.name.removesuffix(".tar.zst") + ".json")


def sha256_path(tarball: Path) -> Path:
    return tarball.with_name(tarball.name + ".sha256")


# --- the host's apt sources --------------------------------------------------------------------


def host_apt_sources(etc_apt: Path = APT_SOURCES) -> list[AptSource]:
    """The enabled `deb` entries of sources.list and sources.list.d/*.list, *.sources (apt's own rule:
    other file names there are ignored)."""
    found: list[AptSource] = []
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if path.is_file():
            found += _one_line_sources(path.read_text())
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        found += _deb822_sources(path.read_text())
    return found


def _one_line_sources(text: str) -> list[AptSource]:
    found = []
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0])  # options, e.g. [signed-by=...]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            found.append(AptSource(words[1].rstrip("/"), (words[2],), tuple(words[3:])))
    return found


def _deb822_sources(text: str) -> list[AptSource]:
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites, components = tuple(fields.get("suites", "").split()), tuple(fields.get("components", "").split())
        found += [AptSource(uri.rstrip("/"), suites, components) for uri in fields.get("uris", "").split()]
    return found


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    text = os_release.read_text() if os_release.is_file() else ""
    match = re.search(r"^VERSION_CODENAME=\"?([\w.-]+)\"?$", text, re.MULTILINE)
    if match is None:
        raise BootserverError(
            f"{os_release} names no VERSION_CODENAME, so the host's mirrors are unknown: "
            "pass --mirror URL and --security-mirror URL|none"
        )
    return match.group(1)


def debian_recipe(
    suite: str = "bookworm",
    mirror: str | None = None,
    security_mirror: str | None = None,
    *,
    sources: Iterable[AptSource] | None = None,
    codename: str | None = None,
) -> OsRecipe:
    """The recipe for a Debian suite. mirror and security_mirror default to the host's ("none": no
    security mirror); sources and codename to the host's apt sources and /etc/os-release."""
    if not SUITE_NAME.fullmatch(suite):
        raise BootserverError(f"{suite!r} is not a Debian suite name (e.g. bookworm, trixie, stable)")
    host = list(host_apt_sources() if sources is None else sources)
    codename = codename or (host_codename() if mirror is None or security_mirror is None else "")
    main = next((s for s in host if codename in s.suites and "main" in s.components), None)
    if mirror is not None:
        updates = True  # left out later if that mirror does not publish it
    elif main is not None:
        mirror = main.uri
        updates = any(s.uri == mirror and f"{codename}-updates" in s.suites for s in host)
    else:
        listed = ", ".join(sorted({s.uri for s in host})) or "none"
        raise BootserverError(
            f"the host's apt sources have no Debian mirror for its own suite {codename!r} (sources: {listed}); "
            "pass --mirror URL"
        )
    if security_mirror is None:
        security = next((s for s in host if f"{codename}-security" in s.suites), None)
        security_mirror = security.uri if security else None
    elif security_mirror == "none":
        security_mirror = None
    return OsRecipe(suite, mirror.rstrip("/"), security_mirror.rstrip("/") if security_mirror else None, updates)


# --- checking the suite before the long build --------------------------------------------------


def _suite_published(mirror: str, suite: str, timeout: float = 10.0) -> bool | None:
    """Whether mirror has dists/SUITE (an InRelease or Release file); None when we cannot tell (the
    mirror is unreachable from here, or not HTTP: mmdebstrap will say)."""
    if not mirror.startswith(("http://", "https://")):
        return None
    for name in ("InRelease", "Release"):
        request = urllib.request.Request(f"{mirror}/dists/{suite}/{name}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return True
        except urllib.error.HTTPError as e:
            if e.code != 404:
                return None
        except (urllib.error.URLError, OSError):
            return None
    return False


def published_only(recipe: OsRecipe, progress: Callable[[str], None]) -> OsRecipe:
    """recipe without the -updates or -security suites its mirrors do not publish (sid has neither);
    an error naming the suite when the main mirror does not publish it."""
    if _suite_published(recipe.mirror, recipe.suite) is False:
        raise BootserverError(
            f"{recipe.mirror} has no suite {recipe.suite!r} (no dists/{recipe.suite}/InRelease): "
            "check --suite (e.g. bookworm, trixie, stable) and --mirror"
        )
    updates, security = recipe.updates, recipe.security_mirror
    if updates and _suite_published(recipe.mirror, f"{recipe.suite}-updates") is False:
        progress(f"{recipe.mirror} has no {recipe.suite}-updates: building without it")
        updates = False
    if security and _suite_published(security, f"{recipe.suite}-security") is False:
        progress(f"{security} has no {recipe.suite}-security: building without security updates")
        security = None
    return OsRecipe(recipe.suite, recipe.mirror, security, updates, recipe.packages)


# --- the build ---------------------------------------------------------------------------------


def build_os_image(recipe: OsRecipe, out_dir: Path, progress: Callable[[str], None] = print) -> OsImage:
    """out_dir/debian-SUITE.tar.zst with its .sha256 and .json manifest; the existing one when its
    manifest says it was built from the same inputs."""
    out_dir = Path(out_dir)
    tarball = out_dir / f"debian-{recipe.suite}.tar.zst"
    input_hash = recipe.input_hash()
    if (image := _cached(tarball, input_hash)) is not None:
        progress(f"cached: {tarball} ({_describe(image.manifest)})")
        return image

    used = published_only(recipe, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path(tarball).unlink(missing_ok=True)  # no stale manifest may vouch for a half-replaced tarball
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".debian-{recipe.suite}.", dir=out_dir) as tmp:
        facts = Path(tmp) / "facts"
        facts.mkdir()
        part = Path(tmp) / tarball.name  # mmdebstrap compresses by the name's suffix
        _mmdebstrap(used, part, facts, progress)
        seconds = time.monotonic() - started
        progress("computing the tarball's sha256")
        digest = _sha256(part)
        manifest = _manifest(used, input_hash, part, facts, digest, seconds)
        os.replace(part, tarball)
    _write_atomically(sha256_path(tarball), f"{digest}  {tarball.name}\n")
    _write_atomically(manifest_path(tarball), json.dumps(manifest, indent=2) + "\n")
    progress(f"built {tarball} in {seconds:.0f} s ({_describe(manifest)})")
    return OsImage(tarball, digest, manifest)


def _cached(tarball: Path, input_hash: str) -> OsImage | None:
    try:
        manifest = json.loads(manifest_path(tarball).read_text())
        digest = sha256_path(tarball).read_text().split()[0]
        size = tarball.stat().st_size
    except (OSError, ValueError, IndexError):
        return None
    if manifest.get("input_hash") != input_hash or manifest.get("size_bytes") != size:
        return None
    if manifest.get("sha256") != digest:
        return None
    return OsImage(tarball, digest, manifest, cached=True)


def _describe(manifest: dict) -> str:
    return (f"{manifest['size_bytes'] / 1e6:.1f} MB, {manifest['unpacked_bytes'] / 1e6:.0f} MB unpacked, "
            f"{len(manifest['packages'])} packages, kernel {manifest['kernel']}")


def _mmdebstrap_command(recipe: OsRecipe, target: Path) -> list[str]:
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise BootserverError("mmdebstrap not found: apt-get install mmdebstrap zstd (./setup does)")
    if shutil.which("zstd") is None:
        raise BootserverError("zstd not found (mmdebstrap compresses the tarball with it): apt-get install zstd")
    mode = "root" if os.geteuid() == 0 else "unshare"  # unshare: uidmap and a /etc/subuid range
    return [
        mmdebstrap, f"--mode={mode}", "--variant=minbase", "--format=tar",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        f'--customize-hook=sh {shlex.quote(str(CUSTOMIZE_HOOK))} "$1"',  # sh: an installed copy may lose its x bit
        recipe.suite, str(target), *recipe.sources(),
    ]  # fmt: skip


def _mmdebstrap(recipe: OsRecipe, target: Path, facts: Path, progress: Callable[[str], None]) -> None:
    """Run mmdebstrap, showing its phases ("I: ..." lines) with the time since it started."""
    command = _mmdebstrap_command(recipe, target)
    progress(f"mmdebstrap: Debian {recipe.suite} from {'; '.join(recipe.sources())}")
    env = {**os.environ, "BOOTSERVER_OS_FACTS": str(facts)}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", env=env) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith(("I: ", "W: ", "E: ")):
                progress(f"[{time.monotonic() - started:5.1f} s] {line[3:]}")
    if proc.returncode != 0:
        raise BootserverError(
            f"mmdebstrap failed (exit {proc.returncode}) building Debian {recipe.suite}; its last lines:\n"
            + "\n".join(tail)
        )


def _manifest(recipe: OsRecipe, input_hash: str, tarball: Path, facts: Path, digest: str, seconds: float) -> dict:
    packages = dict(line.split("\t", 1) for line in (facts / "packages").read_text().splitlines() if line)
    kernels = (facts / "kernels").read_text().split()
    if len(kernels) != 1:
        raise BootserverError(f"expected one kernel in the image's /lib/modules, found {kernels}")
    return {
        "distribution": "debian",
        "suite": recipe.suite,
        "sources": recipe.sources(),
        "kernel": kernels[0],
        "packages": packages,
        "size_bytes": tarball.stat().st_size,
        "unpacked_bytes": int((facts / "unpacked-bytes").read_text()),
        "sha256": digest,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input_hash": input_hash,
    }


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomically(dest: Path, text: str) -> None:
    part = dest.with_name(f".{dest.name}.part")
    part.write_text(text)
    os.replace(part, dest)
