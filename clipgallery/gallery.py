"""Gallery-wide services: the model registry (which model's vectors the gallery holds),
image records (get, list, update, delete) and a status summary for health checks and pages."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np
from sqlalchemy import Row, func, select, text
from sqlmodel import Session

from clipgallery.config import Settings
from clipgallery.embedding import Embedder, ModelIdentity
from clipgallery.models import EmbeddingModel, Image, ImageEmbedding
from clipgallery.storage import Storage

log = logging.getLogger(__name__)

REEMBED_COMMAND = "clipgallery reembed"


class ModelMismatchError(RuntimeError):
    """The gallery's vectors were made by another model than the configured one."""


class NotFoundError(LookupError):
    """No image with that id."""


# --- model registry --------------------------------------------------------------------------


def register_model(session: Session, identity: ModelIdentity) -> int:
    """The embedding_models id for this identity, created on first use."""
    row = session.execute(
        text(
            "INSERT INTO embedding_models (architecture, weights, dimension) VALUES (:a, :w, :d) "
            "ON CONFLICT (architecture, weights) DO UPDATE SET dimension = EXCLUDED.dimension RETURNING id"
        ),
        {"a": identity.architecture, "w": identity.weights, "d": identity.dimension},
    ).scalar_one()
    session.commit()
    return row


def vector_column_dimension(session: Session) -> int | None:
    typmod = session.execute(
        text(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'image_embeddings'::regclass AND attname = 'embedding'"
        )
    ).scalar_one()
    return typmod if typmod and typmod > 0 else None


def set_vector_dimension(session: Session, settings: Settings, dimension: int) -> None:
    """Give the vector column a new dimension (dropping every stored vector) and rebuild its index."""
    from clipgallery.db import vector_index_wanted
    from clipgallery.models import HNSW_INDEX_NAME, MAX_IN_ROW_DIMENSION, hnsw_index_statements

    log.warning("setting the vector column to %d dimensions; stored vectors are dropped", dimension)
    session.execute(text("LOCK TABLE image_embeddings IN ACCESS EXCLUSIVE MODE"))
    session.execute(text(f"DROP INDEX IF EXISTS {HNSW_INDEX_NAME}"))
    session.execute(text("DELETE FROM image_embeddings"))
    session.execute(text(f"ALTER TABLE image_embeddings ALTER COLUMN embedding TYPE vector({int(dimension)})"))
    storage_mode = "PLAIN" if dimension <= MAX_IN_ROW_DIMENSION else "EXTENDED"
    session.execute(text(f"ALTER TABLE image_embeddings ALTER COLUMN embedding SET STORAGE {storage_mode}"))
    # The emptied gallery gets its index back once it is large enough (`db.fit_vector_index`).
    if vector_index_wanted(0, settings, present=False):
        for statement in hnsw_index_statements(settings):
            session.execute(text(statement))
    session.commit()


def foreign_models(session: Session, model_id: int) -> list[tuple[EmbeddingModel, int]]:
    """Other models that still own vectors in the gallery, with their vector counts."""
    rows = session.execute(
        select(EmbeddingModel, func.count())
        .join(ImageEmbedding, ImageEmbedding.model_id == EmbeddingModel.id)
        .where(EmbeddingModel.id != model_id)
        .group_by(EmbeddingModel.id)
    ).all()
    return [(model, count) for model, count in rows]


# The gallery's model state, as columns of a SELECT: searches read it in the same round trip
# as their transaction settings (`search.search_vector`). Each part is an index or catalogue
# lookup: min/max of an indexed column are read from the ends of the index, whatever its size.
MODEL_STATE_COLUMNS = (
    "(SELECT atttypmod FROM pg_attribute "
    " WHERE attrelid = 'image_embeddings'::regclass AND attname = 'embedding') AS dimension, "
    "(SELECT id FROM embedding_models WHERE architecture = :model_architecture AND weights = :model_weights) "
    "AS model_id, "
    "(SELECT min(model_id) FROM image_embeddings) AS lowest, "
    "(SELECT max(model_id) FROM image_embeddings) AS highest"
)


