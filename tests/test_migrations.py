from alembic import command
from sqlalchemy import text

from clipgallery import db
from clipgallery.models import HNSW_INDEX_NAME

TABLES = {
    "users",
    "embedding_models",
    "images",
    "image_embeddings",
    "indexed_files",
    "user_sessions",
    "login_attempts",
    "api_tokens",
}


def _tables(settings) -> set[str]:
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
        return set(rows) - {"alembic_version"}


def test_upgrade_creates_schema_that_matches_the_models_and_downgrade_removes_it(empty_settings):
    settings = empty_settings
    assert _tables(settings) == set()
    db.migrate(settings)
    assert _tables(settings) == TABLES
    assert db.current_revision(settings) == "0007"
    # Autogenerate sees no difference between the model classes and the migrated schema.
    command.check(db.alembic_config(settings))

    db.downgrade(settings, "base")
    assert _tables(settings) == set()
    assert db.current_revision(settings) is None
    db.migrate(settings)
    assert _tables(settings) == TABLES


def test_vector_column_hnsw_index_and_comments(settings):
    with db.get_engine(settings).connect() as conn:
        column_type = conn.execute(
            text(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'image_embeddings'::regclass AND attname = 'embedding'"
            )
        ).scalar_one()
        assert column_type == "vector(64)"  # the tiny test model's dimension
        storage = conn.execute(
            text(
                "SELECT attstorage FROM pg_attribute "
                "WHERE attrelid = 'image_embeddings'::regclass AND attname = 'embedding'"
            )
        ).scalar_one()
        assert storage == "p"  # PLAIN: kept in the row, not TOASTed
        index_def = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = :name"), {"name": HNSW_INDEX_NAME}
        ).scalar_one()
        assert "USING hnsw (embedding vector_cosine_ops)" in index_def
        assert f"m='{settings.hnsw_m}'" in index_def  # the configured build parameters
        assert f"ef_construction='{settings.hnsw_ef_construction}'" in index_def
        for table in TABLES:
            comment = conn.execute(text(f"SELECT obj_description('{table}'::regclass, 'pg_class')")).scalar_one()
            assert comment, f"table {table} has no comment"
        uncommented = (
            conn.execute(
                text(
                    "SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'alembic_version' "
                    "AND a.attnum > 0 AND NOT a.attisdropped AND col_description(c.oid, a.attnum) IS NULL"
                )
            )
            .scalars()
            .all()
        )
        assert uncommented == []


def test_too_old_or_missing_pgvector_is_refused_with_a_clear_message():
    from clipgallery.db import DatabaseError, ServerInfo, check_server_info

    ok = check_server_info(ServerInfo("18.6", 180006, "0.8.1"))
    assert ok.has_iterative_scan
    for info, words in [
        (ServerInfo("13.2", 130002, "0.8.0"), "PostgreSQL 13.2 is too old"),
        (ServerInfo("16.1", 160001, None), "pgvector extension is not installed"),
        (ServerInfo("16.1", 160001, "0.6.2"), "pgvector 0.6.2 is too old"),
    ]:
        try:
            check_server_info(info)
        except DatabaseError as exc:
            assert words in str(exc)
        else:
            raise AssertionError(f"{info} was accepted")


def test_a_fresh_database_can_be_used_right_after_migrating_in_the_same_process(empty_settings, tmp_path):
    """Connections opened before the vector extension existed must not serve vector queries."""
    from clipgallery.embedding import Embedder
    from clipgallery.gallery import gallery_status
    from clipgallery.ingest import ingest_image
    from clipgallery.search import search_text
    from clipgallery.storage import Storage
    from tests.conftest import jpeg

    db.check_server(db.get_engine(empty_settings))  # a pooled connection from before the migration
    before = gallery_status(empty_settings)  # what `clipgallery status` says of it: what to do
    assert not before.database_ok and "no gallery in it yet: `clipgallery db upgrade`" in before.database_detail
    db.migrate(empty_settings)
    assert gallery_status(empty_settings).database_ok
    embedder = Embedder(empty_settings)
    with db.session_scope(empty_settings) as session:
        outcome = ingest_image(session, embedder, Storage(tmp_path / "files"), jpeg(1), "a.jpg")
        assert outcome.status == "added"
        assert search_text(session, embedder, "anything").hits[0].id == outcome.image_id
