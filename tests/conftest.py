"""Shared fixtures: one real embedded PostgreSQL + pgvector server per test session, a fresh
migrated database per test (copied from a template), and a small open_clip model with random
weights saved as a model directory, so the real loading and embedding code runs."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipgallery import auth, db
from clipgallery.config import Settings
from clipgallery.embedding import Embedder, create_random_model_dir
from clipgallery.ingest import IngestOutcome, ingest_image
from clipgallery.storage import Storage
from tests.appserver import AppProcess, free_port

TINY_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SHARED = Path(os.environ.get("CLIPGALLERY_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return create_random_model_dir(tmp_path_factory.mktemp("models") / "tiny", "tiny-vit", TINY_MODEL_CFG, seed=1)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture, other weights: a different model identity with the same dimension."""
    return create_random_model_dir(tmp_path_factory.mktemp("models") / "other", "tiny-vit", TINY_MODEL_CFG, seed=2)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    settings = Settings(state_dir=state, pg_shared_buffers="256MB", pg_maintenance_work_mem="256MB")
    server = db.start_embedded_server(settings)
    yield server
    db.dispose_engines()
    server.cleanup()


def pytest_collection_modifyitems(config, items):
    """Tests marked `empty_gallery` need the shared app before anything is added to it: run them first."""
    first = [item for item in items if item.get_closest_marker("empty_gallery")]
    items[:] = first + [item for item in items if item not in first]


_counter = itertools.count()


@pytest.fixture(scope="session")
def template_database(pg_server, tiny_model_dir, tmp_path_factory) -> str:
    """A database migrated to head once; every test gets a copy of it."""
    pg_server.psql('CREATE DATABASE "gallery_template";')
    url = pg_server.get_uri("gallery_template").replace("postgresql://", "postgresql+psycopg://", 1)
    settings = Settings(database_url=url, model_name=str(tiny_model_dir), vector_index_min_vectors=0)
    db.migrate(settings)
    db.dispose_engines()
    return "gallery_template"


def fresh_database(pg_server, template: str | None) -> str:
    name = f"gallery_test_{os.getpid()}_{next(_counter)}"
    pg_server.psql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}";' if template else ";"))
    return pg_server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def settings(pg_server, template_database, tiny_model_dir, tmp_path) -> Iterator[Settings]:
    settings = Settings(
        database_url=fresh_database(pg_server, template_database),
        state_dir=tmp_path / "state",
        upload_dir=tmp_path / "uploads",
        model_name=str(tiny_model_dir),
        embed_batch_size=8,
        max_upload_bytes=2 * 1024 * 1024,
        max_image_pixels=4_000_000,
        thumbnail_size=64,
        # Test galleries hold a few images: indexed anyway, so the HNSW path is what most tests
        # exercise (tests of the exact-scan default set their own threshold).
        vector_index_min_vectors=0,
    )
    yield settings
    # Each test has its own database: without this its idle pooled connections would stay open
    # until the session ends, and a few hundred tests exhaust the server's max_connections.
    db.dispose_engine(settings)


@pytest.fixture
def empty_settings(pg_server, tiny_model_dir, tmp_path) -> Iterator[Settings]:
    """Settings on a brand-new database without any schema."""
    settings = Settings(
        database_url=fresh_database(pg_server, None),
        state_dir=tmp_path / "state",
        upload_dir=tmp_path / "uploads",
        model_name=str(tiny_model_dir),
        vector_index_min_vectors=0,
    )
    yield settings
    db.dispose_engine(settings)


# Settings that shape a loaded model; the others (database, limits, query threads...) are read
# from the Embedder's settings at each call.
MODEL_SETTINGS = (
    "model_name",
    "pretrained",
    "precision",
    "text_precision",
    "trace_image_tower",
    "trace_text_tower",
    "torch_threads",
)
_loaded_models: dict[tuple, Embedder] = {}


@pytest.fixture
def embedder(settings) -> Embedder:
    """The test's settings on a model loaded once per session (`Embedder.sharing_model`, as the
    bench's variants share one): loading, converting and tracing the tiny model costs ≈ 4 s, in
    ≈ 150 tests. Each test still gets its own Embedder (text cache, locks, queue); tests of
    loading itself build theirs."""
    key = tuple(getattr(settings, name) for name in MODEL_SETTINGS)
    loaded = _loaded_models.get(key)
    if loaded is None:
        loaded = _loaded_models[key] = Embedder(settings)
        loaded.load_image_tower()
    return loaded.sharing_model(**{f.name: getattr(settings, f.name) for f in fields(settings)})


@pytest.fixture
def storage(settings) -> Storage:
    return Storage(settings.upload_dir)


@pytest.fixture
def session(settings):
    with db.session_scope(settings) as session:
        yield session


