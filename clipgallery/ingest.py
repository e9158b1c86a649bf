"""Adding images: validate -> store files -> embed -> one transaction for row and vector.

One code path serves admin uploads, the API and bulk indexing (clipgallery.bulk). Nothing is
stored before the bytes pass validation; a failed database write removes the files it wrote.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from clipgallery import storage as files
from clipgallery.db import deferred_vector_index, index_if_grown
from clipgallery.embedding import Embedder
from clipgallery.gallery import gallery_model_id
from clipgallery.imaging import (
    DecodedImage,
    RejectedImage,
    decode_image,
    decode_upload,
    make_thumbnail,
    original_serves_as_thumbnail,
    working_size_for,
)
from clipgallery.models import Image
from clipgallery.storage import Storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_INSERT_VECTOR_SQL = "INSERT INTO image_embeddings (image_id, model_id, embedding) VALUES (:id, :model, :vector)"
_UPSERT_VECTOR_SQL = (
    f"{_INSERT_VECTOR_SQL} "
    "ON CONFLICT (image_id) DO UPDATE SET model_id = EXCLUDED.model_id, "
    "embedding = EXCLUDED.embedding, created_at = now()"
)

MAX_NAME = 500
MAX_DESCRIPTION = 10_000


@dataclass
class IngestOutcome:
    status: str  # "added" | "duplicate" | "rejected"
    filename: str
    image_id: int | None = None
    name: str = ""
    reason: str = ""
    kind: str = ""  # for rejections: RejectedImage.kind ("empty", "too_large", "unsupported", "damaged")


@dataclass
class PreparedImage:
    """A validated image with everything derived from it, ready for the model and the database."""

    filename: str
    name: str
    description: str
    decoded: DecodedImage
    thumbnail: bytes | None  # None: the stored original is its own thumbnail (`original_serves_as_thumbnail`)
    thumbnail_format: str
    pixels: torch.Tensor | None = None  # the model's input, when prepared ahead of the model
    vector: np.ndarray | None = None  # the model's output, when embedded ahead of storing
    extra: dict = field(default_factory=dict)  # caller's bookkeeping (e.g. the source path)


def clean_filename(filename: str | bytes | None) -> str:
    """A display-safe base name: no directories, control characters or NULs, at most 255 chars."""
    if isinstance(filename, bytes):
        filename = filename.decode("utf-8", "replace")
    filename = filename or ""
    base = PureWindowsPath(PurePosixPath(filename).name).name
    base = "".join(ch for ch in unicodedata.normalize("NFC", base) if unicodedata.category(ch)[0] != "C")
    base = base.strip().strip(".")
    return base[:255] or "image"


def default_name(filename: str) -> str:
    stem = clean_filename(filename).rsplit(".", 1)[0]
    return re.sub(r"[_\s]+", " ", stem).strip() or "Untitled"


def prepare_image(
    data: bytes,
    filename: str | bytes | None,
    settings,
    name: str | None = None,
    description: str | None = None,
    embedder: Embedder | None = None,
) -> PreparedImage:
    """Validate and decode; raises RejectedImage. With `embedder`, also the model's input tensor
    (so threads can do this while the model works on the previous batch)."""
    safe_filename = clean_filename(filename)
    decoded = decode_upload(data, settings)
    small_enough = original_serves_as_thumbnail(decoded, settings.thumbnail_size)
    prepared = PreparedImage(
        filename=safe_filename,
        name=((name or "").strip() or default_name(safe_filename))[:MAX_NAME],
        description=(description or "").strip()[:MAX_DESCRIPTION],
        decoded=decoded,
        thumbnail=None
        if small_enough
        else make_thumbnail(decoded.rgb, settings.thumbnail_size, settings.thumbnail_format, decoded.icc_profile),
        thumbnail_format=settings.thumbnail_format,
    )
    if embedder is not None:
        prepared.pixels = embedder.preprocess(decoded.rgb)
    return prepared


def embed_prepared(embedder: Embedder, batch: list[PreparedImage]) -> np.ndarray:
    """(n, d) vectors of a non-empty batch. Items embedded ahead (bulk indexing's model thread)
    keep their vector; the others are embedded now, from their prepared pixels when all have
    them, and keep theirs too."""
    import torch

    todo = [p for p in batch if p.vector is None]
    if todo:
        if all(p.pixels is not None for p in todo):
            vectors = embedder.encode_preprocessed(torch.stack([p.pixels for p in todo]))
        else:
            vectors = embedder.encode_images([p.decoded.rgb for p in todo])
        for prepared, vector in zip(todo, vectors, strict=True):
            prepared.vector = vector
    return np.stack([p.vector for p in batch])


def store_prepared(
    session: Session,
    embedder: Embedder,
    storage: Storage,
    batch: list[PreparedImage],
    uploaded_by: int | None = None,
    before_commit: Callable[[Session, list[IngestOutcome], list[PreparedImage]], None] | None = None,
) -> list[IngestOutcome]:
    """Embed and store a batch in one transaction; duplicates (by content) return the existing row.

    `before_commit` may add rows of its own to the same transaction (bulk indexing records the
    source files there). On any failure the transaction is rolled back and files written by this
    call are removed.
    """
    model_id = gallery_model_id(session, embedder)
    for attempt in range(2):
        existing = dict(
            session.execute(
                select(Image.sha256, Image.id).where(Image.sha256.in_([p.decoded.sha256 for p in batch]))
            ).all()
        )
        outcomes: list[IngestOutcome] = []
        new: list[PreparedImage] = []
        new_index: dict[str, int] = {}
        for prepared in batch:
            sha = prepared.decoded.sha256
            if sha in existing or sha in new_index:
                outcomes.append(IngestOutcome("duplicate", prepared.filename, existing.get(sha), prepared.name))
            else:
                new_index[sha] = len(outcomes)
                outcomes.append(IngestOutcome("added", prepared.filename, None, prepared.name))
                new.append(prepared)

        vectors = embed_prepared(embedder, new) if new else None

        planned = []
        for prepared in new:
            stored = files.original_relpath(prepared.decoded.sha256, prepared.decoded.mime_type)
            thumb = (
                stored
                if prepared.thumbnail is None
                else files.thumbnail_relpath(prepared.decoded.sha256, prepared.thumbnail_format)
            )
            planned.append((prepared, stored, thumb))
        written: list[str] = []
        # Recorded while being written and committed: a process killed in between leaves the
        # record, and the next bulk run or server start removes those of the files no row refers to.
        with storage.pending(path for _, stored, thumb in planned for path in (stored, thumb)):
            try:
                rows = []
                for prepared, stored, thumb in planned:
                    decoded = prepared.decoded
                    if storage.write(stored, decoded.served_bytes):
                        written.append(stored)
                    if prepared.thumbnail is not None and storage.write(thumb, prepared.thumbnail):
                        written.append(thumb)
                    rows.append(
                        {
                            "sha256": decoded.sha256,
                            "original_filename": prepared.filename,
                            "stored_path": stored,
                            "thumbnail_path": thumb,
                            "name": prepared.name,
                            "description": prepared.description,
                            "mime_type": decoded.mime_type,
                            "width": decoded.width,
                            "height": decoded.height,
                            "byte_size": decoded.byte_size,
                            "uploaded_by": uploaded_by,
                        }
                    )
                # Plain INSERT statements (a batch in one round trip each) rather than ORM objects:
                # nothing here needs the objects, and building and flushing them was about a sixth of
                # bulk indexing's non-model Python time (profiled with yappi).
                image_ids: dict[str, int] = {}
                if rows:
                    image_ids = dict(session.execute(insert(Image).returning(Image.sha256, Image.id), rows).all())
                    # Vectors go as numpy arrays in pgvector's binary format: the ORM column type would
                    # spell each of the 512 floats out as text first (0.2 ms per vector here).
                    session.execute(
                        text(_INSERT_VECTOR_SQL),
                        [
                            {"id": image_ids[prepared.decoded.sha256], "model": model_id, "vector": vector}
                            for prepared, vector in zip(new, vectors, strict=True)
                        ],
                    )
                for sha, image_id in image_ids.items():
                    outcomes[new_index[sha]].image_id = image_id
                # Duplicates inside the batch point at the row added for their first copy.
                for outcome, prepared in zip(outcomes, batch, strict=True):
                    if outcome.status == "duplicate" and outcome.image_id is None:
                        outcome.image_id = outcomes[new_index[prepared.decoded.sha256]].image_id
                if before_commit is not None:
                    before_commit(session, outcomes, batch)
                session.commit()
                return outcomes
            except IntegrityError:
                # Another process added the same content meanwhile: forget our copies, retry once
                # (the retry sees those images as duplicates).
                session.rollback()
                _remove_unreferenced(session, storage, written)
                if attempt == 1:
                    raise
            except BaseException:
                session.rollback()
                _remove_unreferenced(session, storage, written)
                raise
    raise AssertionError("unreachable")


def _remove_unreferenced(session: Session, storage: Storage, written: list[str]) -> None:
    if not written:
        return
    try:
        from clipgallery.gallery import referenced_paths

        referenced = referenced_paths(session, written)
    except Exception:
        session.rollback()
        referenced = set()
    storage.delete(p for p in written if p not in referenced)


def ingest_image(
    session: Session,
    embedder: Embedder,
    storage: Storage,
    data: bytes,
    filename: str | bytes | None,
    name: str | None = None,
    description: str | None = None,
    uploaded_by: int | None = None,
) -> IngestOutcome:
    """Add one image (admin upload, API). Bad input gives a "rejected" outcome with the reason."""
    try:
        prepared = prepare_image(data, filename, embedder.settings, name, description)
    except RejectedImage as exc:
        return IngestOutcome("rejected", clean_filename(filename), reason=str(exc), kind=exc.kind)
    outcome = store_prepared(session, embedder, storage, [prepared], uploaded_by=uploaded_by)[0]
    if outcome.status == "added":
        index_if_grown(session, embedder.settings)
    return outcome


def reembed_images(
    session: Session,
    embedder: Embedder,
    storage: Storage,
    image_ids: list[int] | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    on_index_build: Callable[[], None] | None = None,
) -> int:
    """Compute vectors with the configured model: for `image_ids`, or for every image whose
    vector is missing or came from another model. A dimension change rebuilds the column and its
    index first. Commits per batch, so an interrupted run resumes. Returns the number embedded.
    `on_index_build` is called when the vector index held back for the run starts to be built."""
    from tqdm import tqdm

    from clipgallery.gallery import register_model, set_vector_dimension, vector_column_dimension

    settings = embedder.settings
    identity = embedder.identity
    if vector_column_dimension(session) != identity.dimension:
        set_vector_dimension(session, settings, identity.dimension)
    model_id = register_model(session, identity)
    if image_ids is None:
        todo = (
            session.execute(
                text(
                    "SELECT i.id FROM images i LEFT JOIN image_embeddings e ON e.image_id = i.id "
                    "WHERE e.image_id IS NULL OR e.model_id <> :model_id ORDER BY i.id"
                ),
                {"model_id": model_id},
            )
            .scalars()
            .all()
        )
    else:
        from clipgallery.gallery import gallery_model_id

        gallery_model_id(session, embedder)
        todo = sorted(set(image_ids))
    done = 0
    bar = tqdm(total=len(todo), unit="img", desc="re-embedding", disable=not progress or not todo)

    def building() -> None:
        if progress:
            tqdm.write("building the vector index ...")
        if on_index_build is not None:
            on_index_build()

    # Re-embedding most of the gallery: the vector index is built once at the end, and comes out
    # without the dead entries of the replaced vectors.
    with deferred_vector_index(session, settings, len(todo), on_build=building):
        for start in range(0, len(todo), settings.embed_batch_size):
            ids = todo[start : start + settings.embed_batch_size]
            rows = session.execute(select(Image.id, Image.stored_path).where(Image.id.in_(ids))).all()
            pictures, kept = [], []
            for image_id, stored_path in rows:
                try:
                    data = storage.path(stored_path).read_bytes()
                    decoded = decode_image(data, 1 << 62, 1 << 62, working_size_for(settings.thumbnail_size))
                except (OSError, RejectedImage) as exc:
                    log.warning("cannot re-embed image %s (%s): %s", image_id, stored_path, exc)
                    continue
                pictures.append(decoded.rgb)
                kept.append(image_id)
            if kept:
                vectors = embedder.encode_images(pictures)
                session.execute(
                    text(_UPSERT_VECTOR_SQL),
                    [
                        {"id": image_id, "model": model_id, "vector": vector}
                        for image_id, vector in zip(kept, vectors, strict=True)
                    ],
                )
                session.commit()
                done += len(kept)
            bar.update(len(ids))
            if on_progress is not None:
                on_progress(min(len(todo), start + len(ids)), len(todo))
        bar.close()
    return done
