"""Backup and restore as docs/operations.md describes: pg_dump of the database plus a copy of
the upload directory, restored into a fresh database, gives the same search results."""

import os
import shutil
import subprocess
import sys

from sqlalchemy import text

from clipgallery import db
from clipgallery.embedding import Embedder
from clipgallery.ingest import ingest_image
from clipgallery.search import search_image_bytes, search_text
from tests.conftest import fresh_database, jpeg


def test_dump_and_restore_into_a_fresh_database_finds_the_same_results(
    settings, session, embedder, storage, pg_server, tmp_path
):
    for n in range(12):
        ingest_image(session, embedder, storage, jpeg(1200 + n), f"{n}.jpg", f"Backup {n}", f"text {n}")
    before_text = search_text(session, embedder, "a quiet harbour", k=5)
    before_image = search_image_bytes(session, embedder, jpeg(1205), k=3)

    env = {**os.environ, "DATABASE_URL": settings.database_url, "CLIPGALLERY_MODEL": settings.model_name}
    dump_file = tmp_path / "backup" / "gallery.dump"
    dumped = subprocess.run(
        [sys.executable, "-m", "clipgallery.cli", "db", "dump", str(dump_file)], env=env, capture_output=True, text=True
    )
    assert dumped.returncode == 0, dumped.stderr
    assert dump_file.stat().st_size > 10_000
    copied_files = tmp_path / "restored-files"
    shutil.copytree(settings.upload_dir, copied_files)

    restored = settings.with_overrides(database_url=fresh_database(pg_server, None), upload_dir=copied_files)
    result = subprocess.run(
        [sys.executable, "-m", "clipgallery.cli", "db", "restore", str(dump_file)],
        env={**env, "DATABASE_URL": restored.database_url},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    restored_embedder = Embedder(restored)
    with db.session_scope(restored) as other:
        assert other.execute(text("SELECT count(*) FROM images")).scalar_one() == 12
        after_text = search_text(other, restored_embedder, "a quiet harbour", k=5)
        after_image = search_image_bytes(other, restored_embedder, jpeg(1205), k=3)
        index = other.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname LIKE '%hnsw'")).scalar_one()
        paths = other.execute(text("SELECT stored_path, thumbnail_path FROM images")).all()
    assert [(h.id, round(h.distance, 5)) for h in after_text.hits] == [
        (h.id, round(h.distance, 5)) for h in before_text.hits
    ]
    assert [h.id for h in after_image.hits] == [h.id for h in before_image.hits]
    assert "hnsw" in index
    assert all((copied_files / p).is_file() for row in paths for p in row)


def test_restore_refuses_a_missing_file(settings, tmp_path):
    import pytest

    with pytest.raises(db.DatabaseError, match="does not exist"):
        db.restore(settings, tmp_path / "nothing.dump")
