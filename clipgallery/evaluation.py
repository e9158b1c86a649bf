"""`clipgallery eval`: retrieval quality of the configured model on a labelled image set.

The set is indexed with the real ingest pipeline into a fresh database of its own on the same
PostgreSQL server (never the user's gallery), every query is a real pgvector SQL query through
`search_vector`, and the database is dropped at the end (unless asked to keep it).

Tasks:
- text → image: one query per class, the class name in a prompt template (several templates: a
  prompt ensemble, the normalised mean of their normalised text vectors, as in CLIP's zero-shot
  classifiers; relevant: every image of that class); for caption sets, one query per caption
  (relevant: its image).
- free-text queries → image (``--queries FILE``): one query per row of a query,label CSV, the
  query as typed (relevant: every image of its label; queries whose label has no image in the
  evaluated set are reported and left out).
- image → image: every image's stored vector queries the others, itself excluded (relevant: the
  other images of its class). Not run for caption sets, which have no classes.

Images are stored with their dataset key as name and an empty description, so no label-like text
sits where a keyword search could read it — unless name/description templates over the labels
CSV's columns are given (``--name-template '{productDisplayName}'``), to evaluate hybrid search.

Methods, side by side in one report:
- the model with the index metric through the HNSW index, and the same metric as an exact
  sequential scan (so the index's cost in quality and its gain in latency are both visible);
- the model with every other distance metric (exact scans: no index serves them);
- text tasks, with name/description templates: **hybrid** search (the vector ranking fused with
  full-text search over names and descriptions, `search_vector(keywords=...)`, the query's own
  words as keywords, never the prompt template's) and a **keyword-only** baseline (the full-text
  ranking alone, images without a match after it in id order);
- text tasks: the other prompt variants through the HNSW index, vector-only and hybrid (the raw
  query, each template alone, the ensemble), so what a prompt does to short queries is measured;
- the pixel baseline: images downscaled to 32×32 RGB, compared by L1, L2, cosine and Pearson
  correlation in numpy (image → image only);
- chance: the expected scores of a random ranking, the floor random weights should sit near.

Metric definitions are in clipgallery.metrics. @K metrics come from a top-10 query (the one a
user's search runs, with the configured ef_search, and the one that is timed); average
precision from a second query for the full ranking of all candidates.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shlex
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
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
from clipgallery.datasets import (
    LabelledImage,
    LabelledQuery,
    load_dataset,
    load_queries_csv,
    read_split,
    select,
    stratified_split,
    write_split,
)
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
TEXT_TASK, QUERY_TASK, IMAGE_TASK = "text_to_image", "queries", "image_to_image"
TASK_TITLES = {TEXT_TASK: "text → image", QUERY_TASK: "free-text queries → image", IMAGE_TASK: "image → image"}
DEFAULT_PROMPT_TEMPLATES = ("a photo of a {}",)
RAW_PROMPT = ("{}",)  # the query as typed
KEYWORD_METHOD = "keyword_only"


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
    # Class-name prompts; several make a prompt ensemble. Also compared on the free-text queries.
    prompt_templates: tuple[str, ...] = DEFAULT_PROMPT_TEMPLATES
    queries: Path | None = None  # a CSV of free-text queries and the label each should find
    query_column: str | None = None  # default: query or text
    query_label_column: str | None = None  # default: label, class or the set's label column
    # Templates over the labels CSV's columns (as `clipgallery train --caption`) for the stored
    # names and descriptions; with either, hybrid search and the keyword-only baseline are run.
    name_template: str | None = None
    description_template: str | None = None
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
    per_query: list[QueryScores | None] | None = None  # free-text queries task only

    def as_dict(self) -> dict:
        out: dict = {"label": self.label, "metrics": self.scores.as_dict()}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.per_class:
            out["per_class"] = {c: s.as_dict() for c, s in self.per_class.items()}
        if self.per_query is not None:
            # Aligned with info["queries"]["used"]: average precision and hit@1 per query.
            out["per_query"] = [
                None if q is None else {"map": q.average_precision, "recall@1": q.recall[1]} for q in self.per_query
            ]
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
                    f"  {result.label:<44} mAP {100 * s['map']:5.1f}  R@1 {100 * s['recall@1']:5.1f}  "
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
    # Indexed whatever the set's size: the report puts the HNSW index beside the exact scan (the
    # evaluation sets, 1,000-3,287 images, are below the size at which a gallery gets one).
    eval_settings = settings.with_overrides(database_url=url, upload_dir=upload_dir, vector_index_min_vectors=0)
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


def check_text_templates(items: Sequence[LabelledImage], options: EvalOptions) -> None:
    """Refuse a name/description template naming a column the set does not have."""
    from clipgallery.train import check_templates

    for option, template in (
        ("--name-template", options.name_template),
        ("--description-template", options.description_template),
    ):
        if template is None:
            continue
        if not template.strip():
            raise ValueError(f"{option} is empty")
        try:
            check_templates(items, [template])
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None


def item_texts(item: LabelledImage, name_template: str | None, description_template: str | None) -> tuple[str, str]:
    """The name and description stored for an item: the templates filled from its CSV row exactly
    as `clipgallery train --caption` fills captions (`train.build_captions`: ``{column}`` and
    ``{label}``, whitespace collapsed, empty when a field is missing or empty). Without a name
    template, or when it comes out empty, the name is the dataset key; without a description
    template the description is empty."""
    from dataclasses import replace

    from clipgallery.train import build_captions

    bare = replace(item, captions=())  # the template only, not a caption set's own captions

    def render(template: str | None) -> str:
        rendered = build_captions(bare, [template]) if template else []
        return rendered[0] if rendered else ""

    return render(name_template) or item.key, render(description_template)


def index_items(
    session,
    embedder,
    storage,
    items: list[LabelledImage],
    pixel_size: int,
    progress: bool,
    texts: Callable[[LabelledImage], tuple[str, str]] | None = None,
) -> Indexed:
    """Ingest through prepare_image + store_prepared (validation, files, thumbnails, model, one
    transaction per batch), decoding the next batch in threads while the model works. `texts`
    gives each item's name and description (default: its key and nothing)."""
    from tqdm import tqdm

    from clipgallery.db import deferred_vector_index
    from clipgallery.imaging import RejectedImage
    from clipgallery.ingest import prepare_image, store_prepared

    started = time.perf_counter()
    settings = embedder.settings
    embedder.load()

    def prepare(item: LabelledImage):
        # By default the dataset key as the name and no description, so nothing label-like sits in
        # the text columns a keyword or hybrid search could read.
        name, description = texts(item) if texts else (item.key, "")
        prepared = prepare_image(item.path.read_bytes(), item.path.name, settings, name, description, embedder=embedder)
        return prepared, _pixels(prepared.decoded.rgb, pixel_size)

    result = Indexed(items=[], image_ids=[], pixels=np.zeros((0, 3 * pixel_size * pixel_size), np.float32))
    pixel_rows: list[np.ndarray] = []
    first_key_of: dict[int, str] = {}
    size = settings.embed_batch_size
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    bar = tqdm(total=len(items), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)
    # The set goes into an empty database: the HNSW index is built once at the end, as bulk
    # indexing does, rather than grown vector by vector.
    with (
        deferred_vector_index(session, settings, len(items)),
        ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 2))) as pool,
    ):
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


