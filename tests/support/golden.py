"""Golden files: rendered scripts and configurations compared with tests/golden/NAME.

BOOTSERVER_UPDATE_GOLDEN=1 rewrites them (review the diff!)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from bootserver.booter import Urls

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
URLS = Urls(files="http://192.0.2.1:8080", api="http://192.0.2.1:8080")


def golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/NAME, its one-time token (fresh on every render) read as TOKEN."""
    path = GOLDEN / name
    token = re.search(r"bootserver\.token='?([^\s']+)", text)
    if token:
        text = text.replace(token[1], "TOKEN")
    if os.environ.get("BOOTSERVER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
