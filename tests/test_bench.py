"""`clipgallery bench` smoke run: the report is produced with the expected tables.

Speed is never asserted here (the bench prints numbers; tests check behaviour)."""

from __future__ import annotations

import json

import pytest

from clipgallery.bench import BenchOptions, remembered_sensitivity, run_bench, sensitivity_configs, size_database_name
from clipgallery.bench_report import write_report
from clipgallery.cli import build_parser
from clipgallery.embedding import ModelIdentity
from clipgallery.towers import native_bf16
from tests.conftest import fresh_database, picture


def test_bench_writes_the_report(pg_server, tiny_model_dir, tmp_path):
    images = tmp_path / "images"
    for offset, label in enumerate(("cats", "dogs")):
        (images / label).mkdir(parents=True)
        for i in range(10):
            picture(100 * offset + i).save(images / label / f"{i}.jpg", quality=90)
    recall_queries = tmp_path / "queries.csv"
    recall_queries.write_text("query,label\na cat on a sofa,cats\na puppy,dogs\nwhiskers,cats\n")
    options = BenchOptions(
        images=images,
        out=tmp_path / "report" / "benchmarks.md",
        sizes=(2000,),
        state_dir=tmp_path / "bench-state",
        model_dir=tiny_model_dir,
        batch_size=8,
        round_size=10,
        ef_values=(10, 40),
        queries=20,
        text_queries=6,
        recall_text_queries=recall_queries,
        exact_sql_queries=3,
        http=False,
        memory=False,
        torch_threads=1,  # a tiny model; fewer threads fight less with a busy machine
        extra_models=(tiny_model_dir,),  # the "trained model" fidelity path, on the tiny model
        database_url=fresh_database(pg_server, None),
        progress=False,
        command="clipgallery bench --test",
    )
    report = run_bench(options)
    markdown, json_path, plot = write_report(report, options.out)

    text = markdown.read_text()
    for heading in (
        "## Machine",
        "## Targets",
        "## Ingest",
        "## Precision fidelity",
        "## Text tower",
        "### Index build",
        "### Recall@10 and SQL latency per ef_search",
        "## Queries through the service",
    ):
        assert heading in text, heading
    assert "clipgallery bench --test" in text
    for row in (
        "model only, fp32",
        "clipgallery bulk index, int8",
        "chromadb `collection.add`",
        "numpy exact",
        "Chroma",
        "decode + thumbnail + preprocess, shipped",
        "decode + thumbnail + preprocess, decoded whole",
    ):
        assert row in text, row
    assert "| vector | 40 |" in text and "| halfvec | 10 |" in text
    assert plot is not None and plot.stat().st_size > 0

    data = json.loads(json_path.read_text())
    precisions = {"fp32", "int8", "bf16"} if native_bf16() else {"fp32", "int8"}
    assert set(data["ingest"]) == {f"{kind}_{p}" for kind in ("model", "clipgallery") for p in precisions} | {
        "chroma_fp32",
        "model_fp32_glibc",  # the seed-style pipeline's process: its own model, glibc's allocator defaults
    }
    assert all(p["images"] == 20 for p in data["ingest"].values())
    # CPU per pipeline: every process measures its own; the bulk index also PostgreSQL's (local here).
    assert all(p["cpu_seconds"] > 0 for p in data["ingest"].values())
    # (PostgreSQL's CPU is read in clock ticks: 20 tiny images may take less than one.)
    assert all(p["server_cpu_seconds"] >= 0 for k, p in data["ingest"].items() if k.startswith("clipgallery_"))
    assert all(p["server_cpu_seconds"] is None for k, p in data["ingest"].items() if not k.startswith("clipgallery_"))
    assert "CPU ms/image: process + PostgreSQL" in text
    size = data["sizes"]["2000"]
    assert set(size["curves"]) == {"vector", "halfvec"}
    # The graph-settings study ran, and was kept for the next run on this machine, data and server.
    assert len(size["sensitivity"]) == len(sensitivity_configs()) and size["sensitivity_measured_at"] is None
    assert "### Sensitivity" in text and "Measured by an earlier run" not in text
    (kept,) = options.state_dir.glob("sensitivity-*.json")
    assert json.loads(kept.read_text())["rows"] == size["sensitivity"]
    assert size["exact_sql"]["recall"] == 1.0 and size["numpy"]["recall"] == 1.0
    # The recall curves' text queries are the given file's; the image queries' beam is judged.
    assert size["queries_text"] == 3 and f"the queries of `{recall_queries}`" in text
    assert "shipped ef_search (image queries 40, text queries 200): near queries" in text
    assert set(data["fidelity"]) == precisions - {"fp32"}
    assert 0.0 <= data["fidelity"]["int8"]["image_top10_overlap"] <= 1.0
    # The shipped text tower (bf16 on CPUs with native bf16) beside fp32, in latency and fidelity.
    service = set(size["service"])
    assert {"text_default", "text_fp32_text", "repeated_default", "image_default", "image_other"} <= service
    # Beside the default image tower, the reduced precision that is not the default (int8 without bf16).
    others = {"int8", "bf16"} - {data["image_precision"]} if native_bf16() else {"int8"}
    assert data["other_image_precision"] in others
    assert f"| {data['other_image_precision']} image tower |" in text
    assert {"fp32/1", "int8/1"} <= set(data["text_tower"])
    (trained,) = data["trained_models"]
    # Each reduced-precision text tower against fp32, for the bench's model and the trained one.
    assert set(data["text_tower_fidelity"]) == set(trained["text"]) == precisions - {"fp32"}
    for measured in (*data["text_tower_fidelity"].values(), *trained["text"].values()):
        assert measured["cos_min"] >= 0.99 and 0.0 <= measured["top10_overlap"] <= 1.0
    assert trained["text_auto"] in ("int8", "bf16", "fp32")
    if trained["text_auto"] != "fp32":  # the reduced precision "auto" keeps for it is judged against the target
        assert f"{trained['text_auto']} text tower: top-10 overlap with fp32 ≥ 0.9 on trained model" in text
    assert "| int8 | " in text and "top-10 overlap text → image" in text
    if native_bf16():
        assert "bf16/1" in data["text_tower"]
        assert trained["text"]["bf16"]["cos_min"] >= 0.999
        assert trained["image_bf16"]["cos_min"] >= 0.999 and data["fidelity"]["bf16"]["cos_min"] >= 0.999

    # Throwaway databases are gone (small sizes are not kept).
    names = pg_server.psql("SELECT datname FROM pg_database WHERE datname LIKE 'bench_%';")
    assert "bench_" not in names.replace("datname", "")


