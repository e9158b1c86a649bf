"""Smoke test: `clipgallery serve` runs the whole production app without a model and stops cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

# The first run installs the frontend's npm packages and builds it; later runs take seconds.
STARTUP_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("clipgallery")
    if script.exists():
        return [str(script), "serve", "--port", str(port)]
    return [
        sys.executable,
        "-c",
        "import sys; from clipgallery.cli import main; sys.exit(main())",
        "serve",
        "--port",
        str(port),
    ]


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


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def _stop_postgres(pgdata: Path) -> None:
    servers = _postmasters(pgdata)
    for proc in servers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGINT)  # "fast" shutdown
    _, alive = psutil.wait_procs(servers, timeout=15)
    _kill_all(alive)


def _log_tail(log_path: Path, chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"


def test_serve_starts_without_model_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
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

    with log_path.open("wb") as log:
        server = subprocess.Popen(
            _serve_command(port), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    tree: list[psutil.Process] = [psutil.Process(server.pid)]
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        health = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"clipgallery serve exited with {server.returncode}:\n{_log_tail(log_path)}")
            with contextlib.suppress(psutil.NoSuchProcess):
                tree[1:] = psutil.Process(server.pid).children(recursive=True)
            try:
                health = httpx.get(f"{base}/api/health", timeout=10)
                break
            except httpx.TransportError:
                time.sleep(1)
        assert health is not None, f"no answer on port {port} within {STARTUP_TIMEOUT:.0f} s:\n{_log_tail(log_path)}"

        body = health.json()
        assert health.status_code == 200, body
        assert body["database"]["ok"] is True, body
        assert body["model"]["ok"] is False, body
        assert body["model"]["detail"].strip(), body
        assert body["images"] == 0, body

        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "<title>clipgallery</title>" in page.text

        assert _postmasters(pgdata), "the embedded PostgreSQL server is not running"
        tree[1:] = psutil.Process(server.pid).children(recursive=True)

        server.send_signal(signal.SIGTERM)
        try:
            returncode = server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"clipgallery serve did not stop within {STOP_TIMEOUT:.0f} s:\n{_log_tail(log_path)}")
        assert returncode == 0, _log_tail(log_path)

        _, left = psutil.wait_procs(tree[1:], timeout=10)
        assert not left, f"processes left behind: {[p.pid for p in left]}"
        deadline = time.monotonic() + 10
        while _postmasters(pgdata) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _postmasters(pgdata), "the embedded PostgreSQL server is still running"
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        _kill_all([p for p in tree if p.is_running()])
        _stop_postgres(pgdata)
