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
from clipgallery.config import Settings
from clipgallery.datasets import LabelledImage, LabelledQuery, load_queries_csv, load_query_texts, read_split
from clipgallery.evaluation import (
    RAW_PROMPT,
    EvalOptions,
    item_texts,
    keyword_ranking,
    pixel_distances,
    prompt_variants,
    prompt_vectors,
    round_robin,
    run_eval,
)
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
    """3 classes x 6 images, class folders under images/, plus labels.csv (with a product-like
    title column, the class word in it); one exact duplicate."""
    rows = []
    for c, (label, base) in enumerate(COLOURS.items()):
        for i in range(6):
            _coloured(tmp_path / "images" / label / f"{i}.png", base, seed=10 * c + i)
            rows.append([f"{label}/{i}.png", label, f"{label.title()}  Tile {i}", "" if i % 2 else f"plain {label}"])
    (tmp_path / "images" / "red" / "copy.png").write_bytes((tmp_path / "images" / "red" / "0.png").read_bytes())
    rows.append(["red/copy.png", "red", "Red Tile copy", ""])
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["filename", "kind", "title", "note"], *rows])
    return tmp_path


def _eval_databases(pg_server) -> list[str]:
    out = pg_server.psql("SELECT datname FROM pg_database WHERE datname LIKE 'clipgallery_eval_%';")
    return [line.strip() for line in out.splitlines() if line.strip().startswith("clipgallery_eval_")]


