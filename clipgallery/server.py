"""Run the web app: database first, then the Reflex production server on one port.

`reflex run --env prod` compiles the pages, builds the frontend with npm (Node.js >= 22.22; not
again while its sources are unchanged: `frontend_build`) and serves the static frontend, the
`/_event` websocket, `/_upload` and the FastAPI routes under `/api` from a single process on one
port. This module prepares its environment: the database URL (starting the embedded PostgreSQL
server when none is configured), the schema, and a PATH on which `node` is the project's own
Node.js 22 (see `make install`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from clipgallery import db
from clipgallery.appclient import recorded_app
from clipgallery.config import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

NODE_VERSION = "22.23.3"
NODE_PREFIX = PROJECT_ROOT / ".tools" / "node22"
ENVS = ("prod", "dev")
# After a stop request, how long the app may take to shut down before it is killed.
STOP_GRACE_SECONDS = 20.0


def node_bin_dir() -> Path:
    """The bin directory of the Node.js 22 that `make install` puts under .tools/node22.

    The npm registry's `node-<os>-<arch>` packages carry the official Node.js binaries.
    """
    system = {"linux": "linux", "darwin": "darwin"}.get(sys.platform, sys.platform)
    machine = platform.machine().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return NODE_PREFIX / "node_modules" / f"node-{system}-{arch}" / "bin"


def reflex_env(database_url: str, settings: Settings | None = None) -> dict[str, str]:
    """Environment for a `reflex` subprocess serving this app.

    Copies the current environment (so CLIPGALLERY_* settings reach the app) and adds the
    database URL, Node.js 22 first on PATH, npm instead of bun, and no network calls home.
    With `settings`, Reflex's own upload directory is an empty folder under the state directory:
    Reflex serves that folder at /_upload without any access check, and clipgallery never writes
    uploads there (they go through the service layer into the gallery's upload directory, which
    only /files serves, with the private-gallery check).
    """
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    path = [str(node_bin_dir()), str(Path(sys.executable).parent), env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(p for p in path if p)
    env["REFLEX_USE_NPM"] = "1"
    env["REFLEX_TELEMETRY_ENABLED"] = "false"
    env["REFLEX_CHECK_LATEST_VERSION"] = "0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if settings is not None:
        env["REFLEX_UPLOADED_FILES_DIR"] = str(settings.state_dir / "reflex-uploads")
    return env


def reflex_command(port: int, env: str = "prod") -> list[str]:
    """The `reflex run` command line; prod serves frontend and backend on `port` alone, and does
    not rebuild a frontend whose sources are those of its last build (`frontend_build`)."""
    if env not in ENVS:
        raise ValueError(f"env must be one of {', '.join(ENVS)}, got {env!r}")
    if env == "prod":
        command = [sys.executable, "-m", "clipgallery.frontend_build", "run", "--env", env]
        return [*command, "--single-port", "--frontend-port", str(port), "--backend-port", str(port)]
    command = [sys.executable, "-m", "reflex", "run", "--env", env]
    # Development: Vite's dev server on `port`, the Python backend on the next one.
    return [*command, "--frontend-port", str(port), "--backend-port", str(port + 1)]


def serve(settings: Settings, port: int = 3000, env: str = "prod") -> int:
    """Prepare the database and run the web app until it exits or is told to stop.

    SIGINT and SIGTERM are passed on to the app's process group; a second signal, or an app
    that does not stop within STOP_GRACE_SECONDS, gets it killed. Returns the app's exit code
    (0 when it stopped because it was asked to). The embedded database server started here
    stops when this process exits.
    """
    from clipgallery.gallery import sweep_stale_pending
    from clipgallery.storage import Storage

    command = reflex_command(port, env)
    if not (node_bin_dir() / "node").exists():
        log.warning("Node.js 22 not found in %s; relying on `node` from PATH (run `make install`)", node_bin_dir())

    url = db.database_url(settings)
    db.migrate(settings)
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    # Files a process killed while storing or deleting images left without a row (an upload as
    # well as a bulk run): found through its record, not a walk over every file.
    with db.session_scope(settings) as session:
        removed = sweep_stale_pending(session, Storage(settings.upload_dir))
    if removed:
        log.info("removed %d stored files a killed process left without an image", len(removed))
    # The app opens its own connections; this process only keeps the embedded server alive.
    db.dispose_engines()

    child = subprocess.Popen(command, cwd=PROJECT_ROOT, env=reflex_env(url, settings), start_new_session=True)
    # The command line's searches ask this app while it runs (appclient).
    api_port = port if env == "prod" else port + 1
    with recorded_app(settings, f"http://127.0.0.1:{api_port}"):
        returncode, stop_signal = _run_until_stopped(child)
    if returncode < 0:
        returncode = 128 - returncode
    if stop_signal and returncode in (0, 128 + stop_signal, 128 + signal.SIGKILL):
        return 0
    return returncode


def _run_until_stopped(child: subprocess.Popen) -> tuple[int, int]:
    """Wait for the app's process, passing SIGINT and SIGTERM on to its group; (its return code,
    the signal that asked it to stop or 0)."""
    stop_requested_at: float | None = None
    stop_signal = 0

    def _signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested_at, stop_signal
        if stop_requested_at is None:
            stop_requested_at, stop_signal = time.monotonic(), signum
            _signal_group(signum)
        else:
            _signal_group(signal.SIGKILL)

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                returncode = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop_requested_at is not None and time.monotonic() - stop_requested_at > STOP_GRACE_SECONDS:
                    log.warning("the web app did not stop within %.0f s; killing it", STOP_GRACE_SECONDS)
                    _signal_group(signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # an exception in this process: do not leave the app behind
            _signal_group(signal.SIGTERM)
            try:
                child.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _signal_group(signal.SIGKILL)
                child.wait()
        # Workers left in the group (e.g. after the reflex process was killed) go too.
        _signal_group(signal.SIGKILL)
    return returncode, stop_signal
