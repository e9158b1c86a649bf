"""Browser tests: the production app (`clipgallery serve`) on a real database, driven by
Debian's Chromium through pytest-playwright.

One app server per test session. Tests seed what they need through the same service functions
the app uses (`gallery` fixture) and must not depend on each other's data: use unique names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from clipgallery import auth, db
from clipgallery.config import Settings
from clipgallery.embedding import Embedder
from clipgallery.ingest import IngestOutcome, ingest_image
from clipgallery.storage import Storage
from tests.appserver import AppProcess, free_port

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


@dataclass
class Gallery:
    """Direct access to the app's database and files, for seeding and checking."""

    settings: Settings
    base_url: str
    embedder: Embedder

    @property
    def storage(self) -> Storage:
        return Storage(self.settings.upload_dir)

    def add_image(self, data: bytes, filename: str, name: str, description: str = "") -> IngestOutcome:
        with db.session_scope(self.settings) as session:
            outcome = ingest_image(session, self.embedder, self.storage, data, filename, name, description)
        assert outcome.status in ("added", "duplicate"), outcome.reason
        return outcome

    def create_admin(self, username: str, password: str = "a long test password") -> auth.CurrentUser:
        with db.session_scope(self.settings) as session:
            return auth.create_user(session, username, password, is_admin=True)

    def session_token(self, user: auth.CurrentUser) -> str:
        with db.session_scope(self.settings) as session:
            return auth.create_session(session, user, timedelta(hours=1))


@pytest.fixture(scope="session")
def app_server(pg_server, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-app")
    pg_server.psql('CREATE DATABASE "browser_gallery";')
    url = pg_server.get_uri("browser_gallery").replace("postgresql://", "postgresql+psycopg://", 1)
    settings = Settings(
        database_url=url,
        state_dir=root / "state",
        upload_dir=root / "uploads",
        model_name=str(tiny_model_dir),
        thumbnail_size=256,
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CLIPGALLERY_DATABASE_URL")}
    env.update(
        DATABASE_URL=url,
        CLIPGALLERY_STATE_DIR=str(settings.state_dir),
        CLIPGALLERY_UPLOAD_DIR=str(settings.upload_dir),
        CLIPGALLERY_MODEL=str(tiny_model_dir),
        CLIPGALLERY_THUMBNAIL_SIZE=str(settings.thumbnail_size),
        # Its own build directory: never rewrite the .web of a running `make run`.
        REFLEX_WEB_WORKDIR=str(root / "web"),
        # Test-only: lets "search by URL" tests fetch from a local image server.
        CLIPGALLERY_FETCH_ALLOW_HOSTS="127.0.0.1",
    )
    app = AppProcess(port, env, root / "serve.log")
    try:
        health = app.wait_until_healthy()
        assert health.status_code == 200, health.text
        yield app, settings
    finally:
        app.stop()


@pytest.fixture(scope="session")
def gallery(app_server) -> Gallery:
    app, settings = app_server
    embedder = Embedder(settings)
    embedder.load()
    return Gallery(settings=settings, base_url=app.base_url, embedder=embedder)


@pytest.fixture(scope="session")
def base_url(app_server) -> str:
    """pytest-playwright resolves relative page.goto() URLs against this."""
    return app_server[0].base_url


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