def picture(seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Image.Image:
    """A distinct synthetic picture: a colour field with shapes placed by the seed."""
    rng = np.random.default_rng(seed)
    base = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, size[0] - 8)), int(rng.integers(0, size[1] - 8))
        x1, y1 = x0 + int(rng.integers(6, size[0] // 2)), y0 + int(rng.integers(6, size[1] // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    return encode(picture(seed, size), "JPEG", quality=90)


def insert_synthetic_images(
    session, model_id: int, vectors: np.ndarray, description_sql: str = "''", settings: Settings | None = None
) -> list[int]:
    """Rows without files, named 'item <n>', with the given vectors (fast: one INSERT, one COPY), for
    tests that need thousands of images. `description_sql` may use the series number `g`. With
    `settings`, written the way bulk indexing writes many vectors (`db.deferred_vector_index`: the
    HNSW index dropped and built once at the end — at the shipped m 48 / ef_construction 256,
    5,000 vectors inserted into the index one by one took 30-50 s here)."""
    if settings is None:
        return _insert_synthetic_images(session, model_id, vectors, description_sql)
    with db.deferred_vector_index(session, settings, incoming=len(vectors)):
        return _insert_synthetic_images(session, model_id, vectors, description_sql)


def _insert_synthetic_images(session, model_id: int, vectors: np.ndarray, description_sql: str) -> list[int]:
    from sqlalchemy import text

    session.execute(
        text(
            "INSERT INTO images (sha256, original_filename, stored_path, thumbnail_path, name, description, "
            "mime_type, width, height, byte_size) SELECT md5(g::text) || md5(g::text), 'f.jpg', 'o/' || g, "
            f"'t/' || g, 'item ' || g, {description_sql}, 'image/jpeg', 1, 1, 1 "
            "FROM generate_series(1, :n) g"
        ),
        {"n": len(vectors)},
    )
    ids = session.execute(text("SELECT id FROM images ORDER BY id DESC LIMIT :n"), {"n": len(vectors)}).scalars()
    ids = sorted(ids)
    with (
        session.connection().connection.cursor() as cursor,
        cursor.copy("COPY image_embeddings (image_id, model_id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy,
    ):
        copy.set_types(["int4", "int4", "vector"])
        for image_id, vector in zip(ids, np.asarray(vectors, dtype=np.float32), strict=True):
            copy.write_row((image_id, model_id, vector))
    session.commit()
    return ids


def ids_page_by_page(session, embedder, query: str, k: int) -> list[int]:
    """Image ids of a text search collected by following its pages of k until the last."""
    from clipgallery.search import search_text

    collected, offset = [], 0
    while True:
        page = search_text(session, embedder, query, k=k, offset=offset)
        collected += [h.id for h in page.hits]
        if not page.has_more:
            return collected
        offset += k


def files_on_disk(storage: Storage) -> set[str]:
    return {str(p.relative_to(storage.root)) for p in storage.iter_files()}


# --- the production app, for API and browser tests ------------------------------------------


@dataclass
class Gallery:
    """Direct access to the app's database and files, for seeding and checking."""

    settings: Settings
    base_url: str
    embedder: Embedder

    @property
    def storage(self) -> Storage:
        return Storage(self.settings.upload_dir)

    def add_image(self, data: bytes, filename: str, name: str, description: str = "") -> IngestOutcome:
        with db.session_scope(self.settings) as session:
            outcome = ingest_image(session, self.embedder, self.storage, data, filename, name, description)
        assert outcome.status in ("added", "duplicate"), outcome.reason
        return outcome

    def create_admin(self, username: str, password: str = "a long test password") -> auth.CurrentUser:
        with db.session_scope(self.settings) as session:
            return auth.create_user(session, username, password, is_admin=True)

    def api_token(self, user: auth.CurrentUser, ttl: timedelta | None = None) -> str:
        with db.session_scope(self.settings) as session:
            return auth.create_api_token(session, user, "tests", ttl)

    def count(self, table: str) -> int:
        from sqlalchemy import text

        with db.session_scope(self.settings) as session:
            return session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()

    def session_token(self, user: auth.CurrentUser) -> str:
        with db.session_scope(self.settings) as session:
            return auth.create_session(session, user, timedelta(hours=1))


@pytest.fixture(scope="session")
def app_server(pg_server, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-app")
    pg_server.psql('CREATE DATABASE "browser_gallery";')
    url = pg_server.get_uri("browser_gallery").replace("postgresql://", "postgresql+psycopg://", 1)
    settings = Settings(
        database_url=url,
        state_dir=root / "state",
        upload_dir=root / "uploads",
        model_name=str(tiny_model_dir),
        thumbnail_size=256,
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CLIPGALLERY_DATABASE_URL")}
    env.update(
        DATABASE_URL=url,
        CLIPGALLERY_STATE_DIR=str(settings.state_dir),
        CLIPGALLERY_UPLOAD_DIR=str(settings.upload_dir),
        CLIPGALLERY_MODEL=str(tiny_model_dir),
        CLIPGALLERY_THUMBNAIL_SIZE=str(settings.thumbnail_size),
        # Its own build directory: never rewrite the .web of a running `make run`.
        REFLEX_WEB_WORKDIR=str(root / "web"),
        # Test-only: lets "search by URL" tests fetch from a local image server.
        CLIPGALLERY_FETCH_ALLOW_HOSTS="127.0.0.1",
    )
    app = AppProcess(port, env, root / "serve.log")
    try:
        health = app.wait_until_healthy()
        assert health.status_code == 200, health.text
        app.wait_until_model_ready()
        yield app, settings
    finally:
        app.stop()


@pytest.fixture(scope="session")
def gallery(app_server) -> Gallery:
    app, settings = app_server
    embedder = Embedder(settings)
    embedder.load()
    return Gallery(settings=settings, base_url=app.base_url, embedder=embedder)
