"""The agent image's Debian packages: which ones (apt-cache), and their .debs, cached and checked.

The host's own apt does the work (`apt-cache show`, `apt-get download`); the .debs are kept in
`cache_dir/debs` and only downloaded again when the candidate changes or a cached file fails its
SHA256 check. A `Suite` points apt at another Debian release than the host's (its lists kept apart, in the cache,
checked against Debian's archive keyring as the host's own are).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BootserverError

KERNEL_META_PACKAGE = "linux-image-amd64"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LISTS_MAX_AGE = 24 * 3600  # a suite's lists older than this are fetched again


@dataclass(frozen=True)
class Suite:
    """A Debian release apt reads beside the host's own: its lists in `state_dir`, nothing else of the host's
    apt touched (no sources.list entry, no `apt-get update` of the host)."""

    name: str
    state_dir: Path
    mirror: str = DEBIAN_MIRROR

    def options(self) -> list[str]:
        """apt's command-line settings that make it read this suite's lists only."""
        return ["-o", f"Dir::Etc::SourceList={self.state_dir / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
                "-o", f"Dir::State::Lists={self.state_dir / 'lists'}",
                "-o", f"Dir::Cache={self.state_dir / 'cache'}", "-o", "Acquire::Languages=none",
                # apt drops to its _apt user to download, which cannot write into root's cache directory
                *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else [])]

    def update(self, progress: Callable[[str], None]) -> None:
        """This suite's lists, fetched (`apt-get update`) unless fetched in the last day."""
        lists = self.state_dir / "lists"
        # A stamp of our own: apt dates the lists it writes with the mirror's Last-Modified, not the fetch.
        stamp = self.state_dir / "updated"
        if stamp.is_file() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        if not DEBIAN_KEYRING.is_file():
            raise BootserverError(f"{DEBIAN_KEYRING} is missing: apt-get install debian-archive-keyring")
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "sources.list").write_text(
            f"deb [signed-by={DEBIAN_KEYRING}] {self.mirror} {self.name} main\n")
        progress(f"apt-get update for Debian {self.name} ({self.mirror}), its lists in {lists}")
        run(["apt-get", *self.options(), "update"], what=f"apt-get update for Debian {self.name}")
        stamp.touch()


def run(cmd: list[str], *, what: str, check: bool = True) -> str:
    """cmd's stdout; a BootserverError if it is missing or (with check) fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise BootserverError(
            f"{what}: {cmd[0]} not found; building the agent image needs a Debian host with apt, dpkg and kmod"
        ) from e
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BootserverError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _apt_records(packages: Sequence[str], options: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """Each package's candidate record from `apt-cache show` (with apt `options`: a Suite's), as field -> value."""
    if not packages:
        return {}
    # not checked: apt-cache fails when it lacks any of them, and saying which is more useful
    text = run(["apt-cache", *options, "show", "--no-all-versions", *packages], what="apt-cache show", check=False)
    records: dict[str, dict[str, str]] = {}
    record: dict[str, str] = {}
    key = None
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if "Package" in record:
                records.setdefault(record["Package"], record)
            record, key = {}, None
        elif line[0] in " \t" and key:
            record[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            record[key] = value.strip()
    missing = [p for p in packages if "Version" not in records.get(p, {})]
    if missing:
        raise BootserverError(
            f"apt knows no package {', '.join(missing)}: the apt lists are empty or stale; "
            "run apt-get update (as root) and try again"
        )
    return records


def _dependencies(record: dict[str, str]) -> list[str]:
    """The packages record (Pre-)Depends on, without versions or architectures; of
    alternatives ("a | b") the first."""
    names = []
    for key in ("Pre-Depends", "Depends"):
        for dep in record.get(key, "").split(","):
            name = dep.split("|")[0].strip().split(" ")[0].split(":")[0]
            if name:
                names.append(name)
    return names


def current_kernel_package() -> str:
    """The linux-image-VERSION package that linux-image-amd64's candidate depends on."""
    record = _apt_records([KERNEL_META_PACKAGE])[KERNEL_META_PACKAGE]
    for name in _dependencies(record):
        if re.fullmatch(r"linux-image-\d.*", name):
            return name
    raise BootserverError(
        f"{KERNEL_META_PACKAGE} {record['Version']} depends on no linux-image-VERSION package "
        f"(Depends: {record.get('Depends', '')!r})"
    )


def library_closure(packages: Iterable[str]) -> list[str]:
    """packages plus, transitively, the library packages (lib*, zlib1g) they (Pre-)Depend on:
    what the programs' shared libraries come from. Other dependencies (openssh-client, logsave,
    dmsetup...) are left out."""
    order: list[str] = []
    todo = list(dict.fromkeys(packages))
    while todo:
        records = _apt_records(todo)
        order += todo
        found = (dep for name in todo for dep in _dependencies(records[name]))
        libraries = (dep for dep in found if dep.startswith("lib") or dep == "zlib1g")
        todo = [dep for dep in dict.fromkeys(libraries) if dep not in order]
    return order


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _deb_name(record: dict[str, str]) -> str:
    # apt-get download's own naming: the epoch's colon is URL-quoted
    version = record["Version"].replace(":", "%3a")
    return f"{record['Package']}_{version}_{record.get('Architecture', 'amd64')}.deb"


