import numpy as np
import pytest
from sqlalchemy import text

from clipgallery.config import ConfigError, load_settings
from clipgallery.gallery import vector_to_numpy
from clipgallery.ingest import ingest_image
from clipgallery.models import HNSW_INDEX_NAME
from clipgallery.results import format_score
from clipgallery.search import (
    InvalidQuery,
    search_by_vector,
    search_image_bytes,
    search_similar,
    search_sql,
    search_text,
    search_vector,
)
from tests.conftest import ids_page_by_page, insert_synthetic_images, jpeg


@pytest.fixture
def gallery(session, embedder, storage):
    ids = []
    for seed in range(40):
        outcome = ingest_image(session, embedder, storage, jpeg(100 + seed), f"img{seed}.jpg", f"Picture {seed}")
        assert outcome.status == "added"
        ids.append(outcome.image_id)
    return ids


def _stored_vectors(session) -> tuple[list[int], np.ndarray]:
    rows = session.execute(text("SELECT image_id, embedding FROM image_embeddings ORDER BY image_id")).all()
    return [r[0] for r in rows], np.stack([vector_to_numpy(r[1]) for r in rows])


def _brute_force(ids, vectors, query, metric):
    if metric == "cosine":
        d = 1 - vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    elif metric == "l2":
        d = np.linalg.norm(vectors - query, axis=1)
    elif metric == "ip":
        d = -(vectors @ query)
    else:
        d = np.abs(vectors - query).sum(axis=1)
    return sorted(zip(d.tolist(), ids, strict=True))


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip", "l1"])
def test_exact_search_order_equals_brute_force_order(metric, gallery, session, embedder):
    ids, vectors = _stored_vectors(session)
    query = embedder.encode_text("a red square")
    expected = _brute_force(ids, vectors, query, metric)[:15]
    page = search_text(session, embedder, "a red square", k=15, metric=metric, exact=True)
    assert page.exact
    assert [h.id for h in page.hits] == [i for _, i in expected]
    assert [h.distance for h in page.hits] == pytest.approx([d for d, _ in expected], abs=1e-5)
    if metric == "l1":
        assert all(h.similarity is None for h in page.hits)
    else:
        # On unit vectors every metric implies the same cosine similarity.
        cosine = search_text(session, embedder, "a red square", k=15, metric="cosine", exact=True)
        assert [h.id for h in page.hits] == [h.id for h in cosine.hits]
        assert [h.similarity for h in page.hits] == pytest.approx([h.similarity for h in cosine.hits], abs=1e-5)


def test_index_search_matches_exact_search_on_a_small_gallery(gallery, session, embedder):
    approx = search_text(session, embedder, "blue circles", k=10)
    exact = search_text(session, embedder, "blue circles", k=10, exact=True)
    assert not approx.exact and exact.exact
    assert [h.id for h in approx.hits] == [h.id for h in exact.hits]


def test_paging_walks_the_whole_order_without_gaps_or_repeats(gallery, session, embedder):
    full = search_text(session, embedder, "green", k=40, exact=True)
    assert not full.has_more and len(full.hits) == 40
    collected = ids_page_by_page(session, embedder, "green", k=7)
    assert collected == [h.id for h in full.hits]
    distances = [h.distance for h in full.hits]
    assert distances == sorted(distances)


def test_minimum_similarity_cuts_the_list(gallery, session, embedder):
    full = search_text(session, embedder, "yellow", k=40, exact=True)
    # Halfway between the 11th and 12th similarity, clear of rounding at the boundary.
    cut = (full.hits[10].similarity + full.hits[11].similarity) / 2
    for metric in ("cosine", "l2", "ip"):
        page = search_text(session, embedder, "yellow", k=40, min_similarity=cut, metric=metric)
        assert [h.id for h in page.hits] == [h.id for h in full.hits[:11]]
        assert all(h.similarity >= cut for h in page.hits)
    with pytest.raises(InvalidQuery, match="L1"):
        search_text(session, embedder, "yellow", min_similarity=0.5, metric="l1")


def test_image_query_with_a_stored_images_bytes_finds_it_first(gallery, session, embedder):
    page = search_image_bytes(session, embedder, jpeg(100 + 17), k=5)
    assert page.hits[0].id == gallery[17]
    assert page.hits[0].distance == pytest.approx(0.0, abs=1e-5)
    assert page.hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert page.hits[1].distance > 1e-4