def model_state_params(embedder: Embedder) -> dict[str, str]:
    identity = embedder.identity
    return {"model_architecture": identity.architecture, "model_weights": identity.weights}


def gallery_model_id(session: Session, embedder: Embedder, state: Row | None = None) -> int:
    """The configured model's id, after checking that the stored vectors are all its own.

    Raises ModelMismatchError naming the re-embed command when they are not, so a search never
    compares vectors of two models and an ingest never adds a second model's vectors. `state`:
    the row of MODEL_STATE_COLUMNS when the caller has already read it.
    """
    identity = embedder.identity
    if state is None:
        state = session.execute(text(f"SELECT {MODEL_STATE_COLUMNS}"), model_state_params(embedder)).one()
    dimension = state.dimension if state.dimension and state.dimension > 0 else None
    has_vectors = state.lowest is not None
    if dimension != identity.dimension and not has_vectors:
        # An empty gallery simply adopts the configured model's dimension: nothing to re-embed.
        set_vector_dimension(session, embedder.settings, identity.dimension)
        dimension = identity.dimension
    if dimension is not None and dimension != identity.dimension:
        raise ModelMismatchError(
            f"The gallery stores {dimension}-d vectors but the configured model {identity} makes "
            f"{identity.dimension}-d vectors. Run `{REEMBED_COMMAND}` to re-embed every image with the "
            "configured model, or configure the model the gallery was built with."
        )
    model_id = state.model_id if state.model_id is not None else register_model(session, identity)
    foreign = has_vectors and not (state.lowest == state.highest == model_id)
    if foreign:
        others = ", ".join(
            f"{m.architecture} / {m.weights} ({count} images)" for m, count in foreign_models(session, model_id)
        )
        raise ModelMismatchError(
            f"The gallery's vectors were made by another model: {others}. The configured model is {identity}. "
            f"Run `{REEMBED_COMMAND}` to re-embed every image with the configured model, "
            "or configure the model the gallery was built with."
        )
    return model_id


def vector_to_numpy(value) -> np.ndarray:
    """A stored vector as float32 numpy, whatever pgvector-python's version returns
    (numpy in 0.4, Vector objects from its psycopg loader, lists in 1.0)."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    elif isinstance(value, str):
        value = [float(x) for x in value.strip("[]").split(",")]
    return np.asarray(value, dtype=np.float32)


# --- image records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    id: int
    sha256: str
    name: str
    description: str
    original_filename: str
    mime_type: str
    width: int
    height: int
    byte_size: int
    stored_path: str
    thumbnail_path: str
    uploaded_by: int | None
    created_at: datetime | None
    updated_at: datetime | None
    has_embedding: bool

    @property
    def original_url(self) -> str:
        return file_url(self.stored_path)

    @property
    def thumbnail_url(self) -> str:
        return file_url(self.thumbnail_path)


def file_url(relpath: str) -> str:
    """Where the web app serves a stored file."""
    return "/files/" + relpath


def _record(image: Image, has_embedding: bool) -> ImageRecord:
    return ImageRecord(
        id=image.id,
        sha256=image.sha256,
        name=image.name,
        description=image.description,
        original_filename=image.original_filename,
        mime_type=image.mime_type,
        width=image.width,
        height=image.height,
        byte_size=image.byte_size,
        stored_path=image.stored_path,
        thumbnail_path=image.thumbnail_path,
        uploaded_by=image.uploaded_by,
        created_at=image.created_at,
        updated_at=image.updated_at,
        has_embedding=has_embedding,
    )


def get_image(session: Session, image_id: int) -> ImageRecord:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"No image with id {image_id}.")
    has_embedding = session.get(ImageEmbedding, image_id) is not None
    return _record(image, has_embedding)


def count_images(session: Session) -> int:
    return session.execute(select(func.count()).select_from(Image)).scalar_one()


def update_image(
    session: Session, image_id: int, name: str | None = None, description: str | None = None
) -> ImageRecord:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"No image with id {image_id}.")
    if name is not None:
        name = name.strip()
        if not name:
            raise ValueError("The name cannot be empty.")
        image.name = name[:500]
    if description is not None:
        image.description = description.strip()[:10_000]
    session.add(image)
    session.commit()
    session.refresh(image)
    return get_image(session, image_id)


def delete_images(session: Session, storage: Storage, image_ids: list[int]) -> int:
    """Delete rows (vectors and indexed-file entries cascade) and then their files."""
    images = session.execute(select(Image).where(Image.id.in_(image_ids))).scalars().all()
    paths = [p for image in images for p in (image.stored_path, image.thumbnail_path)]
    for image in images:
        session.delete(image)
    # Files go after the commit: a failed commit must not leave rows pointing at missing files.
    # A process killed in between leaves them recorded (`sweep_stale_pending`).
    with storage.pending(paths):
        session.commit()
        storage.delete(paths)
    return len(images)


def known_file_paths(session: Session) -> set[str]:
    rows = session.execute(text("SELECT stored_path, thumbnail_path FROM images")).all()
    return {path for row in rows for path in row}


def image_files(session: Session, storage: Storage, image_ids: Sequence[int]) -> dict[int, list[str]]:
    """For each of `image_ids` still in the gallery, its files: where `clipgallery index` found it
    (absolute paths when indexed, sorted; they may have moved since), then the gallery's own copy."""
    rows = session.execute(
        text(
            "SELECT i.id, i.stored_path, f.path FROM images i LEFT JOIN indexed_files f ON f.image_id = i.id "
            "WHERE i.id = ANY(:ids) ORDER BY i.id, f.path"
        ),
        {"ids": list(image_ids)},
    ).all()
    found: dict[int, list[str]] = {}
    for image_id, stored_path, source in rows:
        if image_id not in found:
            found[image_id] = [str(storage.path(stored_path))]
        if source is not None:
            found[image_id].insert(-1, source)
    return found