def _images_by_class(indexed: Indexed) -> dict[str, set[int]]:
    by_class: dict[str, set[int]] = defaultdict(set)
    for item, image_id in zip(indexed.items, indexed.image_ids, strict=True):
        by_class[str(item.label)].add(image_id)
    return by_class


def text_queries(indexed: Indexed, captions: bool) -> tuple[list[str], list[Query]]:
    """The bare query texts (class names, or captions) and their queries; prompt templates are
    applied when the texts are encoded (`prompt_vectors`)."""
    if captions:
        texts, queries = [], []
        for item, image_id in zip(indexed.items, indexed.image_ids, strict=True):
            for caption in item.captions:
                queries.append(Query(len(texts), frozenset({image_id}), None))
                texts.append(caption)
        return texts, queries
    by_class = _images_by_class(indexed)
    labels = sorted(by_class)
    return labels, [Query(i, frozenset(by_class[label]), label) for i, label in enumerate(labels)]


def free_text_queries(
    indexed: Indexed, loaded: Sequence[LabelledQuery]
) -> tuple[list[str], list[Query], list[LabelledQuery], list[LabelledQuery]]:
    """(texts, queries, the queries used, the queries left out): a query whose label has no image
    in the evaluated set has nothing to find and is left out (and reported)."""
    by_class = _images_by_class(indexed)
    texts: list[str] = []
    queries: list[Query] = []
    used: list[LabelledQuery] = []
    left_out: list[LabelledQuery] = []
    for query in loaded:
        if query.label not in by_class:
            left_out.append(query)
            continue
        queries.append(Query(len(texts), frozenset(by_class[query.label]), query.label))
        texts.append(query.text)
        used.append(query)
    if loaded and not used:
        shown = ", ".join(sorted({q.label for q in loaded})[:5])
        raise ValueError(
            f"none of the {len(loaded)} queries' labels ({shown} …) is a label of the evaluated images "
            f"({', '.join(sorted(by_class)[:5])} …): is --query-label-column the right column?"
        )
    return texts, queries, used, left_out


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


