"""Browser tests: the production app (`app_server` and `gallery` fixtures in tests/conftest.py)
driven by Debian's Chromium through pytest-playwright.

One app server per test session. Tests seed what they need through the same service functions
the app uses (`gallery` fixture) and must not depend on each other's data: use unique names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Gallery  # noqa: F401  (the app fixtures live in tests/conftest.py)

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium, or set CHROMIUM_PATH")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "headless": True,
        "args": [
            "--no-sandbox",
            "--headless",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--disable-quic",
        ],
    }


@pytest.fixture(scope="session")
def base_url(app_server) -> str:
    """pytest-playwright resolves relative page.goto() URLs against this."""
    return app_server[0].base_url


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
