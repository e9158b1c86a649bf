"""`clipgallery eval` end to end on tiny generated sets, with the tiny random model and the test
PostgreSQL server: the real ingest, real pgvector queries, and the files a run writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipgallery import cli
from clipgallery.datasets import LabelledImage, read_split
from clipgallery.evaluation import EvalOptions, pixel_distances, round_robin, run_eval
from clipgallery.metrics import METRIC_KEYS

COLOURS = {"red": (200, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 210)}


def _coloured(path: Path, base: tuple[int, int, int], seed: int) -> None:
    """Mostly the class colour (jittered), with a small rectangle of any colour."""
    rng = np.random.default_rng(seed)
    colour = tuple(int(np.clip(c + rng.integers(-35, 36), 0, 255)) for c in base)
    image = Image.new("RGB", (64, 48), colour)
    x, y = int(rng.integers(0, 48)), int(rng.integers(0, 32))
    ImageDraw.Draw(image).rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def colour_set(tmp_path) -> Path:
    """3 classes x 6 images, class folders under images/, plus labels.csv; one exact duplicate."""
    rows = []
    for c, (label, base) in enumerate(COLOURS.items()):
        for i in range(6):
            _coloured(tmp_path / "images" / label / f"{i}.png", base, seed=10 * c + i)
            rows.append([f"{label}/{i}.png", label])
    (tmp_path / "images" / "red" / "copy.png").write_bytes((tmp_path / "images" / "red" / "0.png").read_bytes())
    rows.append(["red/copy.png", "red"])
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["filename", "kind"], *rows])
    return tmp_path


def _eval_databases(pg_server) -> list[str]:
    out = pg_server.psql("SELECT datname FROM pg_database WHERE datname LIKE 'clipgallery_eval_%';")
    return [line.strip() for line in out.splitlines() if line.strip().startswith("clipgallery_eval_")]


def test_eval_end_to_end(settings, pg_server, colour_set, tmp_path):
    out = tmp_path / "report"
    report = run_eval(
        settings,
        EvalOptions(source=colour_set / "labels.csv", label_column="kind", out_dir=out, progress=False),
    )
    # Files and sections.
    markdown = (out / "report.md").read_text()
    for section in (
        "# Retrieval evaluation",
        "## Summary: mAP (%)",
        "## Text → image",
        "## Image → image",
        "## Exact scan vs HNSW index",
        "## Per class",
        "## Duplicates",
        "prompt template `a photo of a {}`",
        "32x32 RGB",
    ):
        assert section in markdown, section
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["info"]["images"] == 18 and data["info"]["duplicates_merged"] == 1
    assert data["info"]["classes"] == 3 and data["info"]["text_queries"] == 3
    expected_methods = {
        "model_cosine_hnsw",
        "model_cosine_exact",
        "model_l2_exact",
        "model_ip_exact",
        "model_l1_exact",
        "chance",
    }
    assert set(data["tasks"]["text_to_image"]) == expected_methods
    pixels = {"pixel_l1", "pixel_l2", "pixel_cosine", "pixel_correlation"}
    assert set(data["tasks"]["image_to_image"]) == expected_methods | pixels
    for task in data["tasks"].values():
        for method in task.values():
            assert set(METRIC_KEYS) <= set(method["metrics"])
    image_task = data["tasks"]["image_to_image"]
    # Every image queries the 17 others: 5 relevant each, nothing without relevant items.
    assert image_task["model_cosine_exact"]["metrics"]["queries"] == 18
    assert image_task["model_cosine_exact"]["metrics"]["without_relevant"] == 0
    assert set(image_task["model_cosine_hnsw"]["per_class"]) == set(COLOURS)
    assert image_task["model_cosine_hnsw"]["latency_ms"]["p50"] > 0
    # Colour-coded classes: the pixel baseline must find them (it really compares pixels).
    for key in pixels:
        assert image_task[key]["metrics"]["map"] > 0.95, (key, image_task[key]["metrics"])
        assert image_task[key]["metrics"]["recall@1"] == 1.0
    # On unit vectors cosine, L2 and inner product rank identically (exact scans).
    for key in ("model_l2_exact", "model_ip_exact"):
        assert image_task[key]["metrics"]["map"] == pytest.approx(image_task["model_cosine_exact"]["metrics"]["map"])
    # Chance: 5 relevant among 17 candidates.
    assert image_task["chance"]["metrics"]["precision@10"] == pytest.approx(5 / 17)
    assert "image_to_image" in data["hnsw_vs_exact"]
    assert report.summary_lines()[0] == "text → image:"
    # The evaluation database is gone, and the gallery's own database untouched.
    assert _eval_databases(pg_server) == []
    from clipgallery import db
    from clipgallery.gallery import count_images

    with db.session_scope(settings) as session:
        assert count_images(session) == 0


def test_eval_command_with_a_new_split(settings, pg_server, colour_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    split_file = tmp_path / "splits" / "colours.csv"
    out = tmp_path / "cli-report"
    argv = [
        "eval", str(colour_set / "images"), "--write-split", str(split_file), "--test-fraction", "0.5",
        "--seed", "3", "--metrics", "cosine", "--prompt-template", "{} things", "--out", str(out), "-q",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "image → image:" in printed and "report.md" in printed
    split = read_split(split_file)
    assert len(split) == 19  # class folders: the duplicate copy is an item of its own
    data = json.loads((out / "results.json").read_text())
    tested = [k for k, side in split.items() if side == "test"]
    assert data["info"]["images"] + data["info"]["duplicates_merged"] == len(tested)
    assert data["info"]["split"]["side"] == "test" and data["info"]["split"]["seed"] == 3
    assert data["info"]["prompt_template"] == "{} things"
    assert set(data["tasks"]["text_to_image"]) == {"model_cosine_hnsw", "model_cosine_exact", "chance"}
    assert "clipgallery eval" in (out / "report.md").read_text()
    assert _eval_databases(pg_server) == []
    # Bad input is an error message, not a traceback.
    assert cli.main(["eval", str(colour_set / "labels.csv"), "-q"]) == 1
    assert "label column" in capsys.readouterr().err


def test_eval_captions(settings, pg_server, colour_set, tmp_path):
    with (colour_set / "captions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for label in COLOURS:
            for i in range(2):
                writer.writerow([f"{label}/{i}.png", f"a {label} square"])
                writer.writerow([f"{label}/{i}.png", f"something {label}"])
    out = tmp_path / "captions-report"
    run_eval(
        settings,
        EvalOptions(
            source=colour_set / "captions.csv", captions=True, metrics=("cosine",), out_dir=out, progress=False
        ),
    )
    data = json.loads((out / "results.json").read_text())
    assert list(data["tasks"]) == ["text_to_image"]  # no classes, no image → image
    text_task = data["tasks"]["text_to_image"]["model_cosine_exact"]["metrics"]
    assert text_task["queries"] == 12 and text_task["scored"] == 12
    assert data["tasks"]["text_to_image"]["chance"]["metrics"]["recall@1"] == pytest.approx(1 / 6)
    assert "## Per class" not in (out / "report.md").read_text()
    assert _eval_databases(pg_server) == []


def test_pixel_distances_match_their_definitions():
    rng = np.random.default_rng(0)
    pixels = rng.random((5, 12))
    rows = slice(1, 3)
    l1 = np.abs(pixels[1:3, None] - pixels[None]).sum(-1)
    assert pixel_distances(pixels, rows, "l1") == pytest.approx(l1)
    l2 = np.sqrt(((pixels[1:3, None] - pixels[None]) ** 2).sum(-1))
    assert pixel_distances(pixels, rows, "l2") == pytest.approx(l2, abs=1e-6)  # sqrt of a rounding error at 0
    unit = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
    assert pixel_distances(pixels, rows, "cosine") == pytest.approx(1 - unit[1:3] @ unit.T)
    assert pixel_distances(pixels, rows, "correlation") == pytest.approx(1 - np.corrcoef(pixels)[1:3])


def test_round_robin_limit_keeps_every_class():
    items = [LabelledImage(f"{c}/{i}", Path(f"/{c}/{i}"), c) for c in "abc" for i in range(5)]
    chosen = round_robin(items, 7)
    assert [i.key for i in chosen] == ["a/0", "b/0", "c/0", "a/1", "b/1", "c/1", "a/2"]