def referenced_paths(session: Session, relpaths: list[str]) -> set[str]:
    """Those of `relpaths` that some image refers to."""
    rows = session.execute(
        text("SELECT stored_path, thumbnail_path FROM images WHERE stored_path = ANY(:p) OR thumbnail_path = ANY(:p)"),
        {"p": relpaths},
    ).all()
    return {path for row in rows for path in row} & set(relpaths)


def sweep_stale_pending(session: Session, storage: Storage) -> list[str]:
    """Finish what killed processes left inside `Storage.pending`: of the files each record
    names, delete those no image refers to, then the record. Costs what the records name, not
    what the gallery holds (a walk over every file took 1.6 s per 20,000 images here)."""
    removed: list[str] = []
    for record, relpaths in storage.stale_pending():
        unreferenced = sorted(set(relpaths) - referenced_paths(session, relpaths)) if relpaths else []
        present = [p for p in unreferenced if storage.is_file(p)]
        storage.delete(present)
        record.unlink(missing_ok=True)
        removed += present
    return removed


# --- filters and browsing --------------------------------------------------------------------

MIME_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")
SORTS = {"newest": "i.created_at DESC, i.id DESC", "oldest": "i.created_at ASC, i.id ASC", "name": "i.name, i.id"}


def _like_pattern(word: str) -> str:
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(frozen=True)
class ImageFilters:
    """Narrow browsing and similarity search alike. Empty fields do not filter."""

    text: str | None = None  # every word must occur in the name or the description
    uploader: str | None = None  # user name of the uploader
    added_from: date | None = None  # inclusive, by day
    added_to: date | None = None  # inclusive, by day
    mime_type: str | None = None

    def conditions(self) -> tuple[list[str], dict]:
        """SQL conditions on images `i`, with their bound parameters."""
        conditions: list[str] = []
        params: dict = {}
        words = (self.text or "").split()[:10]
        for n, word in enumerate(words):
            conditions.append(f"(i.name ILIKE :word{n} OR i.description ILIKE :word{n})")
            params[f"word{n}"] = _like_pattern(word[:100])
        if self.uploader:
            conditions.append("i.uploaded_by = (SELECT id FROM users WHERE username = :uploader)")
            params["uploader"] = self.uploader
        if self.added_from:
            conditions.append("i.created_at >= :added_from")
            params["added_from"] = self.added_from
        if self.added_to:
            conditions.append("i.created_at < CAST(:added_to AS date) + 1")
            params["added_to"] = self.added_to
        if self.mime_type:
            if self.mime_type not in MIME_TYPES:
                raise ValueError(f"Unknown format {self.mime_type!r}: use one of {', '.join(MIME_TYPES)}.")
            conditions.append("i.mime_type = :mime_type")
            params["mime_type"] = self.mime_type
        return conditions, params