def test_more_like_this_leaves_the_image_itself_out(gallery, session, embedder):
    page = search_similar(session, embedder, gallery[3], k=39)
    ids = [h.id for h in page.hits]
    assert gallery[3] not in ids and len(ids) == 39
    direct = search_image_bytes(session, embedder, jpeg(103), k=40, exact=True)
    assert ids == [h.id for h in direct.hits if h.id != gallery[3]]


def test_image_queries_search_with_a_narrower_beam_than_text_queries(gallery, session, embedder, settings):
    # A text query lies far from every image and needs the wide beam; an image query's neighbours
    # are close (docs/benchmarks.md). set_config(..., true) lasts until the transaction ends.
    def beam() -> int:
        return int(session.execute(text("SELECT current_setting('hnsw.ef_search')")).scalar())

    text_beam, image_beam = settings.hnsw_ef_search, settings.hnsw_ef_search_image
    assert (text_beam, image_beam) == (200, 40)
    search_text(session, embedder, "a red square", k=5)
    assert beam() == text_beam
    search_similar(session, embedder, gallery[3], k=5)
    assert beam() == image_beam
    search_text(session, embedder, "a red square", k=5, hybrid=False)
    assert beam() == text_beam
    search_image_bytes(session, embedder, jpeg(103), k=5)
    assert beam() == image_beam
    search_text(session, embedder, "a red square", k=5)
    search_by_vector(session, embedder, embedder.encode_text("blue"), k=5)
    assert beam() == image_beam
    # Deep pages widen either beam to the page's depth (offset + k + 1).
    search_similar(session, embedder, gallery[3], k=30, offset=30)
    assert beam() == 61
    search_text(session, embedder, "a red square", k=30, offset=200, hybrid=False)
    assert beam() == 231


def test_the_image_beam_is_configurable(monkeypatch):
    assert load_settings().hnsw_ef_search_image == 40
    monkeypatch.setenv("CLIPGALLERY_HNSW_EF_SEARCH_IMAGE", "64")
    assert load_settings().hnsw_ef_search_image == 64
    monkeypatch.setenv("CLIPGALLERY_HNSW_EF_SEARCH_IMAGE", "0")
    with pytest.raises(ConfigError, match="CLIPGALLERY_HNSW_EF_SEARCH_IMAGE"):
        load_settings()


def test_hits_carry_what_a_result_tile_needs(gallery, session, embedder):
    hit = search_text(session, embedder, "anything", k=1).hits[0]
    assert hit.name.startswith("Picture ")
    assert hit.thumbnail_url.startswith("/files/thumbs/") and hit.original_url.startswith("/files/originals/")
    assert hit.similarity == pytest.approx(1 - hit.distance)


@pytest.mark.parametrize(
    "options,words",
    [
        ({"k": 0}, "k must be between"),
        ({"k": 100000}, "k must be between"),
        ({"offset": -1}, "offset must be between"),
        ({"metric": "hamming"}, "Unknown metric"),
        ({"min_similarity": 3.0}, "min_similarity must be between"),
    ],
)
def test_bad_parameters_are_refused_clearly(options, words, gallery, session, embedder):
    with pytest.raises(InvalidQuery, match=words):
        search_text(session, embedder, "x", **options)


def test_empty_query_is_refused(session, embedder):
    with pytest.raises(InvalidQuery, match="empty"):
        search_text(session, embedder, "   ")


