"""The environment `clipgallery serve` gives Reflex."""

import os

from clipgallery.config import Settings
from clipgallery.server import default_workers, node_bin_dir, reflex_env


def test_reflex_env_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("GRANIAN_WORKERS", raising=False)
    env = reflex_env("postgresql+psycopg://x/y", Settings(state_dir=tmp_path))
    assert env["DATABASE_URL"] == "postgresql+psycopg://x/y"
    assert env["REFLEX_USE_NPM"] == "1" and env["REFLEX_TELEMETRY_ENABLED"] == "false"
    assert env["PATH"].split(os.pathsep)[0] == str(node_bin_dir())
    # One worker per core, at most 4: each worker holds its own copy of the model.
    assert env["GRANIAN_WORKERS"] == str(default_workers())
    assert 1 <= default_workers() <= 4
    # Reflex's unchecked /_upload folder is never the gallery's upload directory.
    assert env["REFLEX_UPLOADED_FILES_DIR"] == str(tmp_path / "reflex-uploads")


def test_reflex_env_keeps_an_explicit_worker_count(monkeypatch):
    monkeypatch.setenv("GRANIAN_WORKERS", "7")
    assert reflex_env("postgresql+psycopg://x/y")["GRANIAN_WORKERS"] == "7"