@dataclass(frozen=True)
class BrowsePage:
    items: list[ImageRecord]
    total: int
    limit: int
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.items) < self.total


def browse_images(
    session: Session,
    filters: ImageFilters | None = None,
    sort: str = "newest",
    limit: int = 60,
    offset: int = 0,
) -> BrowsePage:
    """All images (or those the filters let through), newest first or by name."""
    if sort not in SORTS:
        raise ValueError(f"Unknown sort {sort!r}: use one of {', '.join(SORTS)}.")
    if not 1 <= limit <= 500 or offset < 0:
        raise ValueError("limit must be 1..500 and offset at least 0.")
    conditions, params = (filters or ImageFilters()).conditions()
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    total = session.execute(text(f"SELECT count(*) FROM images i {where}"), params).scalar_one()
    ids = (
        session.execute(
            text(f"SELECT i.id FROM images i {where} ORDER BY {SORTS[sort]} LIMIT :limit OFFSET :offset"),
            {**params, "limit": limit, "offset": offset},
        )
        .scalars()
        .all()
    )
    records = {image.id: image for image in session.execute(select(Image).where(Image.id.in_(ids))).scalars()}
    with_vectors = set(
        session.execute(select(ImageEmbedding.image_id).where(ImageEmbedding.image_id.in_(ids))).scalars()
    )
    items = [_record(records[i], i in with_vectors) for i in ids]
    return BrowsePage(items=items, total=total, limit=limit, offset=offset)


def uploader_names(session: Session) -> list[str]:
    """Users who uploaded at least one image (for filter menus)."""
    return list(
        session.execute(
            text("SELECT DISTINCT u.username FROM users u JOIN images i ON i.uploaded_by = u.id ORDER BY 1")
        ).scalars()
    )


# --- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryStatus:
    database_ok: bool
    database_detail: str
    model_ok: bool
    model_detail: str
    image_count: int
    vector_index: str = ""


def gallery_status(settings: Settings, load_model: bool = False) -> GalleryStatus:
    """Database and model health in words; never raises.

    The model is reported as it is; it is only loaded here when `load_model` is set, so a health
    check never blocks on a model download.
    """
    from clipgallery import db
    from clipgallery.embedding import get_embedder

    database_ok, database_detail, image_count, vector_index = False, "", 0, ""
    try:
        engine = db.get_engine(settings)
        info = db.check_server(engine)
        database_detail = f"PostgreSQL {info.server_version}, pgvector {info.pgvector_version}"
        with Session(engine) as session:
            if session.execute(text("SELECT to_regclass('images')")).scalar() is None:
                # A new server or database: what to do, rather than the first query's error.
                database_detail += (
                    ", but no gallery in it yet: `clipgallery db upgrade` creates its tables "
                    "(`clipgallery serve` does so when it starts)"
                )
            else:
                image_count = count_images(session)
                vector_index = db.describe_vector_index(session, settings)
                database_ok = True
    except Exception as exc:
        database_detail = f"{type(exc).__name__}: {exc}".splitlines()[0]

    embedder = get_embedder(settings)
    if load_model or embedder.loaded or embedder.error is not None:
        model_ok, model_detail = embedder.status()
    else:
        model_ok = False
        model_detail = (
            "The model is loading."
            if settings.model_preload
            else "The model is not loaded yet (it loads on first use)."
        )
    if model_ok and database_ok:
        try:
            with Session(db.get_engine(settings)) as session:
                gallery_model_id(session, embedder)
        except ModelMismatchError as exc:
            model_ok, model_detail = False, str(exc)
        except Exception as exc:
            model_detail += f" (model check failed: {exc})"
    return GalleryStatus(database_ok, database_detail, model_ok, model_detail, image_count, vector_index)
