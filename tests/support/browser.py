"""Debian's chromium driven by Playwright, on loopback or inside a lab's network namespace.

A missing chromium or playwright fails the test rather than skipping it: `./setup test` installs both.
Playwright's own browser downloads are never used (executable_path). Inside a namespace, chromium is started
through `ip netns exec` (a wrapper script as the executable): Playwright talks to it over a pipe, not the network,
so the browser sees only the lab's network and the test drives it from outside.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.asynccontextmanager
async def chromium(namespace: str | None = None, workdir: Path | None = None) -> AsyncIterator[Any]:
    """A headless browser; with `namespace` (and a `workdir` for its wrapper script), inside that namespace."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install playwright (never `playwright install`)")
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    executable = CHROMIUM
    if namespace is not None:
        assert workdir is not None, "a browser in a namespace needs a directory for its wrapper script"
        executable = workdir / "chromium-in-namespace"
        executable.write_text(f'#!/bin/sh\nexec ip netns exec {namespace} {CHROMIUM} "$@"\n')
        executable.chmod(0o755)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(executable), headless=True,
                                                   args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