def test_the_sensitivity_study_is_measured_once_per_identity(tmp_path):
    """Six index builds per run (33 minutes on a slow machine) for figures that depend only on the
    data, the graph settings, the machine and the server: measured once, then read back."""
    measured = []

    def measure(recall=0.9):
        measured.append(recall)
        return [{"m": 48, "recall": recall}]

    rows, when = remembered_sensitivity(tmp_path, "abc", measure)
    assert rows == [{"m": 48, "recall": 0.9}] and when is None and len(measured) == 1
    rows, when = remembered_sensitivity(tmp_path, "abc", measure)
    assert rows == [{"m": 48, "recall": 0.9}] and when and len(measured) == 1
    # Another machine, data set or server: measured for itself.
    remembered_sensitivity(tmp_path, "def", lambda: measure(0.8))
    assert len(measured) == 2
    # --rebuild measures again and keeps the new figures.
    rows, when = remembered_sensitivity(tmp_path, "abc", lambda: measure(0.95), rebuild=True)
    assert rows == [{"m": 48, "recall": 0.95}] and when is None
    assert remembered_sensitivity(tmp_path, "abc", measure)[0] == rows
    # A damaged file is measured again, not an error.
    (tmp_path / "sensitivity-abc.json").write_text("{not json")
    rows, when = remembered_sensitivity(tmp_path, "abc", measure)
    assert when is None and len(measured) == 4
    assert remembered_sensitivity(tmp_path, "abc", measure)[1] is not None


def test_kept_databases_are_one_per_size_and_model():
    """A bench of a trained model must not drop the default model's kept 1M set to build its own."""
    default = ModelIdentity("ViT-B-32", "sha256:aa", 512)
    trained = ModelIdentity("lit-rn", "sha256:bb", 384)
    assert size_database_name(1_000_000, default) == size_database_name(1_000_000, default)
    assert size_database_name(1_000_000, default) != size_database_name(1_000_000, trained)
    assert size_database_name(1_000_000, default) != size_database_name(100_000, default)
    assert size_database_name(1_000_000, default).startswith("bench_n1000000_")


def test_a_bad_recall_queries_file_is_refused_before_any_work(tmp_path):
    queries = tmp_path / "queries.csv"
    queries.write_text("phrase,label\nshades,Sunglasses\n")
    options = BenchOptions(recall_text_queries=queries, state_dir=tmp_path / "state", progress=False)
    with pytest.raises(ValueError, match=r"no query column .*--recall-query-column"):
        run_bench(options)
    assert not (tmp_path / "state").exists()  # nothing was created: no model, no database
    with pytest.raises(ValueError, match="no such file"):
        run_bench(BenchOptions(recall_text_queries=tmp_path / "missing.csv", progress=False))


def test_bench_command_line():
    args = build_parser().parse_args(["bench", "--quick", "--sizes", "10000,100_000", "--rebuild"])
    assert args.quick and args.rebuild and args.sizes == "10000,100_000"
    args = build_parser().parse_args(["bench", "--recall-queries", "q.csv", "--recall-query-column", "phrase"])
    assert (args.recall_queries, args.recall_query_column) == ("q.csv", "phrase")
    assert args.func.__name__ == "cmd_bench"
