"""Similarity search: one distance-ordered SQL statement per query (hybrid text search adds one
for its keyword side), bound parameters, ordered by distance then id. While the images and their
vectors are unchanged, a repeated query's page is remembered and only the version is read.

Distances are pgvector's: cosine `<=>` (0..2), L2 `<->`, negative inner product `<#>`, L1 `<+>`.
Similarity is the cosine similarity the distance implies for unit vectors (all stored vectors
are L2-normalised): cosine 1 - d, L2 1 - d^2/2, inner product -d. On unit vectors cosine, L2 and
inner product therefore rank identically; L1 does not, and has no similarity (None).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np
from sqlalchemy import text
from sqlmodel import Session

from clipgallery.config import METRICS, Settings
from clipgallery.db import fetch_rows
from clipgallery.embedding import Embedder
from clipgallery.gallery import (
    MODEL_STATE_COLUMNS,
    ImageFilters,
    NotFoundError,
    file_url,
    gallery_model_id,
    model_state_params,
    vector_to_numpy,
)
from clipgallery.imaging import DecodedImage, decode_upload
from clipgallery.models import HNSW_INDEX_NAME, METRIC_OPERATORS
from clipgallery.results import SearchHit, SearchPage

MAX_OFFSET = 10_000
# pgvector's upper bound for hnsw.ef_search.
MAX_EF_SEARCH = 1000
# An unfiltered search that means to use the HNSW index, in a gallery of fewer than this many
# stored vectors per step of its beam (ef_search), is planned without sorts, which leaves the
# index's ordered scan as its only way to rank. pgvector's cost estimate for that scan grows with
# the beam (≈ 30 units per step) and hardly with the table, a scan's with the table (≈ 0.35 per
# 512-d vector, less for fewer dimensions), so the planner scanned and sorted galleries of up to
# ≈ 85 vectors per step (110 at 384-d): at the text queries' beam of 200, a 10,000-vector gallery
# took 11-14 ms where the index takes 4-5.5 (AMD Zen 3, docs/scaling.md), while its image queries
# (beam 40) took the index. Larger galleries get the index by themselves, and skip the two
# statements that switch sorting off and on again (≈ 0.3 ms).
FORCED_INDEX_ORDER_PER_BEAM_STEP = 250


class InvalidQuery(ValueError):
    """A search parameter is out of range; the message says which and why."""


def similarity_from_distance(metric: str, distance: float) -> float | None:
    if metric == "cosine":
        return 1.0 - distance
    if metric == "l2":
        return 1.0 - distance * distance / 2.0
    if metric == "ip":
        return -distance
    return None


def distance_bound(metric: str, min_similarity: float) -> float:
    """The largest distance whose similarity is still >= min_similarity."""
    if metric == "cosine":
        return 1.0 - min_similarity
    if metric == "l2":
        return math.sqrt(max(0.0, 2.0 - 2.0 * min_similarity))
    if metric == "ip":
        return -min_similarity
    raise InvalidQuery("A minimum similarity is not defined for the L1 metric; use cosine, l2 or ip.")


def _validate(settings: Settings, k: int, offset: int, metric: str, min_similarity: float | None) -> None:
    if metric not in METRICS:
        raise InvalidQuery(f"Unknown metric {metric!r}: use one of {', '.join(METRICS)}.")
    if not 1 <= k <= settings.max_k:
        raise InvalidQuery(f"k must be between 1 and {settings.max_k}, got {k}.")
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidQuery(f"offset must be between 0 and {MAX_OFFSET}, got {offset}.")
    if min_similarity is not None and not -1.0 <= min_similarity <= 1.0:
        raise InvalidQuery(f"min_similarity must be between -1 and 1, got {min_similarity}.")
    if min_similarity is not None and metric == "l1":
        distance_bound(metric, min_similarity)


def _distance_and_conditions(
    metric: str, uses_index: bool, with_threshold: bool, with_exclude: bool, extra_conditions: Sequence[str]
) -> tuple[str, str]:
    """The distance expression and the WHERE clause shared by plain and hybrid search."""
    # `+ 0` makes the ordering expression one no index can serve: an exact, sequential scan.
    distance_sql = f"(e.embedding {METRIC_OPERATORS[metric]} :query)" + ("" if uses_index else " + 0")
    conditions = ["e.model_id = :model_id"]
    if with_exclude:
        conditions.append("e.image_id <> :exclude")
    if with_threshold:
        conditions.append(f"{distance_sql} <= :max_distance")
    conditions.extend(extra_conditions)
    return distance_sql, " AND ".join(conditions)


def _page_clause(limit: int, offset: int) -> str:
    # Row counts are written into the statement (validated integers), not bound: known, they let
    # PostgreSQL's cached generic plan keep the HNSW index scan, so a prepared search skips
    # planning (1 ms of the hybrid statement's 4.6 at 100k); bound, every execution was planned
    # anew, the generic plan being a sequential scan (docs/benchmarks.md).
    return f"LIMIT {int(limit)} OFFSET {int(offset)}"


def search_sql(
    metric: str,
    uses_index: bool,
    with_threshold: bool,
    with_exclude: bool,
    extra_conditions: Sequence[str] = (),
    *,
    limit: int,
    offset: int = 0,
) -> str:
    """The one statement behind every search (exposed so tests and docs can EXPLAIN it)."""
    distance_sql, where = _distance_and_conditions(metric, uses_index, with_threshold, with_exclude, extra_conditions)
    return (
        "SELECT i.id, i.name, i.description, i.thumbnail_path, i.stored_path, i.width, i.height, i.mime_type, "
        "n.distance "
        f"FROM ({_nearest_sql(distance_sql, where, bool(extra_conditions))} {_page_clause(limit, offset)}) n "
        "JOIN images i ON i.id = n.image_id "
        "ORDER BY n.distance, n.image_id"
    )


def _nearest_sql(distance_sql: str, where: str, filtered: bool) -> str:
    """The vector ranking (image_id, distance), nearest first, before its LIMIT. The images table
    is joined only for filters on its columns: joined unconditionally, an exact scan (a gallery
    without the HNSW index) joined every vector to its image before the sort kept k of them:
    a repeated vector-only text query at 5,000 vectors took 5.4 ms against 2.8 now, at 10,000
    9.8 against 4.2 (docs/scaling.md)."""
    join = " JOIN images i ON i.id = e.image_id" if filtered else ""
    return (
        f"SELECT e.image_id, {distance_sql} AS distance FROM image_embeddings e{join} "
        f"WHERE {where} ORDER BY distance, e.image_id"
    )


# The keyword side ranks at most KEYWORD_SCAN_LIMIT matching images per word of the query, each
# word's drawn from a random sample of about GIN_FUZZY_SEARCH_LIMIT (PostgreSQL's
# gin_fuzzy_search_limit) when it has more matches. A word shared by thousands of images says
# little about any one of them, and listing and ranking all its matches cost 5x the whole vector
# search at 1M images (docs/benchmarks.md); rarer words keep every match. Per word, not per
# query: GIN samples only when every word of its query is frequent, so one rare word made the
# frequent one's every match be listed (10-17 ms at 1M images, 5-7 per word); and a cap on the whole OR query
# filled up with the frequent word's matches before the rare word's, which are the best ones.
KEYWORD_SCAN_LIMIT = 300
GIN_FUZZY_SEARCH_LIMIT = 1000
# Words of a query, for the keyword side of hybrid search. At most 32: the rest adds nothing.
_WORD = re.compile(r"\w+")
MAX_KEYWORDS = 32

# The query's words as a tsquery: English stemming and stop words (to_tsvector), OR-ed (so "a
# photo of a red dress" still matches "Red Dress", and images matching more words rank higher),
# without the words that occur in more than :common_fraction of all images. Those come from
# PostgreSQL's own statistics of the column (pg_stats.most_common_elems, kept by ANALYZE and
# autovacuum): like a search engine's stop words, but learnt from the gallery ("men" in a fashion
# catalogue), and they would otherwise make the keyword side both slower and noisier. Without
# statistics (a gallery never analysed) no word is dropped. Lexemes are passed as quoted literals
# to to_tsquery('simple'), so no character of the query acts as tsquery syntax.
WORDS_CTE_SQL = (
    "common_words AS ("
    "SELECT c.word FROM pg_stats s, "
    "unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs) AS c(word, frequency) "
    "WHERE s.schemaname = current_schema() AND s.tablename = 'images' AND s.attname = 'search_document' "
    "AND c.word IS NOT NULL AND c.frequency > :common_fraction), "
    "words AS ("
    "SELECT coalesce(to_tsquery('simple', string_agg(chr(39) || w.lexeme || chr(39), ' | ')), ''::tsquery) "
    "AS query, array_agg(w.lexeme) AS lexemes "
    "FROM unnest(to_tsvector('english', :keywords)) AS w "
    "WHERE strpos(w.lexeme, chr(39)) = 0 AND strpos(w.lexeme, chr(92)) = 0 "
    "AND w.lexeme NOT IN (SELECT word FROM common_words))"
)


def keyword_query(query: str) -> str | None:
    """The words of a query for the keyword side of hybrid search (at most MAX_KEYWORDS, as
    plain text: `WORDS_CTE_SQL` turns them into a tsquery), or None without any word."""
    words = _WORD.findall(query.lower())[:MAX_KEYWORDS]
    return " ".join(words) or None


def keyword_ranking_sql(
    with_exclude: bool,
    extra_conditions: Sequence[str] = (),
    *,
    depth: int,
    keyword_scan: int = KEYWORD_SCAN_LIMIT,
) -> str:
    """The keyword side of hybrid search: the ids of the `depth` images whose names and
    descriptions best match the query's words (:keywords), best first (ts_rank_cd over all the
    words), drawn from up to `keyword_scan` matches of each word. Filters and the excluded image
    apply here; the model and the similarity threshold apply to every fused row
    (`hybrid_search_sql`): joining each match to its vector would cost more than the ranking."""
    word_where = " AND ".join(
        ["i.search_document @@ to_tsquery('simple', chr(39) || l.lexeme || chr(39))", *extra_conditions]
    )
    if with_exclude:
        word_where += " AND i.id <> :exclude"
    return (
        f"WITH {WORDS_CTE_SQL}, "
        "keyword_matches AS ("
        "SELECT DISTINCT ON (m.id) m.id, m.search_document FROM words, unnest(words.lexemes) AS l(lexeme), "
        f"LATERAL (SELECT i.id, i.search_document FROM images i WHERE {word_where} LIMIT {int(keyword_scan)}) m) "
        "SELECT m.id FROM keyword_matches m, words "
        f"ORDER BY ts_rank_cd(m.search_document, words.query) DESC, m.id LIMIT {int(depth)}"
    )


# What a search's results depend on besides its own statement and parameters: the images and
# their vectors, whose version moves on with every change (a statement trigger on each table,
# migrations 0006 and 0007), and the column statistics that pick the keyword side's common words
# (`WORDS_CTE_SQL`), which ANALYZE renews without changing a row. The version is a sequence, moved
# on when a writer's statement runs, not when it commits: `settled` says that no transaction held
# a transaction id once the version had been read (the check reads the version first), so every
# change it counts was committed before the statements that follow take their snapshots. Only
# results read so are remembered; any writer in progress (on the whole server, prepared
# transactions included: their pid is null) means no caching. A version is only comparable within
# one sequence: `images_origin` tells a database dropped and made again under the same name (from
# the same template: same objects, same version), or a schema migrated down and up again, apart.
IMAGES_STATE_COLUMNS = (
    "(SELECT ARRAY[v.last_value, (pg_current_xact_id_if_assigned() IS NULL AND NOT EXISTS ("
    "SELECT FROM pg_locks l WHERE l.locktype = 'transactionid' AND l.pid IS DISTINCT FROM pg_backend_pid() "
    "AND v.last_value IS NOT NULL))::int] FROM images_version v) AS images_version, "
    "ARRAY[(SELECT d.oid FROM pg_database d WHERE d.datname = current_database()), "
    "'images_version'::regclass::oid] AS images_origin, "
    "greatest(pg_stat_get_last_analyze_time('images'::regclass), "
    "pg_stat_get_last_autoanalyze_time('images'::regclass)) AS images_analyzed"
)


class RecentResults:
    """The most recently used results of a kind, by key, within a bound on their number and on
    their summed length (rows): thread-safe, for the app's threads to share."""

    def __init__(self, max_entries: int, max_rows: int) -> None:
        self.max_entries = max_entries
        self.max_rows = max_rows
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, value: Sequence) -> None:
        value = tuple(value)
        if len(value) > self.max_rows:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            self._rows += len(value) - (len(previous) if previous is not None else 0)
            self._entries[key] = value
            while len(self._entries) > self.max_entries or self._rows > self.max_rows:
                _, evicted = self._entries.popitem(last=False)
                self._rows -= len(evicted)

    def get_or_read(self, key: tuple | None, read: Callable[[], Sequence], may_store: bool) -> tuple:
        """The results remembered under `key` (None: never remembered), else `read()`'s, kept
        if `may_store` (the version they were read under was settled)."""
        if key is not None:
            found = self.get(key)
            if found is not None:
                return found
        value = tuple(read())
        if key is not None and may_store:
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._rows = 0