def test_eval_end_to_end(settings, pg_server, colour_set, tmp_path):
    out = tmp_path / "report"
    report = run_eval(
        # The shipped threshold, under which a gallery this small has no HNSW index: the
        # evaluation's own database has one anyway, to compare it with the exact scan.
        settings.with_overrides(vector_index_min_vectors=Settings().vector_index_min_vectors),
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
    # Plus the raw class name beside the prompt; no hybrid or keyword rows without name templates.
    assert set(data["tasks"]["text_to_image"]) == expected_methods | {"model_cosine_hnsw_raw"}
    assert data["info"]["hybrid"]["run"] is False and "hybrid search: not run" in markdown
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
    assert set(data["tasks"]["text_to_image"]) == {
        "model_cosine_hnsw",
        "model_cosine_exact",
        "model_cosine_hnsw_raw",
        "chance",
    }
    assert "clipgallery eval" in (out / "report.md").read_text()
    assert _eval_databases(pg_server) == []
    # Bad input is an error message, not a traceback.
    assert cli.main(["eval", str(colour_set / "labels.csv"), "-q"]) == 1
    assert "label column" in capsys.readouterr().err
    bad = tmp_path / "bad-queries.csv"
    bad.write_text("words,kind\nsomething crimson,red\n")
    argv = ["eval", str(colour_set / "labels.csv"), "--label-column", "kind", "--queries", str(bad), "-q"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no query column" in err and "--query-column" in err and "words, kind" in err
    assert cli.main([*argv, "--query-column", "words", "--name-template", "{colour}"]) == 1
    assert "--name-template" in capsys.readouterr().err and _eval_databases(pg_server) == []


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


# --- free-text queries, hybrid search and prompt ensembles -------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_load_queries_csv(tmp_path):
    shipped = load_queries_csv(REPO / "docs" / "queries" / "fashion_label_free.csv")
    assert len(shipped) == 96 and shipped[0] == LabelledQuery("a plain tee", "Tshirts", 2)
    # Other column names: given explicitly, or the set's own label column as a fallback.
    path = tmp_path / "q.csv"
    path.write_text("phrase,articleType\n  a   plain tee ,Tshirts\n")
    with pytest.raises(ValueError, match=r"no query column .*--query-column.*columns are phrase, articleType"):
        load_queries_csv(path)
    assert load_queries_csv(path, query_column="phrase", extra_label_columns=["articleType"]) == [
        LabelledQuery("a plain tee", "Tshirts", 2)
    ]
    with pytest.raises(ValueError, match=r"no label column .*--query-label-column"):
        load_queries_csv(path, query_column="phrase")
    with pytest.raises(ValueError, match=r"no label column 'kind' \(--query-label-column\)"):
        load_queries_csv(path, query_column="phrase", label_column="kind")
    path.write_text("query,label\na tee,Tshirts\nshades,\n")
    with pytest.raises(ValueError, match=r"line 3: empty label"):
        load_queries_csv(path)
    path.write_text("query,label\na tee,Tshirts\na  tee,Tshirts\n")
    with pytest.raises(ValueError, match=r"line 3: repeats line 2"):
        load_queries_csv(path)


def test_load_query_texts_needs_no_labels(tmp_path):
    assert load_query_texts(REPO / "docs" / "queries" / "fashion_label_free.csv")[:2] == [
        "a plain tee",
        "a graphic tee with a print",
    ]
    path = tmp_path / "q.csv"
    path.write_text("text\n shades \nsneakers\n\nshades\n")
    assert load_query_texts(path) == ["shades", "sneakers"]  # blank rows and repeats dropped
    path.write_text("phrase\nshades\n")
    with pytest.raises(ValueError, match=r"no query column"):
        load_query_texts(path)
    assert load_query_texts(path, query_column="phrase") == ["shades"]
    path.write_text("query\n\n")
    with pytest.raises(ValueError, match=r"no queries"):
        load_query_texts(path)


def test_item_texts_render_like_training_captions():
    item = LabelledImage("x/1.png", Path("/x/1.png"), "red", metadata={"title": " Red   Tile ", "note": ""})
    assert item_texts(item, "{title}", "{note}") == ("Red Tile", "")
    assert item_texts(item, "{note}", "{label} thing") == ("x/1.png", "red thing")  # empty name: the key
    assert item_texts(item, None, None) == ("x/1.png", "")


def test_prompt_ensemble_is_the_normalised_mean(embedder):
    texts = ["red", "a blue square"]
    templates = ("a photo of a {}", "{} things")
    parts = [embedder.encode_texts([t.format(x) for x in texts]) for t in templates]
    parts = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts]
    mean = np.mean(parts, axis=0)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    got = prompt_vectors(embedder, texts, templates)
    assert got == pytest.approx(expected, abs=1e-5)
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert prompt_vectors(embedder, texts, templates[:1]) == pytest.approx(parts[0], abs=1e-6)
    assert prompt_variants(templates, RAW_PROMPT) == [(templates[0],), (templates[1],), templates]
    assert prompt_variants(("{}",), ("{}",)) == []


def test_keyword_only_ranks_the_one_matching_name_first(session, embedder, storage):
    from clipgallery.gallery import gallery_model_id
    from clipgallery.ingest import ingest_image
    from clipgallery.search import keyword_query, search_vector
    from tests.conftest import jpeg

    names = ["Blue Denim Jacket", "Red Cotton Dress", "Zebra Print Scarf", "Green Wool Hat", "Red Wool Scarf"]
    ids = [
        ingest_image(session, embedder, storage, jpeg(seed), f"{seed}.jpg", name, "").image_id
        for seed, name in enumerate(names)
    ]
    session.commit()
    model_id = gallery_model_id(session, embedder)
    ranking = keyword_ranking(session, model_id, keyword_query("a zebra, please"), 10)
    assert ranking == [ids[2], *sorted(set(ids) - {ids[2]})]  # the match, then the rest by id
    # More matching words rank higher (ts_rank_cd), as on the keyword side of hybrid search.
    assert keyword_ranking(session, model_id, keyword_query("red wool"), 2) == [ids[4], ids[1]]
    assert keyword_ranking(session, model_id, None, 10) == sorted(ids)
    # Hybrid search puts the only name match first too (with a query vector unrelated to it).
    vector = embedder.encode_text("a green hat")
    page = search_vector(session, embedder.settings, model_id, vector, k=5, keywords=keyword_query("zebra"))
    assert page.hybrid and page.hits[0].id == ids[2] and page.hits[0].text_match


def test_eval_queries_hybrid_and_prompt_ensemble(settings, pg_server, colour_set, tmp_path):
    queries = tmp_path / "queries.csv"
    queries.write_text(
        "query,class\nsomething crimson,red\nfresh grass,green\nthe clear sky,blue\na purple plum,purple\n"
    )
    out = tmp_path / "hybrid-report"
    templates = ("a photo of a {}", "{} things")
    report = run_eval(
        # Three classes: each class word is in a third of the titles, which hybrid search would
        # leave out as too common by default (hybrid_common_fraction 0.2; tested in test_hybrid_search).
        settings.with_overrides(hybrid_common_fraction=1.0),
        EvalOptions(
            source=colour_set / "labels.csv",
            label_column="kind",
            queries=queries,
            prompt_templates=templates,
            name_template="{title}",
            description_template="{note}",
            metrics=("cosine",),
            out_dir=out,
            progress=False,
        ),
    )
    data = json.loads((out / "results.json").read_text())
    info = data["info"]
    assert info["prompt_templates"] == list(templates) and info["hybrid"]["run"] is True
    assert info["queries"]["used"] == [
        ["something crimson", "red"],
        ["fresh grass", "green"],
        ["the clear sky", "blue"],
    ]
    assert info["queries"]["left_out"] == [{"query": "a purple plum", "label": "purple", "line": 5}]
    assert info["text_fields"]["examples"][0] == ["Red Tile 0", "plain red"]
    assert info["text_fields"]["names_from_template"] == 18 and info["text_fields"]["descriptions_from_template"] == 9
    common = {"model_cosine_hnsw", "model_cosine_exact", "hybrid_cosine_hnsw", "keyword_only", "chance"}
    # Class prompts: the ensemble is the main vector; raw and each template alone are variants.
    variants = {f"{kind}_cosine_hnsw_{v}" for kind in ("model", "hybrid") for v in ("raw", "prompt1", "prompt2")}
    assert set(data["tasks"]["text_to_image"]) == common | variants
    # Free-text queries: as typed is the main vector; each template and the ensemble are variants.
    variants = {f"{kind}_cosine_hnsw_{v}" for kind in ("model", "hybrid") for v in ("prompt1", "prompt2", "ensemble")}
    assert set(data["tasks"]["queries"]) == common | variants
    assert "hybrid_cosine_hnsw" not in data["tasks"]["image_to_image"]
    query_task = data["tasks"]["queries"]
    assert query_task["model_cosine_hnsw"]["metrics"]["queries"] == 3
    assert len(query_task["keyword_only"]["per_query"]) == 3
    # The titles hold the class word: keyword search alone finds each class perfectly (the leak the
    # label-free queries exist to rule out), and hybrid keeps it on top.
    class_task = data["tasks"]["text_to_image"]
    assert class_task["keyword_only"]["metrics"]["map"] == 1.0
    assert class_task["hybrid_cosine_hnsw"]["metrics"]["recall@1"] == 1.0
    # No query word occurs in any title or description: the keyword ranking is the id order.
    assert query_task["keyword_only"]["metrics"]["map"] == pytest.approx(
        np.mean([v["map"] for v in query_task["keyword_only"]["per_query"]])
    )
    markdown = (out / "report.md").read_text()
    for section in (
        "## Hybrid search: what each part contributes",
        "## Prompt variants",
        "## Free-text queries → image",
        "### Per query: average precision (%)",
        "| something crimson | red |",
        "line 5 `a purple plum` → purple",
        "prompt ensemble of 2 templates",
        "queries → image, hybrid",
    ):
        assert section in markdown, section
    assert "--name-template '{title}'" in info["command"] and "--prompt-template '{} things'" in info["command"]
    assert any(line.startswith("free-text queries → image:") for line in report.summary_lines())
    assert _eval_databases(pg_server) == []
