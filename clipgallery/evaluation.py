"""`clipgallery eval`: retrieval quality of the configured model on a labelled image set.

The set is indexed with the real ingest pipeline into a fresh database of its own on the same
PostgreSQL server (never the user's gallery), every query is a real pgvector SQL query through
`search_vector`, and the database is dropped at the end (unless asked to keep it).

Tasks:
- text → image: one query per class, the class name in a prompt template (relevant: every image
  of that class); for caption sets, one query per caption (relevant: its image).
- image → image: every image's stored vector queries the others, itself excluded (relevant: the
  other images of its class). Not run for caption sets, which have no classes.

Methods, side by side in one report:
- the model with the index metric through the HNSW index, and the same metric as an exact
  sequential scan (so the index's cost in quality and its gain in latency are both visible);
- the model with every other distance metric (exact scans: no index serves them);
- the pixel baseline: images downscaled to 32×32 RGB, compared by L1, L2, cosine and Pearson
  correlation in numpy (image → image only);
- chance: the expected scores of a random ranking, the floor random weights should sit near.

Metric definitions are in clipgallery.metrics. @K metrics come from a top-10 query (the one a
user's search runs, with the configured ef_search, and the one that is timed); average
precision from a second query for the full ranking of all candidates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shlex
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from clipgallery import db
from clipgallery.config import METRICS, PROJECT_ROOT, Settings
from clipgallery.datasets import LabelledImage, load_dataset, read_split, select, stratified_split, write_split
from clipgallery.metrics import (
    METRIC_KEYS,
    MeanScores,
    QueryScores,
    chance_scores,
    mean_scores,
    rank_by_distance,
    score_query,
)

log = logging.getLogger(__name__)

TOP_K = 10
PIXEL_SIZE = 32
PIXEL_METRICS = ("l1", "l2", "cosine", "correlation")
EVAL_DATABASE_PREFIX = "clipgallery_eval_"
TEXT_TASK, IMAGE_TASK = "text_to_image", "image_to_image"
TASK_TITLES = {TEXT_TASK: "text → image", IMAGE_TASK: "image → image"}


@dataclass(frozen=True)
class EvalOptions:
    source: Path
    label_column: str | None = None
    captions: bool = False
    split: Path | None = None  # evaluate one side of this split file...
    write_split: Path | None = None  # ...or write a new seeded split here and evaluate one side of it
    side: str = "test"
    test_fraction: float = 0.2
    seed: int = 0
    prompt_template: str = "a photo of a {}"
    limit: int | None = None
    out_dir: Path | None = None
    metrics: tuple[str, ...] = METRICS
    keep_database: bool = False
    pixel_size: int = PIXEL_SIZE
    progress: bool = True


@dataclass
class MethodResult:
    """One method on one task: mean metrics, per-class means, latency of the timed queries."""

    method: str
    label: str
    scores: MeanScores
    per_class: dict[str, MeanScores] = field(default_factory=dict)
    latency_ms: dict[str, float] | None = None  # p50/p95/mean of the top-10 SQL queries
    top10: list[list[int]] | None = None  # kept for the HNSW-vs-exact overlap only

    def as_dict(self) -> dict:
        out: dict = {"label": self.label, "metrics": self.scores.as_dict()}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.per_class:
            out["per_class"] = {c: s.as_dict() for c, s in self.per_class.items()}
        return out


@dataclass
class EvalReport:
    name: str
    out_dir: Path
    info: dict
    tasks: dict[str, dict[str, MethodResult]]
    index_comparison: dict[str, dict]
    classes: dict[str, int]
    timings: dict[str, float]

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def json_path(self) -> Path:
        return self.out_dir / "results.json"

    @property
    def plot_path(self) -> Path:
        return self.out_dir / "map.png"

    def summary_lines(self) -> list[str]:
        lines = []
        for task, methods in self.tasks.items():
            lines.append(f"{TASK_TITLES[task]}:")
            for result in methods.values():
                s = result.scores
                lines.append(
                    f"  {result.label:<24} mAP {100 * s['map']:5.1f}  R@1 {100 * s['recall@1']:5.1f}  "
                    f"R@10 {100 * s['recall@10']:5.1f}  P@10 {100 * s['precision@10']:5.1f}  "
                    f"nDCG@10 {100 * s['ndcg@10']:5.1f}"
                )
        return lines


# --- the set -----------------------------------------------------------------------------------


def set_name(source: Path) -> str:
    """A short name for reports: the CSV's folder (evaldata/fashion_products/labels.csv ->
    fashion_products), or the folder (its parent for a folder called images)."""
    source = Path(source).resolve()
    if source.is_dir():
        # evaldata/imagenette_val1k/images -> imagenette_val1k
        return source.parent.name if source.name == "images" else source.name
    return source.resolve().parent.name if source.stem in ("labels", "captions") else source.stem


def round_robin(items: list[LabelledImage], limit: int) -> list[LabelledImage]:
    """At most `limit` items taken in turn from each class (order of first appearance), so a
    quick run on a class-sorted file still sees every class."""
    groups: dict[str | None, list[LabelledImage]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    chosen: list[LabelledImage] = []
    queues = [iter(g) for g in groups.values()]
    while queues and len(chosen) < limit:
        still = []
        for queue in queues:
            item = next(queue, None)
            if item is not None and len(chosen) < limit:
                chosen.append(item)
                still.append(queue)
        queues = still
    return chosen


def load_items(options: EvalOptions) -> tuple[list[LabelledImage], dict]:
    """The items to evaluate, after the split and the limit, and a description of how."""
    items = load_dataset(options.source, options.label_column, options.captions)
    info: dict = {"items_in_source": len(items)}
    if options.split and options.write_split:
        raise ValueError("use --split FILE (an existing split) or --write-split FILE (a new one), not both")
    if options.write_split:
        split = stratified_split(items, options.test_fraction, options.seed)
        write_split(split, options.write_split)
        info["split"] = {
            "file": str(options.write_split),
            "written": True,
            "test_fraction": options.test_fraction,
            "seed": options.seed,
        }
    elif options.split:
        split = read_split(options.split)
        info["split"] = {"file": str(options.split), "written": False}
    else:
        split = None
    if split is not None:
        items = select(items, split, options.side)
        info["split"]["side"] = options.side
    if options.limit is not None:
        if options.limit < 2:
            raise ValueError("--limit must be at least 2")
        if options.limit < len(items):
            items = round_robin(items, options.limit)
            info["limit"] = options.limit
    if len(items) < 2:
        raise ValueError("at least two images are needed to evaluate retrieval")
    return items, info


# --- a database of its own ---------------------------------------------------------------------


@contextmanager
def eval_database(settings: Settings, keep: bool = False) -> Iterator[tuple[Settings, str]]:
    """A new database on the gallery's server, migrated, with a temporary upload folder; dropped
    (files too) on the way out unless `keep`. Yields (settings for it, its name)."""
    base_url = db.database_url(settings)  # starts the embedded server when DATABASE_URL is unset
    name = f"{EVAL_DATABASE_PREFIX}{datetime.now():%Y%m%d_%H%M%S}_{os.getpid()}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    url = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    upload_dir = Path(tempfile.mkdtemp(prefix="clipgallery-eval-"))
    eval_settings = settings.with_overrides(database_url=url, upload_dir=upload_dir)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        raise db.DatabaseError(
            f"Could not create the evaluation database {name} on the gallery's server (the role needs CREATEDB): {exc}"
        ) from exc
    try:
        db.migrate(eval_settings)
        yield eval_settings, name
    finally:
        db.get_engine(eval_settings).dispose()
        if keep:
            log.warning("kept evaluation database %s and its files in %s", name, upload_dir)
        else:
            with admin.connect() as conn:
                # FORCE: a connection left open by an interrupted run must not keep it alive.
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            _remove_tree(upload_dir)
        admin.dispose()


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- indexing ----------------------------------------------------------------------------------


@dataclass
class Indexed:
    items: list[LabelledImage]  # the items that made it in, first copy of each content only
    image_ids: list[int]  # aligned with items
    pixels: np.ndarray  # (n, 3·s·s) float32 in [0, 1], aligned with items
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (key, key of the first copy)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    seconds: float = 0.0


def _pixels(rgb, size: int) -> np.ndarray:
    from PIL import Image

    # BOX = area averaging: every source pixel counts, no aliasing from a point sampler.
    small = rgb.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def index_items(session, embedder, storage, items: list[LabelledImage], pixel_size: int, progress: bool) -> Indexed:
    """Ingest through prepare_image + store_prepared (validation, files, thumbnails, model, one
    transaction per batch), decoding the next batch in threads while the model works."""
    from tqdm import tqdm

    from clipgallery.imaging import RejectedImage
    from clipgallery.ingest import prepare_image, store_prepared

    started = time.perf_counter()
    settings = embedder.settings
    embedder.load()

    def prepare(item: LabelledImage):
        # The dataset key as the name; no description, so nothing label-like sits in the text
        # columns a keyword or hybrid search could read.
        prepared = prepare_image(item.path.read_bytes(), item.path.name, settings, item.key, "", embedder=embedder)
        return prepared, _pixels(prepared.decoded.rgb, pixel_size)

    result = Indexed(items=[], image_ids=[], pixels=np.zeros((0, 3 * pixel_size * pixel_size), np.float32))
    pixel_rows: list[np.ndarray] = []
    first_key_of: dict[int, str] = {}
    size = settings.embed_batch_size
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    bar = tqdm(total=len(items), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 2))) as pool:
        pending = [pool.submit(prepare, item) for item in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            current = pending
            pending = [pool.submit(prepare, item) for item in batches[index + 1]] if index + 1 < len(batches) else []
            ready, ready_items, ready_pixels = [], [], []
            for item, future in zip(batch, current, strict=True):
                try:
                    prepared, pixels = future.result()
                except (RejectedImage, OSError) as exc:
                    result.rejected.append((item.key, str(exc)))
                    continue
                ready.append(prepared)
                ready_items.append(item)
                ready_pixels.append(pixels)
            if ready:
                outcomes = store_prepared(session, embedder, storage, ready)
                for item, outcome, pixels in zip(ready_items, outcomes, ready_pixels, strict=True):
                    if outcome.image_id in first_key_of:
                        # Same bytes as an earlier item: one gallery image; the later copy is
                        # left out of the queries and of the relevance judgements.
                        result.duplicates.append((item.key, first_key_of[outcome.image_id]))
                        continue
                    first_key_of[outcome.image_id] = item.key
                    result.items.append(item)
                    result.image_ids.append(outcome.image_id)
                    pixel_rows.append(pixels)
            bar.update(len(batch))
    bar.close()
    if pixel_rows:
        result.pixels = np.stack(pixel_rows)
    result.seconds = time.perf_counter() - started
    return result


def stored_vectors(session, image_ids: Sequence[int]) -> np.ndarray:
    from clipgallery.gallery import vector_to_numpy

    rows = dict(
        session.execute(
            text("SELECT image_id, embedding FROM image_embeddings WHERE image_id = ANY(:ids)"),
            {"ids": list(image_ids)},
        ).all()
    )
    return np.stack([vector_to_numpy(rows[i]) for i in image_ids])


# --- queries -----------------------------------------------------------------------------------


@dataclass
class Query:
    vector_index: int  # row in the text-vector or image-vector matrix
    relevant: frozenset[int]  # image ids
    group: str | None  # class, for the per-class breakdown
    exclude: int | None = None  # the query image itself (image → image)


def text_queries(indexed: Indexed, template: str, captions: bool) -> tuple[list[str], list[Query]]:
    if captions:
        texts, queries = [], []
        for item, image_id in zip(indexed.items, indexed.image_ids, strict=True):
            for caption in item.captions:
                queries.append(Query(len(texts), frozenset({image_id}), None))
                texts.append(caption)
        return texts, queries
    by_class: dict[str, set[int]] = defaultdict(set)
    for item, image_id in zip(indexed.items, indexed.image_ids, strict=True):
        by_class[str(item.label)].add(image_id)
    labels = sorted(by_class)
    texts = [template.format(label) for label in labels]
    return texts, [Query(i, frozenset(by_class[label]), label) for i, label in enumerate(labels)]


def image_queries(indexed: Indexed) -> list[Query]:
    by_class: dict[str, set[int]] = defaultdict(set)
    for item, image_id in zip(indexed.items, indexed.image_ids, strict=True):
        by_class[str(item.label)].add(image_id)
    return [
        Query(i, frozenset(by_class[str(item.label)] - {image_id}), str(item.label), exclude=image_id)
        for i, (item, image_id) in enumerate(zip(indexed.items, indexed.image_ids, strict=True))
    ]


def _per_class(queries: list[Query], scores: list[QueryScores | None]) -> dict[str, MeanScores]:
    groups: dict[str, list[QueryScores | None]] = defaultdict(list)
    for query, score in zip(queries, scores, strict=True):
        if query.group is not None:
            groups[query.group].append(score)
    return {group: mean_scores(groups[group]) for group in sorted(groups)}


def _latency(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000.0
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "mean": float(values.mean()),
        "queries": len(samples),
    }


def run_model_method(
    session,
    settings: Settings,
    model_id: int,
    vectors: np.ndarray,
    queries: list[Query],
    candidates: int,
    metric: str,
    exact: bool,
    bar,
) -> tuple[list[QueryScores | None], list[list[int]], list[float]]:
    """Two SQL queries per query vector: the timed top-10 (what a search returns) and the full
    ranking of every candidate (for average precision)."""
    from clipgallery.search import search_vector

    scores, tops, seconds = [], [], []
    for query in queries:
        vector = vectors[query.vector_index]
        common = {"metric": metric, "exact": exact, "exclude_image_id": query.exclude}
        started = time.perf_counter()
        top = search_vector(session, settings, model_id, vector, k=TOP_K, **common)
        seconds.append(time.perf_counter() - started)
        if top.exact != (exact or metric != settings.index_metric):
            raise AssertionError(f"{metric} exact={exact}: the search reported exact={top.exact}")
        full = search_vector(session, settings, model_id, vector, k=candidates, **common)
        top_ids = [hit.id for hit in top.hits]
        tops.append(top_ids)
        scores.append(score_query(top_ids, query.relevant, [hit.id for hit in full.hits]))
        bar.update(1)
    return scores, tops, seconds


def pixel_distances(pixels: np.ndarray, rows: slice, metric: str) -> np.ndarray:
    """Distances from pixels[rows] to every image: L1, L2, 1 − cosine, 1 − Pearson r."""
    queries = pixels[rows]
    if metric == "l1":
        return np.abs(queries[:, None, :] - pixels[None, :, :]).sum(axis=2)
    if metric == "l2":
        sq = (queries**2).sum(1)[:, None] + (pixels**2).sum(1)[None, :] - 2.0 * queries @ pixels.T
        return np.sqrt(np.maximum(sq, 0.0))
    if metric in ("cosine", "correlation"):

        def unit(m: np.ndarray) -> np.ndarray:
            if metric == "correlation":
                # Pearson r is the cosine of the mean-centred vectors.
                m = m - m.mean(axis=1, keepdims=True)
            norms = np.linalg.norm(m, axis=1, keepdims=True)
            return m / np.where(norms == 0, 1.0, norms)  # a flat image correlates 0 with everything

        return 1.0 - unit(queries) @ unit(pixels).T
    raise ValueError(f"unknown pixel metric {metric!r}")


def run_pixel_method(indexed: Indexed, queries: list[Query], metric: str, bar) -> list[QueryScores | None]:
    ids = np.asarray(indexed.image_ids)
    pixels = indexed.pixels.astype(np.float64 if metric != "l1" else np.float32)
    # L1 materialises (chunk × n × d) differences: keep each chunk near 64 MB.
    chunk = max(1, int(64e6 / (4 * max(1, pixels.shape[0] * pixels.shape[1])))) if metric == "l1" else 256
    scores: list[QueryScores | None] = []
    for start in range(0, len(queries), chunk):
        block = pixel_distances(pixels, slice(start, start + chunk), metric)
        for offset, distances in enumerate(block):
            query = queries[start + offset]
            keep = ids != query.exclude
            ranking = rank_by_distance(ids[keep], distances[keep])
            scores.append(score_query(ranking[:TOP_K], query.relevant, ranking))
            bar.update(1)
    return scores


def chance_result(queries: list[Query], candidates: int) -> MeanScores:
    values = [chance_scores(candidates, len(q.relevant)) for q in queries if q.relevant]
    means = {key: float(np.mean([v[key] for v in values])) if values else math.nan for key in METRIC_KEYS}
    return MeanScores(means, queries=len(queries), scored=len(values), without_relevant=len(queries) - len(values))


# --- the whole run -----------------------------------------------------------------------------


def _method_key(metric: str, exact: bool) -> str:
    return f"model_{metric}_{'exact' if exact else 'hnsw'}"


def _method_label(metric: str, exact: bool) -> str:
    return f"model {metric} ({'exact' if exact else 'HNSW'})"


def run_eval(settings: Settings, options: EvalOptions) -> EvalReport:
    """Index, query, score, write report.md, results.json and map.png; returns the report."""
    from tqdm import tqdm

    from clipgallery.embedding import Embedder
    from clipgallery.gallery import gallery_model_id
    from clipgallery.storage import Storage

    started = time.perf_counter()
    unknown = [m for m in options.metrics if m not in METRICS]
    if unknown or not options.metrics:
        raise ValueError(f"--metrics takes a comma-separated subset of {','.join(METRICS)}, got {options.metrics}")
    if options.side not in ("train", "test"):
        raise ValueError(f"--side must be train or test, got {options.side!r}")
    if not options.captions and "{}" not in options.prompt_template:
        raise ValueError(f"the prompt template needs a {{}} where the class name goes, got {options.prompt_template!r}")
    items, info = load_items(options)
    labelled = not options.captions
    name = set_name(options.source)
    out_dir = options.out_dir or PROJECT_ROOT / "reports" / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The index metric is the one the HNSW index serves; with an index metric not asked for,
    # the HNSW method would silently vanish, so it is always run.
    metrics = list(dict.fromkeys([settings.index_metric, *options.metrics]))
    methods = [(settings.index_metric, False)] + [(m, True) for m in metrics]

    tasks: dict[str, dict[str, MethodResult]] = {}
    timings: dict[str, float] = {}
    with eval_database(settings, keep=options.keep_database) as (eval_settings, database_name):
        embedder = Embedder(eval_settings)
        with db.session_scope(eval_settings) as session:
            indexed = index_items(
                session, embedder, Storage(eval_settings.upload_dir), items, options.pixel_size, options.progress
            )
            timings["index_seconds"] = indexed.seconds
            n = len(indexed.items)
            if n < 2:
                raise ValueError(f"only {n} image(s) could be indexed; rejected: {indexed.rejected[:5]}")
            # Full-ranking queries ask for every candidate: lift the page-size cap for this run.
            query_settings = eval_settings.with_overrides(max_k=max(eval_settings.max_k, n + 1))
            model_id = gallery_model_id(session, embedder)
            image_vectors = stored_vectors(session, indexed.image_ids)

            texts, t_queries = text_queries(indexed, options.prompt_template, options.captions)
            text_started = time.perf_counter()
            text_vectors = np.concatenate([embedder.encode_texts(texts[i : i + 64]) for i in range(0, len(texts), 64)])
            timings["text_encoding_seconds"] = time.perf_counter() - text_started
            i_queries = image_queries(indexed) if labelled else []
            plan = [(TEXT_TASK, t_queries, text_vectors, n)]
            if labelled:
                plan.append((IMAGE_TASK, i_queries, image_vectors, n - 1))

            total = sum(len(q) for _, q, _, _ in plan) * len(methods) + len(i_queries) * len(PIXEL_METRICS)
            bar = tqdm(total=total, unit="query", desc="querying", disable=not options.progress, dynamic_ncols=True)
            query_started = time.perf_counter()
            for task, queries, vectors, candidates in plan:
                tasks[task] = {}
                for metric, exact in methods:
                    bar.set_postfix_str(f"{TASK_TITLES[task]}, {_method_label(metric, exact)}")
                    scores, tops, seconds = run_model_method(
                        session, query_settings, model_id, vectors, queries, candidates, metric, exact, bar
                    )
                    tasks[task][_method_key(metric, exact)] = MethodResult(
                        _method_key(metric, exact),
                        _method_label(metric, exact),
                        mean_scores(scores),
                        _per_class(queries, scores),
                        _latency(seconds),
                        tops if metric == settings.index_metric else None,
                    )
            timings["sql_query_seconds"] = time.perf_counter() - query_started
            pixel_started = time.perf_counter()
            if labelled:
                for metric in PIXEL_METRICS:
                    bar.set_postfix_str(f"image → image, pixel {metric}")
                    scores = run_pixel_method(indexed, i_queries, metric, bar)
                    tasks[IMAGE_TASK][f"pixel_{metric}"] = MethodResult(
                        f"pixel_{metric}", f"pixel {metric}", mean_scores(scores), _per_class(i_queries, scores)
                    )
            timings["pixel_seconds"] = time.perf_counter() - pixel_started
            bar.close()
            for task, queries, _, candidates in plan:
                tasks[task]["chance"] = MethodResult(
                    "chance", "chance (random ranking)", chance_result(queries, candidates)
                )
            identity = embedder.identity

    index_comparison = _index_comparison(tasks, settings.index_metric)
    for methods_of_task in tasks.values():
        for result in methods_of_task.values():
            result.top10 = None
    classes: dict[str, int] = defaultdict(int)
    for item in indexed.items:
        if item.label is not None:
            classes[item.label] += 1
    timings["total_seconds"] = time.perf_counter() - started
    info.update(
        {
            "set": name,
            "source": str(options.source),
            "label_column": options.label_column,
            "captions": options.captions,
            "images": len(indexed.items),
            "classes": len(classes),
            "text_queries": len(t_queries),
            "prompt_template": None if options.captions else options.prompt_template,
            "duplicates_merged": len(indexed.duplicates),
            "duplicate_examples": indexed.duplicates[:10],
            "rejected": indexed.rejected,
            "model": {
                "architecture": identity.architecture,
                "weights": identity.weights,
                "dimension": identity.dimension,
                "source": settings.model_name
                + ("" if Path(settings.model_name).is_dir() else f" / {settings.pretrained}"),
            },
            "index": {
                "metric": settings.index_metric,
                "hnsw_m": settings.hnsw_m,
                "hnsw_ef_construction": settings.hnsw_ef_construction,
                "hnsw_ef_search": settings.hnsw_ef_search,
            },
            "pixel_baseline": (
                f"{options.pixel_size}x{options.pixel_size} RGB, area-averaged (PIL BOX), values in [0, 1]"
            ),
            "database": database_name + (" (kept)" if options.keep_database else " (dropped)"),
            "command": equivalent_command(options),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "embed_images_per_second": len(items) / indexed.seconds if indexed.seconds else None,
        }
    )
    report = EvalReport(name, out_dir, info, tasks, index_comparison, dict(sorted(classes.items())), timings)
    write_json(report)
    write_plot(report)
    write_markdown(report)
    return report


def _index_comparison(tasks: dict[str, dict[str, MethodResult]], metric: str) -> dict[str, dict]:
    """HNSW against the exact scan of the same metric: metric deltas, latency, and how much of
    the exact top 10 the index returned (its recall against the exact answer)."""
    hnsw_key, exact_key = _method_key(metric, False), _method_key(metric, True)
    out = {}
    for task, methods in tasks.items():
        hnsw, exact = methods.get(hnsw_key), methods.get(exact_key)
        if hnsw is None or exact is None:
            continue
        overlaps = [
            len(set(h) & set(e)) / len(e) for h, e in zip(hnsw.top10 or [], exact.top10 or [], strict=True) if e
        ]
        out[task] = {
            "metric": metric,
            "delta": {k: hnsw.scores[k] - exact.scores[k] for k in METRIC_KEYS},
            "top10_overlap_with_exact": float(np.mean(overlaps)) if overlaps else math.nan,
            "latency_ms": {"hnsw": hnsw.latency_ms, "exact": exact.latency_ms},
        }
    return out


# --- output ------------------------------------------------------------------------------------


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
        f"- text queries: {info['text_queries']}"
        + (f", prompt template `{info['prompt_template']}`" if info.get("prompt_template") else " (captions)"),
        f"- index: HNSW on {info['index']['metric']} (m {info['index']['hnsw_m']}, ef_construction "
        f"{info['index']['hnsw_ef_construction']}, ef_search {info['index']['hnsw_ef_search']}); "
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
    for key, label in labels.items():
        cells = [_pct(report.tasks[t][key].scores["map"]) if key in report.tasks[t] else "n/a" for t in report.tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"![mAP per method and task]({report.plot_path.name})", ""]
    for task, methods in report.tasks.items():
        lines += [f"## {TASK_TITLES[task].capitalize()}", ""]
        lines += _metrics_table(methods)
        lines.append("")
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
    hnsw = _method_key(metric, False)
    text_r = report.tasks.get(TEXT_TASK, {}).get(hnsw)
    image_r = report.tasks.get(IMAGE_TASK, {}).get(hnsw)
    pixels = {k: r for k, r in report.tasks.get(IMAGE_TASK, {}).items() if k.startswith("pixel_")}
    best_pixel = max(pixels.values(), key=lambda r: r.scores["map"]) if pixels else None
    lines = [
        "## Per class",
        "",
        f"AP (%) per class: text → image is the class prompt's AP; image → image is the mean AP of the "
        f"class's images as queries. Model = {metric} through HNSW"
        + (f"; pixel = the best pixel baseline ({best_pixel.label})." if best_pixel else "."),
        "",
        "| class | images | text → image | image → image | pixel image → image |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, count in report.classes.items():

        def cell(result: MethodResult | None, label: str = label) -> str:
            if result is None or label not in result.per_class:
                return "–"
            return _pct(result.per_class[label]["map"])

        lines.append(f"| {label} | {count} | {cell(text_r)} | {cell(image_r)} | {cell(best_pixel)} |")
    return [*lines, ""]


def equivalent_command(options: EvalOptions) -> str:
    """The `clipgallery eval` command that reproduces this run, for the report."""
    args = ["clipgallery", "eval", str(options.source)]
    if options.label_column:
        args += ["--label-column", options.label_column]
    if options.captions:
        args.append("--captions")
    if options.split:
        args += ["--split", str(options.split), "--side", options.side]
    if options.write_split:
        args += ["--write-split", str(options.write_split), "--side", options.side]
        args += ["--test-fraction", str(options.test_fraction), "--seed", str(options.seed)]
    if not options.captions:
        args += ["--prompt-template", options.prompt_template]
    if options.limit is not None:
        args += ["--limit", str(options.limit)]
    if tuple(options.metrics) != METRICS:
        args += ["--metrics", ",".join(options.metrics)]
    if options.out_dir:
        args += ["--out", str(options.out_dir)]
    if options.keep_database:
        args.append("--keep-database")
    return shlex.join(args)