# Keyword rankings of recent unfiltered queries: a text query whose page is not remembered (a new
# page of it, or the same words through another model) skips its keyword statement (3-5 ms at
# 100k-1M images, docs/benchmarks.md) while the images are unchanged.
KEYWORD_CACHE_SIZE = 1024
recent_keyword_rankings = RecentResults(KEYWORD_CACHE_SIZE, max_rows=KEYWORD_CACHE_SIZE * 200)
# Result pages of recent unfiltered searches (text, image and "more like this"), as rows, keyed by
# everything the statement reads: a repeated query, or paging back, costs one round trip that
# checks the version instead of the graph walk (5-8 ms at 100k vectors on 2 cores, at the text
# queries' ef_search 200). Any change to the images or their vectors moves the version on, so new,
# edited and deleted images show at once, as they would without it.
PAGE_CACHE_SIZE = 1024
recent_pages = RecentResults(PAGE_CACHE_SIZE, max_rows=20_000)


def hybrid_search_sql(
    metric: str,
    uses_index: bool,
    with_threshold: bool,
    with_exclude: bool,
    extra_conditions: Sequence[str] = (),
    *,
    limit: int,
    offset: int = 0,
    depth: int,
) -> str:
    """Hybrid search: reciprocal rank fusion of the vector ranking and the keyword ranking
    (:keyword_ids, best first, from `keyword_ranking_sql`), score = sum over both of
    1 / (rrf_k + rank).

    Each side ranks its best `depth` images; an image found by one side only gets that side's
    term. Ties go to the nearer vector, then the lower id. The keyword side is a statement of
    its own because it does not need the query's vector: it runs while a text query is still
    being encoded (`search_text`)."""
    distance_sql, where = _distance_and_conditions(metric, uses_index, with_threshold, with_exclude, extra_conditions)
    operator = METRIC_OPERATORS[metric]
    threshold = " AND f.distance <= :max_distance" if with_threshold else ""
    # The page is cut before the images are joined, and only the keyword side's own rows look up
    # their vector: joining all 2 x depth fused rows to both tables was a third of the statement
    # (160 index probes at depth 40). An image without a vector of this model (distance NULL)
    # drops out, as the join did; everything is read in the statement's one snapshot. `fused` is
    # materialised so a keyword-only row's vector is read once, not again for the ORDER BY.
    return (
        f"WITH semantic AS ({_nearest_sql(distance_sql, where, bool(extra_conditions))} LIMIT {int(depth)}), "
        "semantic_ranked AS ("
        "SELECT image_id AS id, distance, row_number() OVER (ORDER BY distance, image_id) AS rank FROM semantic), "
        "keyword AS (SELECT k.id, k.rank FROM unnest(CAST(:keyword_ids AS integer[])) WITH ORDINALITY AS k(id, rank)), "
        "fused AS MATERIALIZED ("
        "SELECT coalesce(s.id, k.id) AS id, "
        "coalesce(1.0 / (:rrf_k + s.rank), 0) + coalesce(1.0 / (:rrf_k + k.rank), 0) AS score, "
        "k.rank IS NOT NULL AS text_match, "
        "coalesce(s.distance, (SELECT e.embedding "
        f"{operator} :query FROM image_embeddings e WHERE e.image_id = k.id AND e.model_id = :model_id)) AS distance "
        "FROM semantic_ranked s FULL OUTER JOIN keyword k ON k.id = s.id), "
        "page AS ("
        f"SELECT f.id, f.score, f.text_match, f.distance FROM fused f WHERE f.distance IS NOT NULL{threshold} "
        f"ORDER BY f.score DESC, f.distance, f.id {_page_clause(limit, offset)}) "
        "SELECT i.id, i.name, i.description, i.thumbnail_path, i.stored_path, i.width, i.height, i.mime_type, "
        "p.distance, p.score, p.text_match "
        "FROM page p JOIN images i ON i.id = p.id "
        "ORDER BY p.score DESC, p.distance, p.id"
    )


