"""Every SQL example in docs/sql.md runs, through psql, against a real gallery database; and the
read-only role can do what the page says and nothing more."""

import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from clipgallery import db
from clipgallery.ingest import ingest_image
from tests.conftest import encode, jpeg, picture

DOC = Path(__file__).resolve().parents[1] / "docs" / "sql.md"
BLOCKS = re.findall(r"```sql( reader)?\n(.*?)```", DOC.read_text(), flags=re.S)


def _psql(url: str, script: str, *options: str) -> subprocess.CompletedProcess:
    psql = db.embedded_client_bin_dir() / "psql"
    return subprocess.run(
        [str(psql), db.libpq_url(url), "-X", "-v", "ON_ERROR_STOP=1", *options, "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def seeded(settings, session, embedder, storage):
    for n in range(16):
        data = encode(picture(700 + n), "PNG") if n % 4 == 0 else jpeg(700 + n)
        outcome = ingest_image(session, embedder, storage, data, f"{n}.jpg", f"Example {n}", f"description {n}")
        assert outcome.status == "added"
    db.create_reader_role(settings)
    reader_url = make_url(settings.database_url).set(username="clipgallery_reader").render_as_string(False)
    return settings.database_url, reader_url


def test_the_page_has_examples():
    assert len(BLOCKS) >= 10
    assert any(reader for reader, _ in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_sql_example_runs(index, seeded):
    owner_url, reader_url = seeded
    reader, script = BLOCKS[index]
    result = _psql(reader_url if reader else owner_url, script)
    assert result.returncode == 0, f"block {index}:\n{script}\n{result.stderr}"
    assert result.stdout.strip(), f"block {index} printed nothing"
    assert "ERROR" not in result.stderr


def test_similar_images_matches_the_service_and_uses_the_index(seeded, session, embedder):
    from clipgallery.search import search_similar

    owner_url, _ = seeded
    rows = _psql(owner_url, "SELECT id FROM similar_images(1, 5);", "-At")
    assert rows.returncode == 0, rows.stderr
    assert [int(x) for x in rows.stdout.split()] == [h.id for h in search_similar(session, embedder, 1, k=5).hits]
    plan = _psql(
        owner_url,
        "SET enable_seqscan = off;\nEXPLAIN (COSTS OFF) SELECT e.image_id FROM image_embeddings e "
        "ORDER BY e.embedding <=> (SELECT embedding FROM image_embeddings WHERE image_id = 1) LIMIT 5;",
    )
    assert "image_embeddings_embedding_hnsw" in plan.stdout


@pytest.mark.parametrize(
    "statement,words",
    [
        ("SELECT * FROM users", "permission denied"),
        ("SELECT * FROM user_sessions", "permission denied"),
        ("SELECT * FROM api_tokens", "permission denied"),
        ("UPDATE images SET name = 'x'", "read-only transaction"),
        ("DELETE FROM image_embeddings", "read-only transaction"),
        ("CREATE TABLE t (x int)", "read-only transaction"),
        ("SET default_transaction_read_only = off; UPDATE images SET name = 'x'", "permission denied"),
    ],
)
def test_the_reader_role_can_do_nothing_else(statement, words, seeded):
    _, reader_url = seeded
    result = _psql(reader_url, statement + ";")
    assert result.returncode != 0
    assert words in result.stderr
