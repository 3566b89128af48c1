"""Binary deployment: files, rendered config files, TLS certificates and systemd units, over SFTP.

What to deploy is a profile's `[profiles.X.deploy]` table, parsed into a `Deployment` by
`bootserver.config.deploy`; this module puts it on the node through a `Runner` (`provision.ssh`).
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
import jinja2

from ..config import Deployment, Unit
from ..errors import BootserverError

if TYPE_CHECKING:
    from .pki import IssuedCertificate
    from .ssh import Runner

# Signs a node's certificate request (PEM) with the server's CA, choosing the names itself.
Sign = Callable[[bytes], "IssuedCertificate"]

# Where unit files go inside the target root, and what the enable symlinks point at.
UNIT_DIR = "/etc/systemd/system"
# [Install] keys that `systemctl enable` turns into symlinks: key -> directory suffix (None: an alias).
INSTALL_LINKS: dict[str, str | None] = {"WantedBy": ".wants", "RequiredBy": ".requires",
                                        "UpheldBy": ".upholds", "Alias": None}
STEP = "deploy"
# `openssl req` insists on a configuration file, and the agent has no /usr/lib/ssl/openssl.cnf: this is
# all it needs (the subject comes from -subj). printf's format, for the node's shell.
OPENSSL_REQ_CONFIG = r"[req]\ndistinguished_name = dn\n[dn]\n"
CSR_BEGIN, CSR_END = "-----BEGIN CERTIFICATE REQUEST-----", "-----END CERTIFICATE REQUEST-----"


class DeployError(BootserverError):
    """One part of a deployment could not be put on the node; the message names the file or unit."""


# --- deploying ---------------------------------------------------------------------------------

async def deploy(runner: Runner, deployment: Deployment, *, target: str, context: dict[str, Any],
                 sign: Sign | None, render: Callable[[Path, dict[str, Any]], str]) -> None:
    """Put `deployment` onto the node under `target` ("/" for a diskless node, "/mnt" for a mounted disk).

    Binaries and config go first and units last, so a unit that starts finds everything it needs.
    The TLS key is made on the node; `sign` gets the node's certificate request and returns the certificate."""
    for item in deployment.files:
        await _put_file(runner.sftp, item.source, _under(target, item.dest), item.mode)
    for item in deployment.templates:
        await _put_bytes(runner.sftp, _render(render, item.source, context), _under(target, item.dest), item.mode)
    if deployment.tls_dir and sign is not None:
        await _deploy_tls(runner, _under(target, deployment.tls_dir), sign)
    if deployment.units:
        await _install_units(runner, deployment.units, target)
    if deployment.check:
        await runner.run(STEP, f"TARGET={shlex.quote(target)} sh -c {shlex.quote(deployment.check)}")


async def _deploy_tls(runner: Runner, tls: str, sign: Sign) -> None:
    """node.key made on the node (it never leaves it), node.crt signed for the request it sends, ca.crt.

    The new key is made beside node.key and renamed into place only once its certificate is signed, so
    a refused request leaves no key without a certificate."""
    key, fresh = f"{tls}/node.key", f"{tls}/.node.key.bootserver-tmp"
    csr = _csr_pem(await runner.run(STEP, _key_and_csr_command(tls, fresh)))
    try:
        issued = sign(csr.encode())
    except BootserverError as exc:
        await runner.run(STEP, f"rm -f {shlex.quote(fresh)}")
        raise DeployError(f"TLS certificate for {key}: {exc}") from None
    await runner.run(STEP, f"mv -f {shlex.quote(fresh)} {shlex.quote(key)}")
    await _put_bytes(runner.sftp, issued.cert_pem, f"{tls}/node.crt", 0o644)
    await _put_bytes(runner.sftp, issued.ca_pem, f"{tls}/ca.crt", 0o644)


def _key_and_csr_command(tls: str, key: str) -> str:
    """Shell for the node: an EC P-256 key at `key` (0600 from the start: umask), and its certificate
    request on stdout. Only the request comes back: the names in it are a placeholder the CA ignores."""
    return (f"set -e; mkdir -p {shlex.quote(tls)}; umask 077; conf=$(mktemp); trap 'rm -f \"$conf\"' EXIT; "
            f"printf '{OPENSSL_REQ_CONFIG}' > \"$conf\"; rm -f {shlex.quote(key)}; "
            f"openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {shlex.quote(key)}; "
            f"openssl req -new -sha256 -config \"$conf\" -subj /CN=node -key {shlex.quote(key)}")


def _csr_pem(stdout: str) -> str:
    """The PEM request in what `openssl req` printed."""
    start, end = stdout.find(CSR_BEGIN), stdout.find(CSR_END)
    if start < 0 or end < start:
        raise DeployError(f"the node printed no certificate request (expected {CSR_BEGIN}); it printed: "
                          f"{stdout.strip()[:200]!r}")
    return stdout[start:end + len(CSR_END)] + "\n"


def _under(target: str, path: str) -> str:
    """`path` (absolute, on the installed system) as seen from the node while it lives under `target`."""
    return posixpath.normpath(target.rstrip("/") + "/" + path.lstrip("/"))