def search_vector(
    session: Session,
    settings: Settings,
    model: int | Embedder,
    vector: np.ndarray | Future[np.ndarray],
    k: int = 20,
    offset: int = 0,
    min_similarity: float | None = None,
    metric: str | None = None,
    exact: bool = False,
    exclude_image_id: int | None = None,
    filters: ImageFilters | None = None,
    keywords: str | None = None,
    ef_search: int | None = None,
) -> SearchPage:
    """Nearest stored images to `vector`, optionally filtered. `model`: the id of the model that
    made `vector`, or the configured Embedder, whose id is then checked (`gallery_model_id`) in
    the round trip that sets the transaction's search settings. `vector` may still be being
    computed (a Future): it is waited for only once the statements that do not need it are done.
    `ef_search`: the HNSW beam (default: `hnsw_ef_search`, the text queries' setting; image
    queries pass `hnsw_ef_search_image`), raised to the page's depth when that is deeper.

    With `keywords` (the query's words, see `keyword_query`) the ranking is hybrid: the vector
    ranking fused with full-text search over names and descriptions (`hybrid_search_sql`).

    An unfiltered search's page is remembered (`recent_pages`) and served again, after the one
    round trip, for as long as the images and their vectors are unchanged (`IMAGES_STATE_COLUMNS`)."""
    metric = metric or settings.index_metric
    _validate(settings, k, offset, metric, min_similarity)
    uses_index = metric == settings.index_metric and not exact
    try:
        filter_sql, filter_params = (filters or ImageFilters()).conditions()
    except ValueError as exc:
        raise InvalidQuery(str(exc)) from None
    shape = (metric, uses_index, min_similarity is not None, exclude_image_id is not None, filter_sql)
    depth = offset + k + 1
    params: dict = dict(filter_params)
    if keywords:
        depth = max(settings.hybrid_depth, depth)
        sql = hybrid_search_sql(*shape, limit=k + 1, offset=offset, depth=depth)
        keyword_sql = keyword_ranking_sql(exclude_image_id is not None, filter_sql, depth=depth)
        params.update(keywords=keywords, rrf_k=settings.rrf_k, common_fraction=settings.hybrid_common_fraction)
    else:
        sql = search_sql(*shape, limit=k + 1, offset=offset)
    if exclude_image_id is not None:
        params["exclude"] = exclude_image_id
    if min_similarity is not None:
        params["max_distance"] = distance_bound(metric, min_similarity)
    # Transaction-local settings and the model check, all in one round trip.
    configs: list[str] = []
    if uses_index:
        beam = min(MAX_EF_SEARCH, max(ef_search or settings.hnsw_ef_search, depth))
        configs.append(f"set_config('hnsw.ef_search', '{int(beam)}', true) AS ef_search")
        # Filters (model, threshold, excluded image) can drop candidates: the iterative scan keeps
        # searching the graph until the page is full.
        if _has_iterative_scan(session):
            configs.append("set_config('hnsw.iterative_scan', 'strict_order', true) AS iterative_scan")
    if keywords:
        # A word in tens of thousands of images would make the GIN index list them all; a random
        # sample of about this many is what the keyword side can use anyway (KEYWORD_SCAN_LIMIT).
        configs.append(f"set_config('gin_fuzzy_search_limit', '{GIN_FUZZY_SEARCH_LIMIT}', true) AS gin_limit")
    # Only unfiltered searches are cached: a filter may read other tables (the uploader's name).
    cacheable = not filter_sql
    columns = [*configs, *([IMAGES_STATE_COLUMNS] if cacheable else [])]
    if uses_index:
        # A bulk run may have dropped the index for its duration (`db.deferred_vector_index`): the
        # same statement then scans every vector, and the page says it is exact.
        columns.append(f"to_regclass('{HNSW_INDEX_NAME}') IS NOT NULL AS vector_index_present")
        # The planner's own count (-1 before the table's first ANALYZE).
        columns.append(
            "(SELECT c.reltuples FROM pg_class c WHERE c.oid = 'image_embeddings'::regclass) AS stored_vectors"
        )
    # The search statements go through the driver directly (`db.fetch_rows`).
    if isinstance(model, Embedder):
        state_sql = f"SELECT {', '.join([*columns, MODEL_STATE_COLUMNS])}"
        state = fetch_rows(session, state_sql, model_state_params(model))[0]
        params["model_id"] = gallery_model_id(session, model, state)
    else:
        state = fetch_rows(session, f"SELECT {', '.join(columns)}")[0] if columns else None
        params["model_id"] = model
    version, settled = None, False
    if cacheable:
        last_value, settled = state.images_version
        # The server's address as a string: a URL object renders itself anew for every hash
        # (0.04 ms each, four per remembered search).
        version = (str(session.get_bind().url), tuple(state.images_origin), last_value)
    if keywords:
        key = None
        if cacheable and exclude_image_id is None:
            key = (version, state.images_analyzed, keywords, depth, settings.hybrid_common_fraction)
        keyword_ids = recent_keyword_rankings.get_or_read(
            key, lambda: session.execute(text(keyword_sql), params).scalars().all(), bool(settled)
        )
        params["keyword_ids"] = list(keyword_ids)  # bound as an array
    query = np.asarray(vector.result() if isinstance(vector, Future) else vector, dtype=np.float32)
    params["query"] = query
    # Filtered searches keep the planner's choice: a filter that keeps few images is answered
    # faster, and exactly, by scanning them (FORCED_INDEX_ORDER_PER_BEAM_STEP).
    planner_settings = None
    if uses_index and not filter_sql and state.stored_vectors < FORCED_INDEX_ORDER_PER_BEAM_STEP * beam:
        planner_settings = {"enable_sort": "off"}
    page_key = None
    if cacheable:
        # Everything the statement reads besides the tables the version covers. The keyword ids
        # follow from the words, the version and the statistics.
        scalars = tuple(sorted((name, value) for name, value in params.items() if name not in ("query", "keyword_ids")))
        page_key = (
            version,
            state.images_analyzed if keywords else None,
            tuple(configs),
            planner_settings is not None,
            uses_index and state.vector_index_present,
            sql,
            scalars,
            query.tobytes(),
        )
    rows = recent_pages.get_or_read(page_key, lambda: fetch_rows(session, sql, params, planner_settings), bool(settled))
    hits = [
        SearchHit(
            id=row.id,
            name=row.name,
            description=row.description,
            distance=float(row.distance),
            similarity=similarity_from_distance(metric, float(row.distance)),
            thumbnail_url=file_url(row.thumbnail_path),
            original_url=file_url(row.stored_path),
            width=row.width,
            height=row.height,
            mime_type=row.mime_type,
            score=float(row.score) if keywords else None,
            text_match=bool(row.text_match) if keywords else False,
        )
        for row in rows[:k]
    ]
    return SearchPage(
        hits=hits,
        metric=metric,
        k=k,
        offset=offset,
        has_more=len(rows) > k,
        exact=not (uses_index and state.vector_index_present),
        hybrid=bool(keywords),
    )


