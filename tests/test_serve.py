"""Smoke test: `clipgallery serve` runs the whole production app without a model and stops cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from clipgallery.appclient import RECORD_FILE, running_app_url
from clipgallery.config import Settings
from tests.appserver import STARTUP_TIMEOUT, STOP_TIMEOUT, free_port, kill_all, log_tail, start_serve

pytestmark = pytest.mark.slow


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    """Running PostgreSQL servers whose command line names this data directory."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres" and str(pgdata) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop_postgres(pgdata: Path) -> None:
    servers = _postmasters(pgdata)
    for proc in servers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGINT)  # "fast" shutdown
    _, alive = psutil.wait_procs(servers, timeout=15)
    kill_all(alive)


def _start(
    port: int, env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen, list[psutil.Process], httpx.Response]:
    """`clipgallery serve`, once it answers /api/health: (its process, its process tree so far, the answer)."""
    server = start_serve(port, env, log_path)
    tree: list[psutil.Process] = [psutil.Process(server.pid)]
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            kill_all(tree[1:])
            pytest.fail(f"clipgallery serve exited with {server.returncode}:\n{log_tail(log_path)}")
        with contextlib.suppress(psutil.NoSuchProcess):
            tree[1:] = psutil.Process(server.pid).children(recursive=True)
        try:
            return server, tree, httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10)
        except httpx.TransportError:
            time.sleep(1)
    kill_all(tree)
    pytest.fail(f"no answer on port {port} within {STARTUP_TIMEOUT:.0f} s:\n{log_tail(log_path)}")


def _stop_cleanly(server: subprocess.Popen, tree: list[psutil.Process], state_dir: Path, log_path: Path) -> None:
    """SIGTERM stops the app, its workers and the embedded server, and removes the app's record."""
    pgdata = state_dir / "pgdata"
    tree[1:] = psutil.Process(server.pid).children(recursive=True)
    server.send_signal(signal.SIGTERM)
    try:
        returncode = server.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"clipgallery serve did not stop within {STOP_TIMEOUT:.0f} s:\n{log_tail(log_path)}")
    assert returncode == 0, log_tail(log_path)
    assert not (state_dir / RECORD_FILE).exists(), "the app's record outlived it"

    _, left = psutil.wait_procs(tree[1:], timeout=10)
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    deadline = time.monotonic() + 10
    while _postmasters(pgdata) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _postmasters(pgdata), "the embedded PostgreSQL server is still running"
    assert not (pgdata / "postmaster.pid").exists()


def _assert_serves_the_frontend(base: str) -> None:
    """The home page, and the script it loads first: the static build is there and served."""
    page = httpx.get(f"{base}/", timeout=10)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "<title>clipgallery</title>" in page.text
    script = re.search(r'src="(/assets/[^"]+\.js)"', page.text) or re.search(r'href="(/assets/[^"]+\.js)"', page.text)
    assert script, page.text[:2000]
    asset = httpx.get(f"{base}{script.group(1)}", timeout=10)
    assert asset.status_code == 200 and asset.content, script.group(1)


def test_serve_starts_without_model_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    state_dir = tmp_path / "state"
    pgdata = state_dir / "pgdata"
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CLIPGALLERY_DATABASE_URL")}
    env.update(
        CLIPGALLERY_STATE_DIR=str(state_dir),
        CLIPGALLERY_UPLOAD_DIR=str(tmp_path / "uploads"),
        CLIPGALLERY_MODEL=str(tmp_path / "no-such-model"),
        # A build directory of its own, so the test never rewrites the .web of a running `make run`.
        REFLEX_WEB_WORKDIR=str(tmp_path / "web"),
    )
    base = f"http://127.0.0.1:{port}"
    # A process killed while storing an upload left its record of the files in flight and a file.
    uploads = tmp_path / "uploads"
    lost = uploads / "originals" / "ab" / "cd" / "lost.jpg"
    lost.parent.mkdir(parents=True)
    lost.write_bytes(b"not committed")
    (uploads / ".pending").mkdir()
    record = uploads / ".pending" / "0123456789abcdef.json"
    record.write_text('["originals/ab/cd/lost.jpg", "thumbs/ab/cd/lost.jpg"]')
    an_hour_ago = time.time() - 3600
    os.utime(record, (an_hour_ago, an_hour_ago))

    tree: list[psutil.Process] = []
    try:
        server, tree, health = _start(port, env, log_path)
        body = health.json()
        assert health.status_code == 200, body
        assert body["database"]["ok"] is True, body
        assert body["model"]["ok"] is False, body
        assert body["model"]["detail"].strip(), body
        assert body["images"] == 0, body
        assert not lost.exists() and not record.exists(), "the killed upload's file was not swept at start"
        # The command line's searches know where to ask (tests/test_appclient.py).
        assert running_app_url(Settings(state_dir=state_dir)) == base
        _assert_serves_the_frontend(base)
        assert "Creating Production Build" in log_path.read_text(errors="replace")
        assert _postmasters(pgdata), "the embedded PostgreSQL server is not running"
        _stop_cleanly(server, tree, state_dir, log_path)

        # Started again with nothing changed, it serves the frontend it built, without building it again.
        restart_log = tmp_path / "serve-again.log"
        server, tree, health = _start(port, env, restart_log)
        assert health.status_code == 200, health.text
        output = restart_log.read_text(errors="replace")
        assert "not rebuilt" in output and "Creating Production Build" not in output, output
        _assert_serves_the_frontend(base)
        _stop_cleanly(server, tree, state_dir, restart_log)
    finally:
        kill_all([p for p in tree if p.is_running()])
        _stop_postgres(pgdata)