def test_the_default_search_uses_the_hnsw_index_on_thousands_of_rows(session, embedder, settings):
    """Several thousand vectors: the HNSW index can serve the statement (EXPLAIN shows its scan).
    With the test model's 64 dimensions, scanning and sorting 5,000 rows looks cheaper to the
    planner unless told otherwise, as the search tells it (below)."""
    from clipgallery.gallery import gallery_model_id

    model_id = gallery_model_id(session, embedder)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 64))
    vectors = centres[rng.integers(0, 20, 5000)] + 0.3 * rng.normal(size=(5000, 64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = insert_synthetic_images(session, model_id, vectors, settings=settings)
    session.execute(text("ANALYZE images; ANALYZE image_embeddings"))

    sql = search_sql("cosine", uses_index=True, with_threshold=False, with_exclude=False, limit=21)
    params = {"query": vectors[0].astype(np.float32), "model_id": model_id}
    session.execute(text("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off"))
    plan = "\n".join(session.execute(text("EXPLAIN " + sql), params).scalars())
    assert HNSW_INDEX_NAME in plan, plan
    # Only the k + 1 nearest rows are joined to their images (not every vector, as before a sort).
    assert plan.index("Limit") < plan.index(HNSW_INDEX_NAME) and "images_pkey" in plan, plan
    session.execute(text("RESET enable_seqscan; RESET enable_sort"))

    exact_sql = search_sql("cosine", uses_index=False, with_threshold=False, with_exclude=False, limit=21)
    exact_plan = "\n".join(session.execute(text("EXPLAIN " + exact_sql), params).scalars())
    assert HNSW_INDEX_NAME not in exact_plan
    assert exact_plan.index("Limit") < exact_plan.index("Seq Scan on image_embeddings"), exact_plan

    page = search_vector(session, settings, model_id, vectors[0], k=10)
    exact = search_vector(session, settings, model_id, vectors[0], k=10, exact=True)
    assert page.hits[0].id == ids[0]
    assert len({h.id for h in page.hits} & {h.id for h in exact.hits}) >= 9


def _hnsw_scans(session) -> int:
    """Scans of the HNSW index so far in this transaction (counted as they happen)."""
    return session.execute(text(f"SELECT pg_stat_get_xact_numscans('{HNSW_INDEX_NAME}'::regclass)")).scalar_one()


def test_a_small_gallery_with_the_index_searches_it_at_the_text_beam(session, embedder, settings, monkeypatch):
    """pgvector's cost estimate for the HNSW scan grows with ef_search, so at the text queries'
    beam (200) the planner scanned and sorted every vector of a gallery this small (at 512-d, of one
    up to ≈ 17,000 vectors: 11-14 ms where the index takes 4-5.5 at 10,000). The search plans its
    statement without sorts, so the index's ordered scan is the plan; only for that statement."""
    from clipgallery import search as search_module
    from clipgallery.gallery import gallery_model_id

    model_id = gallery_model_id(session, embedder)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(1000, 64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    insert_synthetic_images(session, model_id, vectors, settings=settings)
    session.execute(text("ANALYZE images; ANALYZE image_embeddings"))
    assert settings.hnsw_ef_search == 200

    for hybrid in (False, True):
        before = _hnsw_scans(session)
        page = search_text(session, embedder, f"item {hybrid}", k=10, hybrid=hybrid)
        assert not page.exact and len(page.hits) == 10
        assert _hnsw_scans(session) == before + 1
        # The rest of the transaction is planned as usual.
        assert session.execute(text("SHOW enable_sort")).scalar_one() == "on"

    # Left to itself, the planner scans and sorts the same statements (the index is not touched).
    monkeypatch.setattr(search_module, "FORCED_INDEX_ORDER_PER_BEAM_STEP", 0)
    before = _hnsw_scans(session)
    for hybrid in (False, True):
        assert not search_text(session, embedder, f"another item {hybrid}", k=10, hybrid=hybrid).exact
    assert _hnsw_scans(session) == before


def test_filters_narrow_browsing_and_similarity_search_alike(session, embedder, storage):
    from datetime import date, timedelta

    from clipgallery import auth
    from clipgallery.gallery import ImageFilters, browse_images
    from tests.conftest import encode, picture

    admin = auth.create_user(session, "ann", "anns long password")
    ingest_image(session, embedder, storage, jpeg(1), "a.jpg", "Red 50% off_sale", "summer dress", uploaded_by=admin.id)
    ingest_image(session, embedder, storage, jpeg(2), "b.jpg", "Blue shoes", "leather", uploaded_by=admin.id)
    ingest_image(session, embedder, storage, encode(picture(3), "PNG"), "c.png", "Red hat", "wool")
    ingest_image(session, embedder, storage, jpeg(4), "d.jpg", "Green sale", "cotton")

    def names(filters, sort="name"):
        return [item.name for item in browse_images(session, filters, sort=sort).items]

    assert names(None) == ["Blue shoes", "Green sale", "Red 50% off_sale", "Red hat"]
    assert names(None, sort="newest") == ["Green sale", "Red hat", "Blue shoes", "Red 50% off_sale"]
    assert names(ImageFilters(text="red")) == ["Red 50% off_sale", "Red hat"]
    assert names(ImageFilters(text="red DRESS")) == ["Red 50% off_sale"]
    assert names(ImageFilters(text="50%")) == ["Red 50% off_sale"]  # % is a character, not a wildcard
    assert names(ImageFilters(text="f_s")) == ["Red 50% off_sale"]
    assert names(ImageFilters(text="e_s")) == []  # _ is a character too
    assert names(ImageFilters(uploader="ann")) == ["Blue shoes", "Red 50% off_sale"]
    assert names(ImageFilters(mime_type="image/png")) == ["Red hat"]
    today = date.today()
    assert len(names(ImageFilters(added_from=today, added_to=today))) == 4
    assert names(ImageFilters(added_to=today - timedelta(days=1))) == []
    page = browse_images(session, None, sort="name", limit=3)
    assert page.total == 4 and page.has_more and len(page.items) == 3

    hits = search_text(session, embedder, "something red", k=10, filters=ImageFilters(text="red"))
    assert sorted(h.name for h in hits.hits) == ["Red 50% off_sale", "Red hat"]
    hits = search_text(session, embedder, "x", k=10, filters=ImageFilters(uploader="ann", mime_type="image/jpeg"))
    assert sorted(h.name for h in hits.hits) == ["Blue shoes", "Red 50% off_sale"]
    with pytest.raises(InvalidQuery, match="Unknown format"):
        search_text(session, embedder, "x", filters=ImageFilters(mime_type="text/html"))


def test_statements_run_through_the_driver_keep_their_parameters_casts_and_transaction(session):
    """`db.fetch_rows`, the search path's way to the database: `:name` parameters as for text(),
    a literal % and :: casts untouched, run in the session's own transaction."""
    from clipgallery.db import fetch_rows

    session.execute(text("CREATE TEMPORARY TABLE scratch (value text) ON COMMIT DROP"))
    session.execute(text("INSERT INTO scratch VALUES ('seen')"))
    (row,) = fetch_rows(
        session,
        "SELECT '50%' AS share, CAST(:number AS integer) + 1 AS next, CAST(:word AS text) || 's'::text AS plural, "
        "(SELECT value FROM scratch) AS same_transaction",
        {"number": 41, "word": "cat"},
    )
    assert (row.share, row.next, row.plural, row.same_transaction) == ("50%", 42, "cats", "seen")
    # Planner settings hold for their statement only, in the same transaction.
    (row,) = fetch_rows(
        session,
        "SELECT current_setting('enable_sort') AS sorting, (SELECT value FROM scratch) AS same_transaction",
        planner_settings={"enable_sort": "off"},
    )
    assert (row.sorting, row.same_transaction) == ("off", "seen")
    assert session.execute(text("SHOW enable_sort")).scalar_one() == "on"
    session.rollback()


def test_a_connection_lost_under_a_search_statement_is_replaced(session, settings):
    """As with SQLAlchemy's own statements: the failed statement raises, the rollback succeeds and
    the session's next statement runs on a new connection."""
    import psycopg

    from clipgallery.db import database_url, fetch_rows, libpq_url

    pid = fetch_rows(session, "SELECT pg_backend_pid() AS pid")[0].pid
    with psycopg.connect(libpq_url(database_url(settings)), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        fetch_rows(session, "SELECT 1 AS one")
    session.rollback()
    assert fetch_rows(session, "SELECT pg_backend_pid() AS pid")[0].pid != pid


@pytest.mark.parametrize(
    ("value", "decimals", "shown"),
    [(-0.0004, 3, "0.000"), (-1.2e-7, 4, "0.0000"), (-0.0006, 3, "-0.001"), (0.31249, 3, "0.312"), (1.0, 4, "1.0000")],
)
def test_scores_are_shown_without_a_minus_zero(value, decimals, shown):
    # An image's float cosine distance to itself can be -1.2e-7: the CLI printed "-0.0000".
    assert format_score(value, decimals) == shown