_iterative_scan_support: dict[str, bool] = {}


def _has_iterative_scan(session: Session) -> bool:
    url = str(session.get_bind().url)
    if url not in _iterative_scan_support:
        version = session.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar() or "0"
        major_minor = tuple(int(p) for p in version.split(".")[:2])
        _iterative_scan_support[url] = major_minor >= (0, 8)
    return _iterative_scan_support[url]


def search_text(session: Session, embedder: Embedder, query: str, hybrid: bool | None = None, **options) -> SearchPage:
    """Images matching a text query: hybrid (vector + full-text over names and descriptions)
    unless `hybrid` is False or the `hybrid_search` setting is off."""
    query = query.strip()
    if not query:
        raise InvalidQuery("The query is empty.")
    if len(query) > 1000:
        raise InvalidQuery("The query is longer than 1,000 characters.")
    use_hybrid = embedder.settings.hybrid_search if hybrid is None else hybrid
    keywords = keyword_query(query) if use_hybrid else None
    vector = embedder.submit_text(query)  # encoded while the statements that do not need it run
    return search_vector(session, embedder.settings, embedder, vector, keywords=keywords, **options)


def encode_query_image(embedder: Embedder, data: bytes) -> tuple[np.ndarray, DecodedImage]:
    """The query vector of an image given as bytes (validated like an upload; nothing is stored),
    with the decoded image (for a preview)."""
    decoded = decode_upload(data, embedder.settings)
    return embedder.encode_images([decoded.rgb])[0], decoded


