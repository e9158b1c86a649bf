"""`clipgallery eval`'s report: Markdown (tables per task, per class and per query, the prompts,
hybrid search), JSON and a plot, written from an `evaluation.EvalReport`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clipgallery.evaluation import (
    IMAGE_TASK,
    KEYWORD_METHOD,
    QUERY_TASK,
    TASK_TITLES,
    TEXT_TASK,
    EvalReport,
    MethodResult,
    hybrid_key,
    method_key,
    prompt_name,
)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: EvalReport) -> Path:
    data = {
        "info": report.info,
        "metric_definitions": {
            "recall@k": "hit rate: 1 if any relevant item is in the top k, else 0; mean over queries",
            "precision@10": "relevant items in the top 10 / 10",
            "map": "mean over queries of average precision over the full ranking, normalised by #relevant",
            "ndcg@10": "binary-relevance nDCG of the top 10",
            "scale": "fractions in [0, 1]; queries without relevant items are excluded and counted",
            "ties": "broken by image id ascending (ORDER BY distance, id)",
        },
        "classes": report.classes,
        "tasks": {task: {key: r.as_dict() for key, r in methods.items()} for task, methods in report.tasks.items()},
        "hnsw_vs_exact": report.index_comparison,
        "timings_seconds": report.timings,
    }
    report.json_path.write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")
    return report.json_path


def write_plot(report: EvalReport) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels: list[str] = []
    for methods in report.tasks.values():
        for result in methods.values():
            if result.label not in labels:
                labels.append(result.label)
    tasks = list(report.tasks)
    width = 0.8 / max(1, len(tasks))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(labels) + 2), 4.5), dpi=110)
    x = np.arange(len(labels))
    for i, task in enumerate(tasks):
        by_label = {r.label: r.scores["map"] for r in report.tasks[task].values()}
        heights = [100 * by_label[label] if label in by_label else 0.0 for label in labels]
        bars = ax.bar(x + (i - (len(tasks) - 1) / 2) * width, heights, width, label=TASK_TITLES[task])
        for bar, label in zip(bars, labels, strict=True):
            if label not in by_label:
                bar.set_alpha(0)  # method not run on this task (pixels have no text side)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("mAP (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report.name}: mean average precision ({report.info['images']} images)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(report.plot_path)
    plt.close(fig)
    return report.plot_path


def _pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _metrics_table(methods: dict[str, MethodResult]) -> list[str]:
    lines = [
        "| method | R@1 | R@5 | R@10 | P@10 | mAP | nDCG@10 | queries scored (no relevant) | p50 / p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in methods.values():
        s = r.scores
        latency = f"{r.latency_ms['p50']:.2f} / {r.latency_ms['p95']:.2f}" if r.latency_ms else "–"
        lines.append(
            f"| {r.label} | {_pct(s['recall@1'])} | {_pct(s['recall@5'])} | {_pct(s['recall@10'])} | "
            f"{_pct(s['precision@10'])} | **{_pct(s['map'])}** | {_pct(s['ndcg@10'])} | "
            f"{s.scored} ({s.without_relevant}) | {latency} |"
        )
    return lines


def _describe_selection(info: dict) -> str:
    parts = [f"{info['images']} of {info['items_in_source']} in the source"]
    split = info.get("split")
    if split:
        how = f"split `{split['file']}`, side **{split['side']}**"
        if split["written"]:
            how += f", written by this run: test fraction {split['test_fraction']}, seed {split['seed']}"
        parts[-1] += f" ({how})"
    if info.get("limit"):
        parts.append(f"limited to {info['limit']}, round-robin over classes")
    return (
        ", ".join(parts) + f"; {info['classes']} classes; duplicates merged: {info['duplicates_merged']}; "
        f"rejected: {len(info['rejected'])}"
    )


def _describe_prompts(info: dict) -> str:
    templates = info.get("prompt_templates")
    if not templates:
        return " (captions, as written)"
    if len(templates) == 1:
        return f", prompt template `{templates[0]}`"
    return (
        f", prompt ensemble of {len(templates)} templates: "
        + ", ".join(f"`{t}`" for t in templates)
        + (" (the mean of each template's L2-normalised text vector, re-normalised)")
    )


def _describe_queries(info: dict) -> list[str]:
    q = info.get("queries")
    if not q:
        return []
    line = (
        f"- free-text queries: `{q['file']}`, {len(q['used'])} of {q['loaded']} used, as typed (raw); "
        f"{len(q['left_out'])} left out (their label has no image here)"
    )
    if q["left_out"]:
        shown = "; ".join(f"line {x['line']} `{x['query']}` → {x['label']}" for x in q["left_out"][:10])
        line += f": {shown}" + (" …" if len(q["left_out"]) > 10 else "")
    return [line]


def _describe_text_fields(info: dict) -> str:
    t = info.get("text_fields")
    if not t:
        return "the dataset key as name, empty description (no label-like text to match)"
    parts = []
    if t["name_template"]:
        parts.append(
            f"name `{t['name_template']}` ({t['names_from_template']} of {info['images']} filled, else the key)"
        )
    if t["description_template"]:
        parts.append(
            f"description `{t['description_template']}` ({t['descriptions_from_template']} of {info['images']} filled)"
        )
    example = t["examples"][0] if t["examples"] else None
    return "; ".join(parts) + (f"; e.g. name {example[0]!r}, description {example[1]!r}" if example else "")


def _describe_hybrid(info: dict) -> str:
    h = info["hybrid"]
    if not h["run"]:
        return f"not run: {h['reason']}"
    return (
        f"reciprocal rank fusion of {h['metric']} (HNSW) and full-text search over names and descriptions, "
        f"rrf_k {h['rrf_k']}, depth {h['hybrid_depth']}; keywords: {h['keywords']}"
    )


def _hybrid_section(report: EvalReport) -> list[str]:
    """Vector-only, hybrid and keyword-only side by side per text task (the main prompt)."""
    metric = report.info["index"]["metric"]
    keys = [
        (method_key(metric, False), "vector only"),
        (hybrid_key(metric), "hybrid"),
        (KEYWORD_METHOD, "keyword only"),
    ]
    rows = [
        (task, methods) for task, methods in report.tasks.items() if task != IMAGE_TASK and KEYWORD_METHOD in methods
    ]
    if not rows:
        return []
    present = [(k, name) for k, name in keys if any(k in methods for _, methods in rows)]
    lines = [
        "## Hybrid search: what each part contributes",
        "",
        "mAP / R@1 / R@10 (%), main prompt of each task. Hybrid and vector-only use the same query vectors; "
        "keyword only is the full-text ranking alone (images without a match after it, by id).",
        "",
        "| task | " + " | ".join(f"{name} mAP / R@1 / R@10" for _, name in present) + " | hybrid − vector mAP |",
        "|---|" + "---:|" * (len(present) + 1),
    ]
    for task, methods in rows:
        cells = []
        for key, _ in present:
            r = methods.get(key)
            cells.append(
                "–"
                if r is None
                else f"{_pct(r.scores['map'])} / {_pct(r.scores['recall@1'])} / {_pct(r.scores['recall@10'])}"
            )
        vector, hybrid = methods.get(keys[0][0]), methods.get(keys[1][0])
        delta = f"{100 * (hybrid.scores['map'] - vector.scores['map']):+.1f}" if vector and hybrid else "–"
        lines.append(f"| {TASK_TITLES[task]} | " + " | ".join(cells) + f" | {delta} |")
    return [*lines, ""]


def _prompt_section(report: EvalReport) -> list[str]:
    """Every prompt variant of the text tasks, through the HNSW index, vector-only and hybrid."""
    metric = report.info["index"]["metric"]
    base, hybrid = method_key(metric, False), hybrid_key(metric)
    lines: list[str] = []
    for task, methods in report.tasks.items():
        variants = [k[len(base) + 1 :] for k in methods if k.startswith(base + "_")]
        if task == IMAGE_TASK or not variants:
            continue
        main = "raw query" if task == QUERY_TASK or report.info.get("captions") else "main prompt"
        templates = report.info.get("prompt_templates") or []
        if task == TEXT_TASK and templates:
            main = prompt_name(tuple(templates))
        rows = [("", main)] + [(v, methods[f"{base}_{v}"].label.split(", ", 1)[1]) for v in variants]
        if not lines:
            lines += [
                "## Prompt variants",
                "",
                f"mAP / R@1 (%) of the same queries under each prompt, {metric} through HNSW; the first row "
                "is the task's main prompt (class names: the configured template(s); free-text queries: as typed).",
                "",
            ]
        lines += [f"### {TASK_TITLES[task]}", "", "| prompt | vector only | hybrid |", "|---|---:|---:|"]
        for slug, what in rows:
            cells = []
            for prefix in (base, hybrid):
                r = methods.get(f"{prefix}_{slug}" if slug else prefix)
                cells.append("–" if r is None else f"{_pct(r.scores['map'])} / {_pct(r.scores['recall@1'])}")
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _per_query_section(report: EvalReport) -> list[str]:
    q = report.info.get("queries")
    methods = report.tasks.get(QUERY_TASK, {})
    base = method_key(report.info["index"]["metric"], False)
    wanted = {base, hybrid_key(report.info["index"]["metric"]), KEYWORD_METHOD}
    shown = [r for k, r in methods.items() if r.per_query is not None and (k in wanted or k.startswith(base + "_"))]
    if not q or not shown:
        return []
    lines = [
        "### Per query: average precision (%)",
        "",
        "| query | label | " + " | ".join(r.label for r in shown) + " |",
        "|---|---|" + "---:|" * len(shown),
    ]
    for i, (text_, label) in enumerate(q["used"]):
        cells = [_pct(r.per_query[i].average_precision) if r.per_query[i] else "–" for r in shown]
        lines.append(f"| {text_} | {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_markdown(report: EvalReport) -> Path:
    info = report.info
    model = info["model"]
    lines = [
        f"# Retrieval evaluation: {report.name}",
        "",
        f"- command: `{info['command']}`",
        f"- date: {info['date']}; machine: {info['machine']}",
        f"- source: `{info['source']}`"
        + (f", label column `{info['label_column']}`" if info.get("label_column") else "")
        + (", captions" if info["captions"] else ""),
        f"- images: {_describe_selection(info)}",
        f"- model: {model['architecture']} / {model['weights']} ({model['dimension']}-d), from `{model['source']}`",
        f"- text queries: {info['text_queries']}" + _describe_prompts(info),
        *_describe_queries(info),
        f"- names and descriptions: {_describe_text_fields(info)}",
        f"- hybrid search: {_describe_hybrid(info)}",
        f"- index: HNSW on {info['index']['metric']} (m {info['index']['hnsw_m']}, ef_construction "
        f"{info['index']['hnsw_ef_construction']}, ef_search {info['index']['hnsw_ef_search']} for text queries, "
        f"{info['index']['hnsw_ef_search_image']} for image queries); "
        "other metrics and `exact` run as sequential scans",
        f"- pixel baseline: {info['pixel_baseline']}",
        f"- evaluation database: `{info['database']}`",
        f"- time: indexing {report.timings['index_seconds']:.1f} s "
        f"({info['embed_images_per_second'] or 0:.1f} images/s), "
        f"SQL queries {report.timings['sql_query_seconds']:.1f} s, "
        f"pixel baseline {report.timings['pixel_seconds']:.1f} s, total {report.timings['total_seconds']:.1f} s",
        "",
        "Scores are percentages. Recall@K is the hit rate (any relevant image in the top K); "
        "P@10 divides by 10; mAP is average precision over the full ranking of every candidate; "
        "nDCG@10 uses binary relevance; queries without any relevant image are left out of the means "
        "and counted. Ties are broken by image id. @K metrics and latency come from the top-10 query a "
        "search runs; mAP from a full-depth query. Latency is one `search_vector` call (SQL + Python), "
        "from this process, on this machine.",
        "",
        "## Summary: mAP (%)",
        "",
        "| method | " + " | ".join(TASK_TITLES[t] for t in report.tasks) + " |",
        "|---|" + "---:|" * len(report.tasks),
    ]
    labels: dict[str, str] = {}
    for methods in report.tasks.values():
        for key, r in methods.items():
            labels.setdefault(key, r.label)
    # The model's rows first, then chance, then the pixel baseline.
    order = sorted(labels, key=lambda k: (k == "chance") + 2 * k.startswith("pixel_"))
    for key in order:
        cells = [_pct(report.tasks[t][key].scores["map"]) if key in report.tasks[t] else "n/a" for t in report.tasks]
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    if QUERY_TASK in report.tasks and info.get("prompt_templates"):
        lines += [
            "",
            f"Rows without a prompt named are each task's main prompt: class names in "
            f"{prompt_name(tuple(info['prompt_templates']))}; free-text queries as typed (the search box's way).",
        ]
    lines += ["", f"![mAP per method and task]({report.plot_path.name})", ""]
    lines += _hybrid_section(report)
    lines += _prompt_section(report)
    for task, methods in report.tasks.items():
        lines += [f"## {TASK_TITLES[task].capitalize()}", ""]
        lines += _metrics_table(methods)
        lines.append("")
        if task == QUERY_TASK:
            lines += _per_query_section(report)
    lines += ["## Exact scan vs HNSW index", ""]
    if report.index_comparison:
        lines += [
            "| task | ΔR@1 | ΔR@10 | ΔP@10 | ΔmAP | ΔnDCG@10 | HNSW top-10 ∩ exact top-10 | p50 ms exact → HNSW |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for task, c in report.index_comparison.items():
            d = c["delta"]
            lat = c["latency_ms"]
            lines.append(
                f"| {TASK_TITLES[task]} | {100 * d['recall@1']:+.1f} | {100 * d['recall@10']:+.1f} | "
                f"{100 * d['precision@10']:+.1f} | {100 * d['map']:+.1f} | {100 * d['ndcg@10']:+.1f} | "
                f"{_pct(c['top10_overlap_with_exact'])} % | {lat['exact']['p50']:.2f} → {lat['hnsw']['p50']:.2f} |"
            )
        lines += [
            "",
            "Δ = HNSW − exact, in percentage points (same metric, same vectors). The deep mAP query "
            "raises ef_search to the page depth, so ΔmAP understates what a shallow scan would lose; "
            "the top-10 overlap is the index's recall against the exact answer at the configured ef_search.",
            "",
        ]
    lines += _per_class_section(report)
    if info["duplicates_merged"]:
        lines += [
            "## Duplicates",
            "",
            f"{info['duplicates_merged']} items had the same bytes as an earlier item and were merged into it "
            "(left out of queries and relevance). Examples: "
            + ", ".join(f"`{a}` = `{b}`" for a, b in info["duplicate_examples"]),
            "",
        ]
    if info["rejected"]:
        lines += ["## Rejected images", ""] + [f"- `{k}`: {reason}" for k, reason in info["rejected"]] + [""]
    report.markdown_path.write_text("\n".join(lines))
    return report.markdown_path


def _per_class_section(report: EvalReport) -> list[str]:
    if not report.classes:
        return []
    metric = report.info["index"]["metric"]
    hnsw, hybrid = method_key(metric, False), hybrid_key(metric)
    columns: list[tuple[str, MethodResult | None]] = []
    for task, title in ((TEXT_TASK, "text → image"), (QUERY_TASK, "queries → image")):
        methods = report.tasks.get(task, {})
        if hnsw in methods:
            columns.append((title, methods[hnsw]))
        if hybrid in methods:
            columns.append((f"{title}, hybrid", methods[hybrid]))
    image_methods = report.tasks.get(IMAGE_TASK, {})
    pixels = {k: r for k, r in image_methods.items() if k.startswith("pixel_")}
    best_pixel = max(pixels.values(), key=lambda r: r.scores["map"]) if pixels else None
    columns += [("image → image", image_methods.get(hnsw)), ("pixel image → image", best_pixel)]
    lines = [
        "## Per class",
        "",
        f"AP (%) per class: text → image is the class prompt's AP; queries → image the mean AP of the class's "
        f"free-text queries; image → image the mean AP of the class's images as queries. Model = {metric} "
        "through HNSW" + (f"; pixel = the best pixel baseline ({best_pixel.label})." if best_pixel else "."),
        "",
        "| class | images | " + " | ".join(title for title, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for label, count in report.classes.items():

        def cell(result: MethodResult | None, label: str = label) -> str:
            if result is None or label not in result.per_class:
                return "–"
            return _pct(result.per_class[label]["map"])

        lines.append(f"| {label} | {count} | " + " | ".join(cell(r) for _, r in columns) + " |")
    return [*lines, ""]