def encode_prompts(embedder, texts: Sequence[str], template: str, batch_size: int = 64) -> np.ndarray:
    """L2-normalised text vectors of each text inside `template` (``{}`` = the text)."""
    prompts = [template.format(t) for t in texts]
    if not prompts:
        return np.zeros((0, embedder.identity.dimension), np.float32)
    encoded = np.concatenate(
        [embedder.encode_texts(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    )
    return _unit_rows(encoded.astype(np.float32))


def prompt_vectors(embedder, texts: Sequence[str], templates: Sequence[str], cache: dict | None = None) -> np.ndarray:
    """The query vectors of `texts` under one template, or under several as a prompt ensemble: the
    mean of each template's L2-normalised vectors, re-normalised (CLIP's zero-shot ensembles).
    `cache` (template -> vectors, for these texts) spares encoding a template twice."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    parts = []
    for template in templates:
        if cache is not None and template in cache:
            parts.append(cache[template])
            continue
        vectors = encode_prompts(embedder, texts, template)
        if cache is not None:
            cache[template] = vectors
        parts.append(vectors)
    if len(parts) == 1:
        return parts[0]
    return _unit_rows(np.mean(parts, axis=0)).astype(np.float32)


def prompt_variants(templates: Sequence[str], main: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The prompt variants compared beside a text task's main one: the raw query, each template
    alone and (with several) their ensemble — each once, the main one left out."""
    variants = [RAW_PROMPT, *((t,) for t in templates)]
    if len(templates) > 1:
        variants.append(tuple(templates))
    return [v for v in dict.fromkeys(variants) if v != main]


def prompt_name(templates: tuple[str, ...]) -> str:
    if templates == RAW_PROMPT:
        return "raw query"
    if len(templates) == 1:
        return f"prompt `{templates[0]}`"
    return f"ensemble of {len(templates)} prompts"


def image_queries(indexed: Indexed) -> list[Query]:
    by_class = _images_by_class(indexed)
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
    keywords: Sequence[str | None] | None = None,
    ef_search: int | None = None,
) -> tuple[list[QueryScores | None], list[list[int]], list[float]]:
    """Two SQL queries per query vector: the timed top-10 (what a search returns) and the full
    ranking of every candidate (for average precision). With `keywords` (aligned with the text
    vectors' rows) each query is hybrid: `search_vector(..., keywords=...)`."""
    from clipgallery.search import search_vector

    scores, tops, seconds = [], [], []
    for query in queries:
        vector = vectors[query.vector_index]
        words = keywords[query.vector_index] if keywords is not None else None
        common = {
            "metric": metric,
            "exact": exact,
            "exclude_image_id": query.exclude,
            "keywords": words,
            "ef_search": ef_search,
        }
        started = time.perf_counter()
        top = search_vector(session, settings, model_id, vector, k=TOP_K, **common)
        seconds.append(time.perf_counter() - started)
        if top.exact != (exact or metric != settings.index_metric) or top.hybrid != bool(words):
            raise AssertionError(f"{metric} exact={exact}: the search reported exact={top.exact}, hybrid={top.hybrid}")
        # Hybrid: a page of every candidate fuses both sides at full depth (search_vector ranks at
        # least offset + k + 1 images on each side), so the deep ranking is one a user could page to.
        full = search_vector(session, settings, model_id, vector, k=candidates, **common)
        top_ids = [hit.id for hit in top.hits]
        tops.append(top_ids)
        scores.append(score_query(top_ids, query.relevant, [hit.id for hit in full.hits]))
        bar.update(1)
    return scores, tops, seconds


# The keyword-only baseline: the full-text side of hybrid search alone (same tsquery, same
# ts_rank_cd order, ties by id), then every image without a match, in id order.
KEYWORD_RANKING_SQL = (
    "WITH {words_cte} "
    "SELECT i.id FROM images i JOIN image_embeddings e ON e.image_id = i.id AND e.model_id = :model_id "
    "CROSS JOIN words q "
    "ORDER BY coalesce(i.search_document @@ q.query, false) DESC, "
    "ts_rank_cd(i.search_document, q.query) DESC, i.id LIMIT :limit"
)
NO_KEYWORD_RANKING_SQL = (
    "SELECT i.id FROM images i JOIN image_embeddings e ON e.image_id = i.id AND e.model_id = :model_id "
    "ORDER BY i.id LIMIT :limit"
)


def keyword_ranking(
    session, model_id: int, keywords: str | None, limit: int, common_fraction: float = 1.0
) -> list[int]:
    """Image ids ranked by full-text search alone over names and descriptions (`keywords` as
    made by `search.keyword_query`); None (a query without words) ranks by id."""
    from clipgallery.search import WORDS_CTE_SQL

    sql = KEYWORD_RANKING_SQL.format(words_cte=WORDS_CTE_SQL)
    params = {"model_id": model_id, "keywords": keywords, "limit": limit, "common_fraction": common_fraction}
    if keywords is None:
        sql, params = NO_KEYWORD_RANKING_SQL, {"model_id": model_id, "limit": limit}
    return list(session.execute(text(sql), params).scalars())


def run_keyword_method(
    session,
    model_id: int,
    keywords: Sequence[str | None],
    queries: list[Query],
    candidates: int,
    bar,
    common_fraction: float = 1.0,
) -> tuple[list[QueryScores | None], list[float]]:
    scores, seconds = [], []
    for query in queries:
        words = keywords[query.vector_index]
        started = time.perf_counter()
        top = keyword_ranking(session, model_id, words, TOP_K, common_fraction)
        seconds.append(time.perf_counter() - started)
        full = keyword_ranking(session, model_id, words, candidates, common_fraction)
        scores.append(score_query(top, query.relevant, full))
        bar.update(1)
    return scores, seconds


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


def method_key(metric: str, exact: bool) -> str:
    return f"model_{metric}_{'exact' if exact else 'hnsw'}"


def _method_label(metric: str, exact: bool) -> str:
    return f"model {metric} ({'exact' if exact else 'HNSW'})"


def hybrid_key(metric: str) -> str:
    return f"hybrid_{metric}_hnsw"


def _hybrid_label(metric: str) -> str:
    return f"hybrid: model {metric} (HNSW) + full text"


def _variant_slug(templates: tuple[str, ...], all_templates: Sequence[str]) -> str:
    if templates == RAW_PROMPT:
        return "raw"
    if len(templates) == 1:
        return f"prompt{list(all_templates).index(templates[0]) + 1}"
    return "ensemble"


@dataclass
class MethodSpec:
    """One method of a task: a model ranking (vector-only, or hybrid with keywords) or, with
    metric None, the keyword-only baseline."""

    key: str
    label: str
    metric: str | None = None
    exact: bool = False
    vectors: np.ndarray | None = None
    keywords: list[str | None] | None = None
    keep_top10: bool = False


@dataclass
class TextTask:
    key: str
    texts: list[str]  # bare texts: class names, captions or free-text queries
    queries: list[Query]
    main: tuple[str, ...]  # the prompt template(s) of the task's main query vectors
    variants: list[tuple[str, ...]]  # other prompt variants, compared through the HNSW index


def _prompt_templates(options: EvalOptions) -> tuple[str, ...]:
    given = options.prompt_templates
    return tuple(dict.fromkeys([given] if isinstance(given, str) else given or DEFAULT_PROMPT_TEMPLATES))


def _validate_options(options: EvalOptions) -> tuple[str, ...]:
    unknown = [m for m in options.metrics if m not in METRICS]
    if unknown or not options.metrics:
        raise ValueError(f"--metrics takes a comma-separated subset of {','.join(METRICS)}, got {options.metrics}")
    if options.side not in ("train", "test"):
        raise ValueError(f"--side must be train or test, got {options.side!r}")
    templates = _prompt_templates(options)
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"a prompt template needs a {{}} where the class name goes, got {template!r}")
    if options.captions and options.queries:
        raise ValueError("--queries needs a labelled set (a caption set has no labels for the queries to find)")
    if options.captions and (options.name_template or options.description_template):
        # Caption sets have no CSV columns beyond the file; their captions are the queries.
        raise ValueError("--name-template/--description-template need a labels CSV, not a caption set")
    return templates


