"""`reflex run --env prod` without rebuilding a frontend whose sources have not changed.

Reflex compiles the pages into the web directory (`.web`, or REFLEX_WEB_WORKDIR) and then runs
the production build (`npm run export`: vite) on every start, even when the compiled sources are
the ones of the last build: 16 of the 25 s from `clipgallery serve` to a page being served here
(AMD EPYC, 2 cores). `clipgallery serve` runs Reflex through this module, which skips that
build when everything it reads is unchanged and the last build's output is still there.

What the build reads, and so what the digest covers: every file of the web directory but the
build's output (and the route types it generates first), the installed packages (`node_modules`:
they follow from package.json and package-lock.json, which are covered) and `reflex.json` (Reflex
rewrites its last-run time on every start); the environment variables a build may read (VITE_*,
NODE_*, REFLEX_*); the Node.js it runs with; and rxconfig.py with the Reflex version, which decide
the steps after the build (the static output's compression, its path prefix). The digest is
written beside the output only after a build succeeded, and removed before a build starts, so an
interrupted build is redone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path

from clipgallery.config import PROJECT_ROOT
from clipgallery.storage import replace_file_text

BUILD_DIR = "build"  # reflex_base.constants.Dirs.BUILD_DIR
# What the build writes (its output; react-router's route types, which it generates first) and
# what a start rewrites without the build reading it.
NOT_INPUTS = frozenset({BUILD_DIR, ".react-router", "node_modules", "reflex.json"})
DIGEST_FILE = ".clipgallery-sources.sha256"  # inside the build directory: removed with it
ENV_PREFIXES = ("VITE_", "NODE_", "REFLEX_")
STATIC_DIR = Path(BUILD_DIR) / "client"  # reflex_base.constants.Dirs.STATIC: what the app serves


def _node_identity(environ: Mapping[str, str]) -> str:
    """The Node.js the build runs with: its path and version (an empty string without one)."""
    node = shutil.which("node", path=environ.get("PATH"))
    if node is None:
        return ""
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return f"{os.path.realpath(node)} {version}"


def sources_digest(web_dir: Path, environ: Mapping[str, str], project_root: Path = PROJECT_ROOT) -> str:
    """A digest of everything the production build of `web_dir` reads (see the module's doc)."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for path in sorted(_input_files(web_dir)):
        add(f"file {path.relative_to(web_dir).as_posix()}", path.read_bytes())
    for name in sorted(k for k in environ if k.startswith(ENV_PREFIXES)):
        add(f"env {name}", environ[name].encode())
    add("node", _node_identity(environ).encode())
    rxconfig = project_root / "rxconfig.py"
    add("rxconfig", rxconfig.read_bytes() if rxconfig.is_file() else b"")
    add("reflex", metadata.version("reflex").encode())
    return digest.hexdigest()


def _input_files(web_dir: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(web_dir):
        here = Path(root)
        if here == web_dir:
            dirs[:] = [d for d in dirs if d not in NOT_INPUTS]
            names = [n for n in names if n not in NOT_INPUTS]
        files.extend(here / n for n in names)
    return files


def is_current(web_dir: Path, digest: str) -> bool:
    """Whether `web_dir` holds a complete build of sources whose digest is `digest`."""
    build = web_dir / BUILD_DIR
    try:
        recorded = (build / DIGEST_FILE).read_text().strip()
    except OSError:
        return False
    return recorded == digest and (web_dir / STATIC_DIR).is_dir()


def cached_build(build: Callable[[], None], web_dir: Path, environ: Mapping[str, str]) -> Callable[[], None]:
    """`build` that does nothing when `web_dir` already holds the build of the same sources."""

    def build_unless_current() -> None:
        digest = sources_digest(web_dir, environ)
        if is_current(web_dir, digest):
            print("Frontend unchanged since its last build: not rebuilt.", flush=True)
            return
        (web_dir / BUILD_DIR / DIGEST_FILE).unlink(missing_ok=True)
        build()
        replace_file_text(web_dir / BUILD_DIR / DIGEST_FILE, digest + "\n")

    return build_unless_current


def main() -> None:
    """`python -m reflex` with the production build skipped when it would rebuild the same sources."""
    from reflex.reflex import cli
    from reflex.utils import build, prerequisites

    build.build = cached_build(build.build, prerequisites.get_web_dir(), os.environ)
    sys.argv[0] = "reflex"
    cli()


if __name__ == "__main__":
    main()
