"""What machines and browsers send, for tests against a served instance: a boot's token, a phone-home report,
the API's credential, the next server-sent event."""

from __future__ import annotations

import asyncio
import json
import re

import asyncssh

from bootserver.config import Config


async def boot_token(client, mac: str = "52-54-00-00-00-01") -> str:
    """Fetch the machine's script as iPXE would, and take the token off its kernel command line."""
    text = await (await client.get(f"/boot/{mac}.ipxe")).text()
    return re.search(r"bootserver\.token=(\S+)", text)[1]


def host_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip()


def report(token: str | None, **extra) -> dict:
    """A phone-home body as the agent sends it."""
    body = {"ip": "10.0.2.15", "host_key": host_key(), "kernel": "6.1",
            "disks": [{"name": "vda", "size_bytes": 64 << 20, "partitions": 0}], **extra}
    return body if token is None else {**body, "token": token}


def api_token(config: Config) -> str:
    """The API token a server made in its data_dir at start (no [server] api_token configured)."""
    return config.server.api_token or (config.server.data_dir / "api_token").read_text().strip()


def bearer(config: Config) -> dict[str, str]:
    """Headers for an API write (or a read with [server] pages = "token")."""
    return {"Authorization": f"Bearer {api_token(config)}"}


async def read_event(response, timeout: float = 5.0) -> dict[str, object]:
    """The next server-sent event with data: its fields (id, data), parsed as the browser would."""
    fields: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(response.content.readline(), timeout)).decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
        elif "data" in fields:
            return {"id": int(fields["id"]), "data": json.loads(fields["data"])}
        else:
            fields = {}