def fetch_debs(packages: Sequence[str], debs_dir: Path, progress: Callable[[str], None],
               suite: Suite | None = None) -> list[Path]:
    """The candidate .debs of packages (of the host's apt sources, or of `suite`) in debs_dir, downloaded (by one
    `apt-get download`) unless a copy that passes its SHA256 check is there already."""
    options = suite.options() if suite else []
    if suite:
        suite.update(progress)
    records = _apt_records(packages, options)
    debs: list[Path] = []
    wanted: list[dict[str, str]] = []
    for package in packages:
        record = records[package]
        deb = debs_dir / _deb_name(record)
        debs.append(deb)
        want = record.get("SHA256")
        if deb.is_file() and (want is None or _sha256(deb) == want):
            continue
        if "Filename" not in record:  # known only from dpkg's status: the apt lists lack it
            raise BootserverError(
                f"apt has no download source for {package} {record['Version']}: run apt-get update (as root)"
            )
        wanted.append(record)
    progress(f"{len(packages) - len(wanted)} packages cached, {len(wanted)} to download")
    if wanted:
        _download(wanted, debs_dir, progress, options)
    _prune_cache(packages, debs, debs_dir, progress)
    return debs


def _prune_cache(packages: Sequence[str], keep: list[Path], debs_dir: Path, progress: Callable[[str], None]) -> None:
    """Keep the cache bounded: older versions of these packages, and older kernels, go."""
    for package in packages:
        stale = set(debs_dir.glob(f"{glob.escape(package)}_*.deb"))
        if package.startswith("linux-image-"):
            stale |= set(debs_dir.glob("linux-image-[0-9]*.deb"))
        for old in stale - set(keep):
            progress(f"removing old {old.name} from the cache")
            old.unlink(missing_ok=True)


def _download(records: list[dict[str, str]], debs_dir: Path, progress: Callable[[str], None],
              options: Sequence[str]) -> None:
    """The .debs of records into debs_dir, by one `apt-get download`, each checked against its SHA256."""
    total = sum(int(r.get("Size", 0)) for r in records)
    label = f"downloading {len(records)} package{'s' if len(records) > 1 else ''}"
    names = ", ".join(f"{r['Package']} {r['Version']}" for r in records)
    progress(f"{label} ({total / 1e6:.1f} MB): {names}")
    last = [-1]
    with tempfile.TemporaryDirectory(prefix="download-", dir=debs_dir) as tmp:
        _apt_get_download(records, Path(tmp), lambda done: _show_bytes(progress, label, done, total, last), options)
        _show_bytes(progress, label, total, total, last)
        for record in records:
            got = Path(tmp) / _deb_name(record)
            if not got.is_file():
                left = sorted(p.name for p in Path(tmp).glob("*.deb"))
                raise BootserverError(f"apt-get download left no {got.name} (it left {left})")
            want = record.get("SHA256")
            if want is not None and _sha256(got) != want:
                raise BootserverError(f"{got.name}: SHA256 differs from the apt lists'")
            os.replace(got, debs_dir / got.name)


def _apt_get_download(records: list[dict[str, str]], into: Path, show: Callable[[int], None],
                      options: Sequence[str]) -> None:
    """Run `apt-get download` (with apt `options`) in the directory into, calling show with the bytes it has so
    far."""
    command = ["apt-get", *options, "download", *(f"{r['Package']}={r['Version']}" for r in records)]
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(command, cwd=into, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        except FileNotFoundError as e:
            raise BootserverError("apt-get not found; building the agent image needs a Debian host with apt") from e
        with proc:
            while proc.poll() is None:
                show(_tree_size(into))  # apt writes into the directory as it goes
                time.sleep(0.1)
        if proc.returncode != 0:
            output.seek(0)
            detail = output.read().decode(errors="replace").strip()
            raise BootserverError(
                f"apt-get download failed (exit {proc.returncode}): {detail} "
                "(if the apt lists are old, run apt-get update)"
            )


def _show_bytes(progress: Callable[[str], None], label: str, done: int, total: int, last: list[int]) -> None:
    """Download progress: progress.bar if it has one, else a message every 25 %."""
    bar = getattr(progress, "bar", None)
    if callable(bar):
        bar(label, done, total)
        return
    step = 4 if done >= total else int(4 * done / total) if total else 4
    if step != last[0]:
        last[0] = step
        progress(f"{label}: {min(1.0, done / total) if total else 1.0:.0%}")


def _tree_size(path: Path) -> int:
    size = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):  # renamed under us
                size += os.lstat(os.path.join(root, name)).st_size
    return size
