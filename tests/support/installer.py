"""A site whose profile boots an installer with per-machine files ([profiles.X.files]), and fetching from it as a
machine at some loopback address would: over HTTP (a client bound to that address) and over TFTP (tftpy's).

    config = installer_site(tmp_path, {"preseed.cfg": "d-i netcfg/get_hostname string {{ hostname }}\\n"})
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import tftpy

from bootserver import config as configuration
from support.config import Value, section, server_section, toml_value

MAC = "52:54:00:00:16:01"
PATH = MAC.replace(":", "-")


def installer_site(tmp_path: Path, files: dict[str, str], *, cmdline: str = "console=ttyS0",
                   kernel: Path | None = None, initrd: Path | None = None, machines: str | None = None,
                   **server: Value) -> configuration.Config:
    """A site where every machine boots profile `installer`, whose files are `files` (name: template text, each
    written under data_dir/installer/); `kernel` and `initrd` default to small made-up files. [machines] holds
    MAC as "node1" with the label role = "installer" unless `machines` (its TOML) says otherwise; `server`: more
    [server] settings."""
    data = tmp_path / "data"
    (data / "installer").mkdir(parents=True)
    if kernel is None or initrd is None:
        (data / "images").mkdir()
        kernel, initrd = data / "images" / "vmlinuz", data / "images" / "initrd.img"
        kernel.write_bytes(b"k" * 4096)
        initrd.write_bytes(b"i" * 1024)
    for name, text in files.items():
        (data / "installer" / f"{name}.j2").write_text(text)
    text = (server_section(data, **server)
            + section("assets", kernel=kernel, initrd=initrd)
            + section("profiles.installer", kernel="kernel", initrd=["initrd"], cmdline=cmdline)
            + "[profiles.installer.files]\n"
            + "".join(f'{toml_value(name)} = "installer/{name}.j2"\n' for name in files)
            + section("groups.all", profile="installer")
            + (machines if machines is not None else f'[machines."{MAC}"]\nhostname = "node1"\n'
                                                     f'labels = {{ role = "installer" }}\n'))
    path = tmp_path / "site.toml"
    path.write_text(text)
    return configuration.load(path)


async def http_get(url: str, source: str = "127.0.0.1") -> tuple[int, str]:
    """GET `url` from the address `source`: the status and the body (or, refused, the reason)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.get(url) as response:
        return response.status, await response.text()


async def tftp_get(address: tuple[str, int], path: str, out: Path, source: str = "127.0.0.1") -> str:
    """Download `path` over TFTP from the address `source` into `out`: its text; a refusal raises tftpy's error."""
    client = tftpy.TftpClient(*address, localip=source)
    await asyncio.to_thread(client.download, path, str(out), timeout=5, retries=1)
    return out.read_text()
