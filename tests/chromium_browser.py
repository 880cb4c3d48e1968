"""Debian's real Chromium, driven by Playwright for Python (its own browser download is never
used: it cannot be fetched here). .ci/run installs the `chromium` package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000


@contextlib.contextmanager
def chromium_context(profile: Path, width: int, height: int) -> Iterator[Any]:
    """A fresh headless browser context (empty profile); every wait bounded by WAIT_MS."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package (`apt-get install "
            "chromium`; .ci/run does)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=WAIT_MS,
            viewport={"width": width, "height": height},
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()