def run_eval(settings: Settings, options: EvalOptions) -> EvalReport:
    """Index, query, score, write report.md, results.json and map.png; returns the report."""
    from tqdm import tqdm

    from clipgallery.embedding import Embedder
    from clipgallery.gallery import gallery_model_id
    from clipgallery.search import keyword_query
    from clipgallery.storage import Storage

    started = time.perf_counter()
    templates = _validate_options(options)
    items, info = load_items(options)
    labelled = not options.captions
    loaded_queries = (
        load_queries_csv(
            options.queries, options.query_column, options.query_label_column, [options.label_column or ""]
        )
        if options.queries
        else []
    )
    with_texts = bool(options.name_template or options.description_template)
    if with_texts:
        check_text_templates(items, options)
    run_hybrid = with_texts and settings.hybrid_search
    name = set_name(options.source)
    out_dir = options.out_dir or PROJECT_ROOT / "reports" / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The index metric is the one the HNSW index serves; with an index metric not asked for,
    # the HNSW method would silently vanish, so it is always run.
    metric0 = settings.index_metric
    metrics = list(dict.fromkeys([metric0, *options.metrics]))
    methods = [(metric0, False)] + [(m, True) for m in metrics]

    tasks: dict[str, dict[str, MethodResult]] = {}
    timings: dict[str, float] = {}
    queries_info: dict | None = None
    describe = (
        (lambda item: item_texts(item, options.name_template, options.description_template)) if with_texts else None
    )
    with eval_database(settings, keep=options.keep_database) as (eval_settings, database_name):
        embedder = Embedder(eval_settings)
        with db.session_scope(eval_settings) as session:
            indexed = index_items(
                session,
                embedder,
                Storage(eval_settings.upload_dir),
                items,
                options.pixel_size,
                options.progress,
                texts=describe,
            )
            timings["index_seconds"] = indexed.seconds
            # Statistics, as autovacuum keeps them for a live gallery: hybrid search reads the
            # column's most common words from them (search.WORDS_CTE_SQL).
            session.execute(text("ANALYZE images"))
            session.commit()
            n = len(indexed.items)
            if n < 2:
                raise ValueError(f"only {n} image(s) could be indexed; rejected: {indexed.rejected[:5]}")
            # Full-ranking queries ask for every candidate: lift the page-size cap for this run.
            query_settings = eval_settings.with_overrides(max_k=max(eval_settings.max_k, n + 1))
            model_id = gallery_model_id(session, embedder)
            image_vectors = stored_vectors(session, indexed.image_ids)

            texts, t_queries = text_queries(indexed, options.captions)
            text_tasks = [
                TextTask(TEXT_TASK, texts, t_queries, RAW_PROMPT, [])
                if options.captions
                else TextTask(TEXT_TASK, texts, t_queries, templates, prompt_variants(templates, templates))
            ]
            if loaded_queries:
                q_texts, q_queries, used, left_out = free_text_queries(indexed, loaded_queries)
                # Free-text queries run as typed (what the search box does); the templates are variants.
                text_tasks.append(
                    TextTask(QUERY_TASK, q_texts, q_queries, RAW_PROMPT, prompt_variants(templates, RAW_PROMPT))
                )
                queries_info = {
                    "file": str(options.queries),
                    "loaded": len(loaded_queries),
                    "used": [[q.text, q.label] for q in used],
                    "left_out": [{"query": q.text, "label": q.label, "line": q.line} for q in left_out],
                }

            text_started = time.perf_counter()
            plan: list[tuple[str, list[Query], int, list[MethodSpec]]] = []
            for task in text_tasks:
                cache: dict[str, np.ndarray] = {}
                main = prompt_vectors(embedder, task.texts, task.main, cache)
                # The query's own words, never the template's ("a photo of a" matches nothing useful).
                words = [keyword_query(t) for t in task.texts] if with_texts else None
                specs = [
                    MethodSpec(method_key(m, e), _method_label(m, e), m, e, main, keep_top10=m == metric0)
                    for m, e in methods
                ]
                if run_hybrid:
                    specs.append(MethodSpec(hybrid_key(metric0), _hybrid_label(metric0), metric0, False, main, words))
                if with_texts:
                    specs.append(MethodSpec(KEYWORD_METHOD, "keyword only (full text)", keywords=words))
                for variant in task.variants:
                    vectors = prompt_vectors(embedder, task.texts, variant, cache)
                    slug, what = _variant_slug(variant, templates), prompt_name(variant)
                    key, label = f"{method_key(metric0, False)}_{slug}", f"{_method_label(metric0, False)}, {what}"
                    specs.append(MethodSpec(key, label, metric=metric0, vectors=vectors))
                    if run_hybrid:
                        key, label = f"{hybrid_key(metric0)}_{slug}", f"{_hybrid_label(metric0)}, {what}"
                        specs.append(MethodSpec(key, label, metric=metric0, vectors=vectors, keywords=words))
                plan.append((task.key, task.queries, n, specs))
            timings["text_encoding_seconds"] = time.perf_counter() - text_started
            i_queries = image_queries(indexed) if labelled else []
            if labelled:
                specs = [
                    MethodSpec(method_key(m, e), _method_label(m, e), m, e, image_vectors, keep_top10=m == metric0)
                    for m, e in methods
                ]
                plan.append((IMAGE_TASK, i_queries, n - 1, specs))

            total = sum(len(q) * len(specs) for _, q, _, specs in plan) + len(i_queries) * len(PIXEL_METRICS)
            bar = tqdm(total=total, unit="query", desc="querying", disable=not options.progress, dynamic_ncols=True)
            query_started = time.perf_counter()
            for task_key, queries, candidates, specs in plan:
                tasks[task_key] = {}
                for spec in specs:
                    bar.set_postfix_str(f"{TASK_TITLES[task_key]}, {spec.label}")
                    tops = None
                    if spec.metric is None:
                        scores, seconds = run_keyword_method(
                            session,
                            model_id,
                            spec.keywords or [],
                            queries,
                            candidates,
                            bar,
                            query_settings.hybrid_common_fraction,
                        )
                    else:
                        scores, tops, seconds = run_model_method(
                            session,
                            query_settings,
                            model_id,
                            spec.vectors,
                            queries,
                            candidates,
                            spec.metric,
                            spec.exact,
                            bar,
                            keywords=spec.keywords,
                            # Image queries search with the app's image beam, text ones with its text beam.
                            ef_search=query_settings.hnsw_ef_search_image if task_key == IMAGE_TASK else None,
                        )
                    tasks[task_key][spec.key] = MethodResult(
                        spec.key,
                        spec.label,
                        mean_scores(scores),
                        _per_class(queries, scores),
                        _latency(seconds),
                        tops if spec.keep_top10 else None,
                        scores if task_key == QUERY_TASK else None,
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
            for task_key, queries, candidates, _ in plan:
                tasks[task_key]["chance"] = MethodResult(
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
    if with_texts:
        names = [describe(item) for item in indexed.items] if describe else []
        text_fields = {
            "name_template": options.name_template,
            "description_template": options.description_template,
            "names_from_template": sum(1 for (nm, _), item in zip(names, indexed.items, strict=True) if nm != item.key)
            if options.name_template
            else 0,
            "descriptions_from_template": sum(1 for _, d in names if d),
            "examples": [[nm, d] for nm, d in names[:3]],
        }
    else:
        text_fields = None
    if run_hybrid:
        hybrid = {
            "run": True,
            "metric": metric0,
            "rrf_k": settings.rrf_k,
            "hybrid_depth": settings.hybrid_depth,
            "keywords": "the query's own words (search.keyword_query), never the prompt template's",
        }
    elif with_texts:
        hybrid = {"run": False, "reason": "hybrid search is off (CLIPGALLERY_HYBRID_SEARCH)"}
    else:
        hybrid = {
            "run": False,
            "reason": "no --name-template/--description-template: images are stored with their dataset key as "
            "name and an empty description, so full text has nothing to match (and nothing can leak)",
        }
    info.update(
        {
            "set": name,
            "source": str(options.source),
            "label_column": options.label_column,
            "captions": options.captions,
            "images": len(indexed.items),
            "classes": len(classes),
            "text_queries": len(t_queries),
            "prompt_template": None if options.captions else (templates[0] if len(templates) == 1 else None),
            "prompt_templates": None if options.captions else list(templates),
            "queries": queries_info,
            "text_fields": text_fields,
            "hybrid": hybrid,
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
                "hnsw_ef_search_image": settings.hnsw_ef_search_image,
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
    from clipgallery.evaluation_report import write_json, write_markdown, write_plot

    report = EvalReport(name, out_dir, info, tasks, index_comparison, dict(sorted(classes.items())), timings)
    write_json(report)
    write_plot(report)
    write_markdown(report)
    return report


def _index_comparison(tasks: dict[str, dict[str, MethodResult]], metric: str) -> dict[str, dict]:
    """HNSW against the exact scan of the same metric: metric deltas, latency, and how much of
    the exact top 10 the index returned (its recall against the exact answer)."""
    hnsw_key, exact_key = method_key(metric, False), method_key(metric, True)
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
        for template in _prompt_templates(options):
            args += ["--prompt-template", template]
    if options.queries:
        args += ["--queries", str(options.queries)]
        if options.query_column:
            args += ["--query-column", options.query_column]
        if options.query_label_column:
            args += ["--query-label-column", options.query_label_column]
    if options.name_template:
        args += ["--name-template", options.name_template]
    if options.description_template:
        args += ["--description-template", options.description_template]
    if options.limit is not None:
        args += ["--limit", str(options.limit)]
    if tuple(options.metrics) != METRICS:
        args += ["--metrics", ",".join(options.metrics)]
    if options.out_dir:
        args += ["--out", str(options.out_dir)]
    if options.keep_database:
        args.append("--keep-database")
    return shlex.join(args)