def search_by_vector(session: Session, embedder: Embedder, vector: np.ndarray, **options) -> SearchPage:
    """Images nearest to an image query's vector made by the configured model (e.g. a remembered
    image query, so paging does not need the image again)."""
    settings = embedder.settings
    vector = np.asarray(vector, dtype=np.float32)
    return search_vector(session, settings, embedder, vector, ef_search=settings.hnsw_ef_search_image, **options)


def search_image_bytes(session: Session, embedder: Embedder, data: bytes, **options) -> SearchPage:
    """Images similar to an image given as bytes (validated like an upload; nothing is stored)."""
    vector, _decoded = encode_query_image(embedder, data)
    return search_by_vector(session, embedder, vector, **options)


def search_similar(session: Session, embedder: Embedder, image_id: int, **options) -> SearchPage:
    """ "More like this": neighbours of a stored image's own vector, the image itself left out,
    once the configured model is checked against the gallery's vectors."""
    return search_similar_by_model(session, embedder.settings, gallery_model_id(session, embedder), image_id, **options)


def search_similar_by_model(
    session: Session, settings: Settings, model_id: int, image_id: int, **options
) -> SearchPage:
    """`search_similar` among the vectors of model `model_id`: stored vectors against stored
    vectors need no model loaded (the command line's, with `duplicates.stored_model_id`)."""
    vector = session.execute(
        text("SELECT embedding FROM image_embeddings WHERE image_id = :id AND model_id = :model_id"),
        {"id": image_id, "model_id": model_id},
    ).scalar()
    if vector is None:
        raise NotFoundError(f"No image with id {image_id} has a vector of the gallery's model.")
    return search_vector(
        session,
        settings,
        model_id,
        vector_to_numpy(vector),
        exclude_image_id=image_id,
        ef_search=settings.hnsw_ef_search_image,
        **options,
    )
