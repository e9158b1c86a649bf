"""The command line, run as a user runs it: a separate process, configured by environment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import jpeg


@pytest.fixture
def run(settings):
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "CLIPGALLERY_MODEL": settings.model_name,
        "CLIPGALLERY_UPLOAD_DIR": str(settings.upload_dir),
        "CLIPGALLERY_STATE_DIR": str(settings.state_dir),
        "COLUMNS": "160",
    }

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "clipgallery.cli", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def test_index_search_and_status_from_the_command_line(tmp_path, run):
    folder = tmp_path / "pics"
    folder.mkdir()
    for n in range(5):
        (folder / f"holiday_{n}.jpg").write_bytes(jpeg(300 + n))

    indexed = run("index", str(folder), "--quiet")
    assert indexed.returncode == 0, indexed.stderr
    assert "indexed 5," in indexed.stdout

    found = run("search", "a", "sunny", "beach", "-k", "3")
    assert found.returncode == 0, found.stderr
    # Five images: far below the size that gets a vector index, every vector is compared.
    assert "“a sunny beach”" in found.stdout and "cosine, exact scan" in found.stdout
    assert found.stdout.count("holiday ") == 3
    assert "more results: --offset 3" in found.stdout

    # For scripts: the same results with their files (where `index` found them), or the files alone.
    as_json = run("search", "a", "sunny", "beach", "-k", "3", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["query"] == {"text": "a sunny beach"} and report["has_more"]
    assert [r["rank"] for r in report["results"]] == [1, 2, 3]
    names = [r["name"] for r in report["results"]]
    assert [r["files"][0] for r in report["results"]] == [str(folder / f"{n.replace(' ', '_')}.jpg") for n in names]
    paths = run("search", "--similar", str(report["results"][0]["id"]), "-k", "2", "--format", "paths")
    assert paths.returncode == 0, paths.stderr
    assert len(paths.stdout.split()) == 2 and all(Path(line).parent == folder for line in paths.stdout.split())

    by_image = run("search", "--image", str(folder / "holiday_2.jpg"), "-k", "1", "--exact")
    assert by_image.returncode == 0, by_image.stderr
    assert "holiday 2" in by_image.stdout and "1.000" in by_image.stdout and "exact scan" in by_image.stdout

    status = run("status")
    assert status.returncode == 0 and "images:   5" in status.stdout
    assert "index:    none: fewer than 5,000 vectors" in status.stdout

    sql = run("db", "psql", "-At", "-c", "SELECT count(*) FROM images")
    assert sql.returncode == 0, sql.stderr
    assert sql.stdout.strip() == "5"


def test_sweep_files_removes_stored_files_without_an_image(tmp_path, run, settings):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "kept.jpg").write_bytes(jpeg(700))
    assert run("index", str(folder), "--quiet").returncode == 0
    # A file restored from a backup newer than the database dump: no row refers to it.
    stray = settings.upload_dir / "originals" / "ab" / "cd" / "stray.jpg"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(jpeg(701))

    spared = run("sweep-files")  # younger than the default 10 minutes
    assert spared.returncode == 0, spared.stderr
    assert stray.exists() and "0 stored files without an image removed" in spared.stdout
    swept = run("sweep-files", "--min-age", "0")
    assert swept.returncode == 0, swept.stderr
    assert not stray.exists() and "1 stored files without an image removed" in swept.stdout
    assert "originals/ab/cd/stray.jpg" in swept.stdout
    status = run("status")
    assert "images:   1" in status.stdout  # the indexed image and its files are untouched
    assert len(list((settings.upload_dir / "originals").rglob("*.jpg"))) == 1


def test_errors_are_one_clear_line_not_a_traceback(tmp_path, run):
    for args, words in [
        (("search", "x", "-k", "0"), "k must be between"),
        (("search", "--image", str(tmp_path / "missing.jpg")), "No such file"),
        (("search", "--similar", "424242"), "No image with id 424242"),
        (("index", str(tmp_path / "nowhere")), "is not a folder"),
    ]:
        result = run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr


def test_model_create_writes_a_loadable_model_directory(tmp_path, run):
    import open_clip  # noqa: F401  (the same process type the CLI uses)

    result = run("model", "create", str(tmp_path / "demo"), "--architecture", "RN50")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "open_clip_config.json").is_file()
    assert (tmp_path / "demo" / "open_clip_model.safetensors").is_file()
    assert f"CLIPGALLERY_MODEL={tmp_path / 'demo'}" in result.stdout


def test_admin_create_and_list(run):
    created = run("admin", "create", "root", "--password-stdin", stdin="a very long password\n")
    assert created.returncode == 0, created.stderr
    assert "created administrator root" in created.stdout
    weak = run("admin", "create", "other", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "at least 10 characters" in weak.stderr
    assert run("admin", "list").stdout.split() == ["root", "(admin)"]
