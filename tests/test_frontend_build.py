"""The production build is skipped only when everything it reads is what the last build read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clipgallery import frontend_build
from clipgallery.frontend_build import BUILD_DIR, DIGEST_FILE, cached_build, is_current, sources_digest


def _web_dir(tmp_path: Path) -> Path:
    web = tmp_path / "web"
    (web / "app" / "routes").mkdir(parents=True)
    (web / "app" / "routes" / "index.jsx").write_text("export default () => 'search'")
    (web / "package.json").write_text('{"name": "reflex"}')
    (web / "reflex.json").write_text('{"last_run": 1}')
    (web / "node_modules" / "vite").mkdir(parents=True)
    (web / "node_modules" / "vite" / "index.js").write_text("// vite")
    return web


class FakeBuild:
    """Reflex's build: removes the old output, then writes a complete one."""

    def __init__(self, web: Path, fail: bool = False) -> None:
        self.web, self.fail, self.runs = web, fail, 0

    def __call__(self) -> None:
        self.runs += 1
        build = self.web / BUILD_DIR
        for path in sorted(build.rglob("*"), reverse=True) if build.exists() else []:
            path.rmdir() if path.is_dir() else path.unlink()
        if self.fail:
            raise SystemExit(1)
        (build / "client").mkdir(parents=True, exist_ok=True)
        (build / "client" / "404.html").write_text("<html></html>")


ENV = {"PATH": "", "HOME": "/home/a", "VITE_API": "x"}


def test_digest_follows_the_sources_and_the_build_environment(tmp_path: Path) -> None:
    web = _web_dir(tmp_path)
    first = sources_digest(web, ENV)
    assert sources_digest(web, ENV) == first

    # Written by every start, by the build, or installed from package.json: not inputs.
    (web / "reflex.json").write_text('{"last_run": 2}')
    (web / BUILD_DIR / "client").mkdir(parents=True)
    (web / BUILD_DIR / "client" / "index.html").write_text("built")
    (web / "node_modules" / "vite" / "index.js").write_text("// vite, reinstalled")
    assert sources_digest(web, {**ENV, "HOME": "/home/b"}) == first

    assert sources_digest(web, {**ENV, "VITE_API": "y"}) != first
    assert sources_digest(web, {**ENV, "REFLEX_FRONTEND_PATH": "/gallery"}) != first
    assert sources_digest(web, {**ENV, "NODE_OPTIONS": "--max-old-space-size=512"}) != first
    (web / "app" / "routes" / "index.jsx").write_text("export default () => 'search!'")
    assert sources_digest(web, ENV) != first
    # A nested reflex.json is a source like any other: only the top-level one is rewritten per start.
    (web / "app" / "routes" / "index.jsx").write_text("export default () => 'search'")
    (web / "app" / "reflex.json").write_text("{}")
    assert sources_digest(web, ENV) != first


def test_build_runs_once_per_sources_and_again_after_a_change(tmp_path: Path) -> None:
    web = _web_dir(tmp_path)
    build = FakeBuild(web)
    run = cached_build(build, web, ENV)

    run()
    assert build.runs == 1
    assert is_current(web, sources_digest(web, ENV))
    run()
    assert build.runs == 1, "unchanged sources were built again"

    (web / "app" / "routes" / "index.jsx").write_text("export default () => 'results'")
    run()
    assert build.runs == 2
    run()
    assert build.runs == 2


def test_an_incomplete_or_failed_build_is_redone(tmp_path: Path) -> None:
    web = _web_dir(tmp_path)
    build = FakeBuild(web)
    run = cached_build(build, web, ENV)
    run()
    shutil.rmtree(web / BUILD_DIR / "client")  # the output is gone, its digest left behind
    assert not is_current(web, sources_digest(web, ENV))
    run()
    assert build.runs == 2

    (web / "app" / "routes" / "index.jsx").write_text("export default () => 'changed'")
    failing = FakeBuild(web, fail=True)
    with pytest.raises(SystemExit):
        cached_build(failing, web, ENV)()
    assert not (web / BUILD_DIR / DIGEST_FILE).exists()
    run()
    assert build.runs == 3, "the sources of a failed build counted as built"


def test_digest_names_the_node_it_builds_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    web = _web_dir(tmp_path)
    monkeypatch.setattr(frontend_build, "_node_identity", lambda environ: "/opt/node22/bin/node v22.23.3")
    first = sources_digest(web, ENV)
    monkeypatch.setattr(frontend_build, "_node_identity", lambda environ: "/opt/node24/bin/node v24.1.0")
    assert sources_digest(web, ENV) != first
