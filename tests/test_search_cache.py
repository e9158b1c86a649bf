"""Remembered result pages: a repeated search costs one round trip while the images and their
vectors are unchanged, and never shows a page older than what it reads."""

import pytest
from sqlalchemy import make_url, text

from clipgallery import db, search
from clipgallery.gallery import delete_images, update_image
from clipgallery.ingest import ingest_image
from clipgallery.models import HNSW_INDEX_NAME
from clipgallery.search import search_image_bytes, search_similar, search_text
from tests.conftest import jpeg

# How a statement that ranks images starts (plain, hybrid); the other one a search sends reads the
# settings, the model and the version.
SEARCH_STATEMENT_STARTS = ("SELECT i.id", "WITH semantic")


@pytest.fixture
def gallery(session, embedder, storage):
    return [
        ingest_image(session, embedder, storage, jpeg(400 + seed), f"c{seed}.jpg", f"Picture {seed}").image_id
        for seed in range(25)
    ]


@pytest.fixture
def ranking_statements(monkeypatch) -> list[str]:
    """The ranking statements searches send to the database (through the real driver), listed."""
    sent: list[str] = []
    real_fetch_rows = search.fetch_rows

    def fetch_rows(session, sql, params=None, planner_settings=None):
        if sql.startswith(SEARCH_STATEMENT_STARTS):
            sent.append(sql)
        return real_fetch_rows(session, sql, params, planner_settings)

    monkeypatch.setattr(search, "fetch_rows", fetch_rows)
    return sent


def _ids(page) -> list[int]:
    return [h.id for h in page.hits]


def test_a_repeated_search_of_any_kind_reads_its_page_once(gallery, session, embedder, ranking_statements):
    searches = [
        lambda **o: search_text(session, embedder, "a red square", **o),
        lambda **o: search_text(session, embedder, "picture of a red square", hybrid=False, **o),
        lambda **o: search_image_bytes(session, embedder, jpeg(403), **o),
        lambda **o: search_similar(session, embedder, gallery[3], **o),
    ]
    for number, run in enumerate(searches, start=1):
        first = run(k=5)
        assert len(ranking_statements) == 2 * number - 1
        assert run(k=5) == first
        assert len(ranking_statements) == 2 * number - 1, "the repeated search ran its statement again"
        # Another page, or any other option, is a search of its own.
        assert _ids(run(k=5, offset=5))[0] not in _ids(first)
        assert len(ranking_statements) == 2 * number
    search_text(session, embedder, "a red square", k=5, min_similarity=-1.0)
    search_text(session, embedder, "a red square", k=5, metric="l2")
    assert len(ranking_statements) == 10


def test_new_edited_and_deleted_images_and_changed_vectors_show_at_once(
    gallery, session, embedder, storage, ranking_statements
):
    def query():
        return search_image_bytes(session, embedder, jpeg(999), k=5)

    before = query()
    assert query() == before and len(ranking_statements) == 1
    added = ingest_image(session, embedder, storage, jpeg(999), "new.jpg", "The query itself").image_id
    with_new = query()
    assert with_new.hits[0].id == added and with_new.hits[0].distance == pytest.approx(0.0, abs=1e-5)
    update_image(session, added, name="Renamed")
    assert query().hits[0].name == "Renamed"
    # A vector written by hand (psql) counts as a change too.
    session.execute(
        text(
            "UPDATE image_embeddings SET embedding = (SELECT embedding FROM image_embeddings WHERE image_id = :added) "
            "WHERE image_id = :other"
        ),
        {"added": added, "other": gallery[7]},
    )
    session.commit()
    assert set(_ids(query())[:2]) == {added, gallery[7]}
    delete_images(session, storage, [added])
    after_delete = query()
    assert added not in _ids(after_delete) and after_delete.hits[0].id == gallery[7]
    assert query() == after_delete
    assert len(ranking_statements) == 5


def test_a_page_read_while_another_transaction_writes_is_not_kept(
    gallery, session, embedder, settings, ranking_statements
):
    """The version moves on when the writer's statement runs, not when it commits: a page read in
    between saw the old vectors under the new version, and must not be served after the commit."""
    with db.session_scope(settings) as writer:
        writer.execute(
            text(
                "UPDATE image_embeddings SET embedding = "
                "(SELECT embedding FROM image_embeddings WHERE image_id = :src) WHERE image_id = :id"
            ),
            {"src": gallery[0], "id": gallery[9]},
        )
        during = search_similar(session, embedder, gallery[0], k=3)
        assert gallery[9] not in _ids(during)
        search_similar(session, embedder, gallery[0], k=3)
        assert len(ranking_statements) == 2, "a page read during a write was kept"
        writer.commit()
    after = search_similar(session, embedder, gallery[0], k=3)
    assert after.hits[0].id == gallery[9] and after.hits[0].distance == pytest.approx(0.0, abs=1e-5)
    assert search_similar(session, embedder, gallery[0], k=3) == after
    assert len(ranking_statements) == 3


def test_a_page_found_through_the_index_is_not_served_once_the_index_is_gone(gallery, session, embedder):
    indexed = search_text(session, embedder, "a red square", k=5)
    assert not indexed.exact
    session.execute(text(f"DROP INDEX {HNSW_INDEX_NAME}"))
    session.commit()
    assert search_text(session, embedder, "a red square", k=5).exact


def test_a_database_made_again_under_the_same_name_does_not_see_the_old_pages(
    pg_server, template_database, settings, embedder, storage
):
    """Made from the same template, the new database's version sequence is the old one's, and the
    same writes move it to the same value: the page must still be the new database's."""
    name = make_url(settings.database_url).database

    def fill_and_search(names: str):
        with db.session_scope(settings) as session:
            for seed in range(3):
                ingest_image(session, embedder, storage, jpeg(600 + seed), f"{seed}.jpg", f"{names} {seed}")
            return search_image_bytes(session, embedder, jpeg(700), k=3)

    first = fill_and_search("first")
    assert all(h.name.startswith("first") for h in first.hits)
    db.dispose_engine(settings)
    pg_server.psql(f'DROP DATABASE "{name}";')
    pg_server.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}";')
    storage_files = list(settings.upload_dir.rglob("*"))
    assert storage_files  # the same files, named by content: the new rows point at them again
    second = fill_and_search("second")
    assert [h.id for h in second.hits] == [h.id for h in first.hits]
    assert all(h.name.startswith("second") for h in second.hits)
