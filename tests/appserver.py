"""Starting and stopping the production app (`clipgallery serve`) from tests."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

# The first run installs the frontend's npm packages and builds it; later runs take seconds.
STARTUP_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("clipgallery")
    if script.exists():
        return [str(script), "serve", "--port", str(port)]
    return [sys.executable, "-m", "clipgallery.cli", "serve", "--port", str(port)]


PR_SET_PDEATHSIG = 1


def _stop_when_the_tests_die() -> None:
    """In the child, before exec: Linux sends it SIGTERM when the test process dies (a run killed
    by a timeout or a second Ctrl-C skips the fixtures' teardown), so an interrupted run does not
    leave the app, its workers and the embedded database behind (serve stops them on SIGTERM)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_serve(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`clipgallery serve` in its own process group, its output in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            serve_command(port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_stop_when_the_tests_die,
        )


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def log_tail(log_path: Path, chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"


class AppProcess:
    """`clipgallery serve` in its own process group, with its output in a log file."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://localhost:{port}"
        self.process = start_serve(port, env, log_path)
        self.tree: list[psutil.Process] = [psutil.Process(self.process.pid)]

    def wait_until_healthy(self, timeout: float = STARTUP_TIMEOUT) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"clipgallery serve exited with {self.process.returncode}:\n{self.log()}")
            self.note_children()
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/api/health", timeout=10)
            except httpx.TransportError:
                time.sleep(1)
        raise TimeoutError(f"no answer on port {self.port} within {timeout:.0f} s:\n{self.log()}")

    def wait_until_model_ready(self, timeout: float = 120.0) -> None:
        """The app preloads the model in the background; tests want it loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.wait_until_healthy().json()
            if body["model"]["ok"]:
                return
            if "loading" not in body["model"]["detail"]:
                raise RuntimeError(f"the model did not load: {body['model']['detail']}")
            time.sleep(0.5)
        raise TimeoutError(f"the model did not load within {timeout:.0f} s:\n{self.log()}")

    def note_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.tree[1:] = psutil.Process(self.process.pid).children(recursive=True)

    def log(self) -> str:
        return log_tail(self.log_path)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then whatever is left is killed. Returns serve's exit code (None if killed)."""
        self.note_children()
        returncode = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = self.process.wait(timeout=timeout)
        else:
            returncode = self.process.returncode
        kill_all([p for p in self.tree if p.is_running()])
        return returncode
