"""Hybrid search: the vector ranking fused with full-text search over names and descriptions."""

import numpy as np
import pytest
from sqlalchemy import text

from clipgallery.gallery import ImageFilters, gallery_model_id, update_image
from clipgallery.ingest import ingest_image
from clipgallery.models import HNSW_INDEX_NAME, SEARCH_DOCUMENT_INDEX_NAME
from clipgallery.search import (
    WORDS_CTE_SQL,
    hybrid_search_sql,
    keyword_query,
    keyword_ranking_sql,
    search_text,
    search_vector,
)
from tests.conftest import encode, ids_page_by_page, insert_synthetic_images, jpeg, picture


@pytest.fixture
def gallery(session, embedder, storage):
    ids = []
    for seed in range(30):
        outcome = ingest_image(session, embedder, storage, jpeg(300 + seed), f"p{seed}.jpg", f"Picture {seed}")
        ids.append(outcome.image_id)
    return ids


def test_keyword_query_keeps_the_words_and_nothing_else():
    assert keyword_query("A photo of a red dress") == "a photo of a red dress"
    assert keyword_query("'; DROP TABLE images; --") == "drop table images"
    assert keyword_query("&|!:*()<->") is None
    assert keyword_query("Café crème") == "café crème"
    assert len(keyword_query(" ".join(f"w{n}" for n in range(100))).split()) == 32


def _tsquery(session, words: str, common_fraction: float) -> str:
    sql = f"WITH {WORDS_CTE_SQL} SELECT query::text FROM words"
    return session.execute(text(sql), {"keywords": words, "common_fraction": common_fraction}).scalar()


def test_words_become_a_stemmed_or_query_without_the_gallery_s_most_common_words(gallery, session):
    assert _tsquery(session, "a photo of the red dresses", 1.0) == "'dress' | 'photo' | 'red'"
    assert _tsquery(session, "the of a", 1.0) == ""
    assert _tsquery(session, "it's a back\\slash", 1.0) == "'back' | 'slash'"
    # Every name is "Picture N": once statistics exist, "picture" is too common to tell images apart.
    assert _tsquery(session, "picture of a harbour", 0.2) == "'harbour' | 'pictur'"
    session.execute(text("ANALYZE images"))
    assert _tsquery(session, "picture of a harbour", 0.2) == "'harbour'"
    assert _tsquery(session, "picture of a harbour", 1.0) == "'harbour' | 'pictur'"


def test_without_any_text_match_hybrid_ranks_exactly_like_vector_search(gallery, session, embedder):
    plain = search_text(session, embedder, "a red square", k=30, hybrid=False)
    hybrid = search_text(session, embedder, "a red square", k=30, hybrid=True)
    assert hybrid.hybrid and not plain.hybrid
    assert [h.id for h in hybrid.hits] == [h.id for h in plain.hits]
    assert [h.distance for h in hybrid.hits] == pytest.approx([h.distance for h in plain.hits])
    assert not any(h.text_match for h in hybrid.hits)
    scores = [h.score for h in hybrid.hits]
    assert scores == sorted(scores, reverse=True)


def test_a_name_match_lifts_the_image_to_the_top_and_names_outrank_descriptions(gallery, session, embedder):
    plain = search_text(session, embedder, "harbour at dusk", k=30, hybrid=False)
    named, described = plain.hits[-1].id, plain.hits[-2].id  # the two farthest vectors
    update_image(session, named, name="Harbour at dusk")
    update_image(session, described, description="boats in the harbours at dusk")  # stemmed: harbours ~ harbour
    page = search_text(session, embedder, "harbour at dusk", k=5)
    assert page.hybrid
    assert [h.id for h in page.hits[:2]] == [named, described]
    assert page.hits[0].text_match and page.hits[1].text_match
    assert not any(h.text_match for h in page.hits[2:])
    # Similarity is still the vector's own: the fusion reorders, it does not rescore.
    assert page.hits[0].distance == pytest.approx(plain.hits[-1].distance)
    # With hybrid search switched off in the settings, the vector ranking is back.
    off = embedder.settings.with_overrides(hybrid_search=False)
    vector_only = search_text(session, embedder.__class__(off), "harbour at dusk", k=5)
    assert not vector_only.hybrid and [h.id for h in vector_only.hits] == [h.id for h in plain.hits[:5]]


def test_filters_exclusion_and_thresholds_hold_on_both_sides(session, embedder, storage):
    a = ingest_image(session, embedder, storage, jpeg(1), "a.jpg", "Lighthouse", "").image_id
    b = ingest_image(session, embedder, storage, encode(picture(2), "PNG"), "b.png", "Lighthouse at night", "").image_id
    for seed in range(3, 12):
        ingest_image(session, embedder, storage, jpeg(seed), f"{seed}.jpg", f"Other {seed}", "")
    only_png = search_text(session, embedder, "lighthouse", k=20, filters=ImageFilters(mime_type="image/png"))
    assert [h.id for h in only_png.hits] == [b]
    model_id = gallery_model_id(session, embedder)
    vector = embedder.encode_text("lighthouse")
    excluded = search_vector(
        session, embedder.settings, model_id, vector, k=20, exclude_image_id=a, keywords=keyword_query("lighthouse")
    )
    assert a not in [h.id for h in excluded.hits] and excluded.hits[0].id == b
    everything = search_text(session, embedder, "lighthouse", k=20, exact=True)
    cut = sorted(h.similarity for h in everything.hits)[-3]
    strict = search_text(session, embedder, "lighthouse", k=20, min_similarity=cut)
    assert len(strict.hits) == 3 and all(h.similarity >= cut - 1e-6 for h in strict.hits)


def test_paging_through_hybrid_results_has_no_gaps_or_repeats(gallery, session, embedder):
    update_image(session, gallery[7], name="Green meadow")
    update_image(session, gallery[20], description="a green field")
    full = search_text(session, embedder, "green", k=30)
    assert not full.has_more and len(full.hits) == 30
    collected = ids_page_by_page(session, embedder, "green", k=7)
    assert collected == [h.id for h in full.hits]
    assert set(collected[:2]) == {gallery[7], gallery[20]}


def test_a_text_match_without_a_vector_of_the_model_is_left_out_and_pages_stay_exact(gallery, session, embedder):
    """The page is cut before the images are joined: an image the words match but the model has
    no vector of must neither show nor make the page one short or `has_more` wrong."""
    update_image(session, gallery[3], name="Lighthouse")
    update_image(session, gallery[4], name="Lighthouse keeper")
    session.execute(text("DELETE FROM image_embeddings WHERE image_id = :id"), {"id": gallery[4]})
    whole = search_text(session, embedder, "lighthouse", k=29)
    ids = [h.id for h in whole.hits]
    assert ids[0] == gallery[3] and gallery[4] not in ids
    assert len(ids) == 29 and not whole.has_more
    assert search_text(session, embedder, "lighthouse", k=28).has_more
    assert ids_page_by_page(session, embedder, "lighthouse", k=6) == ids


@pytest.mark.parametrize("query", ["the of a", "'; DROP TABLE images; --", "!!! ::: &&& |||", "x" * 1000])
def test_odd_queries_run_and_leave_the_table_alone(query, gallery, session, embedder):
    page = search_text(session, embedder, query, k=5)
    assert len(page.hits) == 5
    assert session.execute(text("SELECT count(*) FROM images")).scalar() == 30


def test_the_search_document_follows_edits_made_in_sql(gallery, session, embedder):
    session.execute(text("UPDATE images SET description = 'zebra crossing' WHERE id = :id"), {"id": gallery[3]})
    session.commit()
    assert search_text(session, embedder, "zebras", k=1).hits[0].id == gallery[3]


def test_hybrid_search_uses_the_hnsw_index_on_thousands_of_rows(session, embedder, settings):
    model_id = gallery_model_id(session, embedder)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = insert_synthetic_images(
        session,
        model_id,
        vectors,
        description_sql="CASE WHEN g % 100 = 0 THEN 'rare word' ELSE '' END",
        settings=settings,
    )
    session.execute(text("ANALYZE images; ANALYZE image_embeddings"))
    keyword_sql = keyword_ranking_sql(with_exclude=False, depth=40, keyword_scan=1000)
    keyword_params = {"keywords": keyword_query("rare"), "common_fraction": 0.2}
    plan = "\n".join(session.execute(text("EXPLAIN " + keyword_sql), keyword_params).scalars())
    assert SEARCH_DOCUMENT_INDEX_NAME in plan, plan
    keyword_ids = list(session.execute(text(keyword_sql), keyword_params).scalars())
    assert len(keyword_ids) == 40 and set(keyword_ids) <= set(ids[99::100])  # g = 100, 200, ...: "rare word"
    sql = hybrid_search_sql("cosine", uses_index=True, with_threshold=False, with_exclude=False, limit=21, depth=40)
    params = {"query": vectors[0], "model_id": model_id, "keyword_ids": keyword_ids, "rrf_k": 60}
    # An HNSW scan is only planned for a LIMIT the beam can fill. pgvector's cost estimate grows
    # with the beam: left to itself, the planner scans these 5,000 vectors at the shipped text beam
    # (200), so the statement's use of the index is checked at 100 here; the search plans it
    # without sorts, which makes the index its plan at any beam (test_search.py).
    session.execute(text("SELECT set_config('hnsw.ef_search', '100', true)"))
    plan = "\n".join(session.execute(text("EXPLAIN " + sql), params).scalars())
    assert HNSW_INDEX_NAME in plan, plan
    page = search_vector(session, settings, model_id, vectors[0], k=10, keywords=keyword_query("rare"))
    # Equal RRF terms interleave the two rankings (a text match that is also a near vector wins).
    assert ids[0] in [h.id for h in page.hits[:3]]
    assert sum(h.text_match for h in page.hits) >= 5


def test_a_rare_word_of_the_query_is_not_crowded_out_by_a_frequent_one(session, embedder):
    """The keyword side lists up to `keyword_scan` matches per word: the two images matching the
    rare word "velvet" are found, and ranked first (they match both words), however many images
    before them in the table share "dress". Capping the whole OR query instead filled the cap
    with the first "dress" rows."""
    model_id = gallery_model_id(session, embedder)
    vectors = np.random.default_rng(2).normal(size=(60, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = insert_synthetic_images(
        session, model_id, vectors, description_sql="CASE WHEN g > 58 THEN 'velvet dress' ELSE 'dress' END"
    )
    keyword_sql = keyword_ranking_sql(with_exclude=False, depth=10, keyword_scan=20)
    # common_fraction 1: no word is left out as too common, whatever the statistics say.
    params = {"keywords": keyword_query("a velvet dress"), "common_fraction": 1.0}
    keyword_ids = list(session.execute(text(keyword_sql), params).scalars())
    assert keyword_ids[:2] == ids[58:] and len(keyword_ids) == 10
    assert set(keyword_ids[2:]) <= set(ids[:58])


@pytest.fixture
def keyword_statements(settings):
    """The keyword-side statements the app sends to the database, counted."""
    from sqlalchemy import event

    from clipgallery import db

    engine = db.get_engine(settings)
    sent: list[str] = []

    def count(conn, cursor, statement, *args):
        if "keyword_matches" in statement:
            sent.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    yield sent
    event.remove(engine, "before_cursor_execute", count)


def test_a_repeated_query_reuses_its_keyword_ranking_until_the_images_change(
    gallery, session, embedder, storage, keyword_statements
):
    update_image(session, gallery[5], name="Harbour at dusk")
    first = search_text(session, embedder, "harbour", k=10)
    assert first.hits[0].id == gallery[5] and len(keyword_statements) == 1
    again = search_text(session, embedder, "harbour", k=10)
    assert [h.id for h in again.hits] == [h.id for h in first.hits] and len(keyword_statements) == 1
    assert again.hits[0].text_match
    # Any change to the images moves their version on: new and edited images show at once.
    update_image(session, gallery[9], description="the harbour wall")
    renamed = search_text(session, embedder, "harbour", k=10)
    assert len(keyword_statements) == 2 and {h.id for h in renamed.hits[:2]} == {gallery[5], gallery[9]}
    session.execute(text("UPDATE images SET name = 'Picture 5' WHERE id = :id"), {"id": gallery[5]})
    session.commit()
    after_sql_edit = search_text(session, embedder, "harbour", k=10)
    assert after_sql_edit.hits[0].id == gallery[9] and not after_sql_edit.hits[1].text_match
    added = ingest_image(session, embedder, storage, jpeg(900), "new.jpg", "Harbour lights").image_id
    with_new = search_text(session, embedder, "harbour", k=10)
    assert len(keyword_statements) == 4 and {h.id for h in with_new.hits[:2]} == {gallery[9], added}
    # Filtered searches are never cached (a filter may read other tables: the uploader's name).
    search_text(session, embedder, "harbour", k=10, filters=ImageFilters(mime_type="image/jpeg"))
    search_text(session, embedder, "harbour", k=10, filters=ImageFilters(mime_type="image/jpeg"))
    assert len(keyword_statements) == 6


def test_a_ranking_read_while_another_transaction_writes_images_is_not_cached(
    gallery, session, embedder, settings, keyword_statements
):
    """The version moves on when the writer's statement runs, not when it commits: a ranking read
    in between saw the old rows under the new version, and must not be served after the commit."""
    from clipgallery import db

    with db.session_scope(settings) as writer:
        writer.execute(text("UPDATE images SET name = 'Zebra picture' WHERE id = :id"), {"id": gallery[3]})
        # Every image matches "picture": the ranking read now is not empty, only without the zebra.
        during = search_text(session, embedder, "zebra picture", k=5)
        assert all(h.text_match for h in during.hits) and len(keyword_statements) == 1
        writer.commit()
    after = search_text(session, embedder, "zebra picture", k=5)
    assert len(keyword_statements) == 2
    assert after.hits[0].id == gallery[3] and after.hits[0].text_match
    # Once nothing is being written, the ranking is kept.
    assert search_text(session, embedder, "zebra picture", k=5).hits[0].id == gallery[3]
    assert len(keyword_statements) == 2