def _render(render: Callable[[Path, dict[str, Any]], str], source: Path, context: dict[str, Any]) -> bytes:
    try:
        return render(source, context).encode()
    except jinja2.UndefinedError as exc:
        raise DeployError(f"template {source}: {exc} (the template context has: "
                          f"{', '.join(sorted(context)) or 'nothing'})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise DeployError(f"template {source}, line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise DeployError(f"template {source}: {exc}") from None


async def _put_file(sftp: asyncssh.SFTPClient, source: Path, dest: str, mode: int) -> None:
    tmp = await _prepare(sftp, dest)
    try:
        await sftp.put(str(source), tmp)
    except (OSError, asyncssh.SFTPError) as exc:
        raise DeployError(f"copying {source} to {dest} on the node: {_reason(exc)}") from exc
    await _commit(sftp, tmp, dest, mode)


async def _put_bytes(sftp: asyncssh.SFTPClient, data: bytes, dest: str, mode: int) -> None:
    tmp = await _prepare(sftp, dest)
    try:
        # Created with its final permissions: a private key is never readable by others, even briefly.
        attrs = asyncssh.SFTPAttrs(permissions=mode & 0o777)
        async with sftp.open(tmp, "wb", attrs, encoding=None) as f:
            await f.write(data)
    except asyncssh.SFTPError as exc:
        raise DeployError(f"writing {dest} on the node: {_reason(exc)}") from exc
    await _commit(sftp, tmp, dest, mode)


async def _prepare(sftp: asyncssh.SFTPClient, dest: str) -> str:
    """Make dest's directory; the temporary name to write to, beside dest so rename() stays atomic."""
    parent, name = posixpath.split(dest)
    tmp = posixpath.join(parent, f".{name}.bootserver-tmp")
    try:
        await sftp.makedirs(parent, exist_ok=True)
        # A leftover from a failed attempt would keep its old mode when opened again: start afresh.
        await _remove_if_present(sftp, tmp)
    except asyncssh.SFTPError as exc:
        raise DeployError(f"preparing {dest} on the node: {_reason(exc)}") from exc
    return tmp


async def _commit(sftp: asyncssh.SFTPClient, tmp: str, dest: str, mode: int) -> None:
    """Set the mode, then rename over dest: a half-written binary never sits at dest."""
    try:
        await sftp.chmod(tmp, mode)
        await sftp.posix_rename(tmp, dest)
    except asyncssh.SFTPError as exc:
        raise DeployError(f"moving {dest} into place on the node: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, asyncssh.SFTPError) else str(exc)


# --- systemd units -----------------------------------------------------------------------------

async def _install_units(runner: Runner, units: tuple[Unit, ...], target: str) -> None:
    for unit in units:
        await _put_file(runner.sftp, unit.source, _under(target, f"{UNIT_DIR}/{unit.source.name}"), 0o644)
    if target == "/":
        await _enable_live(runner, units)
    else:
        for unit in units:
            if unit.enable:
                await _enable_offline(runner, unit, target)


async def _enable_live(runner: Runner, units: tuple[Unit, ...]) -> None:
    """A diskless node runs systemd: let it enable and start the units, then insist they are running."""
    await runner.run(STEP, "systemctl daemon-reload")
    for unit in units:
        if unit.enable:
            name = shlex.quote(unit.source.name)
            await runner.run(STEP, f"systemctl enable --now {name}")
            await runner.run(STEP, f"systemctl is-active {name}")


async def _enable_offline(runner: Runner, unit: Unit, target: str) -> None:
    """What `systemctl --root=TARGET enable UNIT` does, for a disk where no systemd runs yet:
    a symlink per [Install] entry, pointing at the unit by its absolute path on the installed system."""
    name = unit.source.name
    links = install_links(name, unit.source.read_text())
    if not links:
        raise DeployError(f"unit {unit.source} has enable = true but no WantedBy=, RequiredBy= or Alias= in an "
                          f"[Install] section, so nothing would ever start it: add an [Install] section with "
                          f"e.g. WantedBy=multi-user.target to the unit, or set enable = false")
    pointee = f"{UNIT_DIR}/{name}"
    for link in links:
        path = _under(target, link)
        await _symlink(runner, pointee, path)
        # Read it back: a link that is not there means a unit that silently never starts.
        try:
            found = await runner.sftp.readlink(path)
        except asyncssh.SFTPError as exc:
            raise DeployError(f"enabling {name}: {path} is missing after creating it: {_reason(exc)}") from exc
        if found != pointee:
            raise DeployError(f"enabling {name}: {path} points at {found}, not {pointee}")


async def _symlink(runner: Runner, pointee: str, path: str) -> None:
    """`ln -sfn` on the node, not SFTP's SYMLINK: OpenSSH's sftp-server (which dropbear runs) takes
    that request's arguments in reverse order, and asyncssh only corrects for it when the SSH server
    itself says it is OpenSSH. -f replaces a link left by an earlier attempt, as systemctl does."""
    directory = shlex.quote(posixpath.dirname(path))
    await runner.run(STEP, f"mkdir -p {directory} && ln -sfn {shlex.quote(pointee)} {shlex.quote(path)}")


async def _remove_if_present(sftp: asyncssh.SFTPClient, path: str) -> None:
    try:
        await sftp.lstat(path)  # lstat, not exists(): a dangling link must go too
    except asyncssh.SFTPNoSuchFile:
        return
    await sftp.remove(path)


def install_links(name: str, text: str) -> list[str]:
    """The symlinks (absolute paths on the installed system) that enabling unit `name` creates.

    Parsed by hand, not with configparser: unit files repeat keys (WantedBy= twice adds both), hold
    space-separated lists, continue lines with a backslash, and an empty assignment resets the list."""
    values: dict[str, list[str]] = {key: [] for key in INSTALL_LINKS}
    section = None
    for line in _logical_lines(text):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Install" and "=" in line:
            key, _, value = line.partition("=")
            key = key.strip()
            if key in values:
                values[key] = values[key] + value.split() if value.strip() else []
    links = []
    for key, suffix in INSTALL_LINKS.items():
        for other in values[key]:
            links.append(f"{UNIT_DIR}/{other}{suffix}/{name}" if suffix else f"{UNIT_DIR}/{other}")
    return links


def _logical_lines(text: str) -> list[str]:
    """Lines with comments dropped and backslash continuations joined, as systemd reads them."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines
