"""Bulk indexing of a folder: `clipgallery index PATH`.

Like rclip: unchanged files (same size and mtime) are skipped without being read; a file whose
content is already in the gallery (renamed, copied) reuses the stored image and vector; decoding
runs in threads ahead of the model; every batch commits on its own, so a killed run resumes
where it stopped. Vanished files are reported, and removed only with `prune`.
"""

from __future__ import annotations

import csv
import logging
import os
import string
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text
from sqlmodel import Session

from clipgallery.db import deferred_vector_index
from clipgallery.embedding import Embedder
from clipgallery.gallery import delete_images, sweep_stale_pending
from clipgallery.imaging import RejectedImage
from clipgallery.ingest import IngestOutcome, PreparedImage, embed_prepared, prepare_image, store_prepared
from clipgallery.storage import Storage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif"}


class IndexingError(ValueError):
    """Bad arguments to the indexer (missing folder, unusable metadata file)."""


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    updated: int = 0
    reused: int = 0  # new path, content already in the gallery (renamed or copied file)
    missing: list[str] = field(default_factory=list)
    pruned: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    orphans_removed: int = 0
    seconds: float = 0.0  # the run's work, without loading the model
    model_load_seconds: float = 0.0  # loading the model and its image tower, when this run did
    # Set when the run held the vector index back and built it at its end (`deferred_vector_index`).
    index_build_seconds: float | None = None
    building_index: bool = False  # while that build runs

    @property
    def embedded(self) -> int:
        return self.indexed + self.updated

    def lines(self) -> list[str]:
        rate = f" ({self.embedded / self.seconds:.1f} images/s)" if self.seconds > 0 and self.embedded else ""
        lines = [
            f"indexed {self.indexed}, updated {self.updated}, reused {self.reused}, skipped {self.skipped}, "
            f"missing {len(self.missing)}{f' (pruned {self.pruned})' if self.pruned else ''}, "
            f"rejected {len(self.rejected)} in {self.seconds:.1f} s{rate}"
        ]
        if self.model_load_seconds >= 0.1:
            lines.append(f"(loading the model took {self.model_load_seconds:.1f} s before that)")
        if self.index_build_seconds is not None:
            lines.append(f"vector index built once at the end, in {self.index_build_seconds:.1f} s")
        lines += [f"rejected {path}: {reason}" for path, reason in self.rejected]
        shown = self.missing[:20]
        lines += [f"missing {path}" for path in shown]
        if len(self.missing) > len(shown):
            lines.append(f"... and {len(self.missing) - len(shown)} more missing")
        if self.missing and not self.pruned:
            lines.append("(files that vanished stay in the gallery; run again with --prune to remove them)")
        return lines


# --- metadata CSV ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataMapping:
    csv_path: Path
    file_column: str | None = None
    name_template: str | None = None
    description_template: str | None = None


def _template_fields(template: str) -> list[str]:
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        if not field_name or any(ch in field_name for ch in ".[]"):
            raise IndexingError(
                f"Template {template!r}: use plain column names in braces, like {{productDisplayName}}."
            )
        names.append(field_name)
    return names


def load_metadata(mapping: MetadataMapping) -> dict[str, tuple[str | None, str | None]]:
    """{relative path or base name: (name, description)} from a CSV with a header row."""
    if not mapping.csv_path.is_file():
        raise IndexingError(f"Metadata file {mapping.csv_path} does not exist.")
    with mapping.csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        file_column = mapping.file_column or next(
            (c for c in ("filename", "file", "path", "image", "file_name") if c in columns), None
        )
        if file_column not in columns:
            wanted = f"named {mapping.file_column!r}" if mapping.file_column else "(filename, file, path or image)"
            raise IndexingError(
                f"{mapping.csv_path} has no file column {wanted}; "
                f"its columns are: {', '.join(columns)}. Name it with --file-column."
            )
        name_template = mapping.name_template or ("{name}" if "name" in columns else None)
        description_template = mapping.description_template or ("{description}" if "description" in columns else None)
        for template in (name_template, description_template):
            if template:
                unknown = [f for f in _template_fields(template) if f not in columns]
                if unknown:
                    raise IndexingError(
                        f"Template {template!r} names unknown columns {', '.join(unknown)}; "
                        f"the columns are: {', '.join(columns)}."
                    )
        result = {}
        for row in reader:
            key = (row.get(file_column) or "").strip().replace("\\", "/")
            if not key:
                continue
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            name = name_template.format_map(values).strip() if name_template else None
            description = description_template.format_map(values).strip() if description_template else None
            result[key] = (name or None, description or None)
        return result


# --- indexing --------------------------------------------------------------------------------


def find_images(root: Path, recursive: bool) -> list[Path]:
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in pattern if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _known_files(session: Session, root: Path) -> dict[str, tuple[int, int, int]]:
    prefix = str(root).rstrip("/") + "/"
    rows = session.execute(
        text("SELECT path, size, mtime_ns, image_id FROM indexed_files WHERE starts_with(path, :prefix)"),
        {"prefix": prefix},
    ).all()
    return {row.path: (row.size, row.mtime_ns, row.image_id) for row in rows}


def _record_files(session: Session, outcomes: list[IngestOutcome], batch: list[PreparedImage]) -> None:
    session.execute(
        text(
            "INSERT INTO indexed_files (path, size, mtime_ns, image_id) VALUES (:path, :size, :mtime, :image) "
            "ON CONFLICT (path) DO UPDATE SET size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, "
            "image_id = EXCLUDED.image_id, indexed_at = now()"
        ),
        [
            {
                "path": prepared.extra["path"],
                "size": prepared.extra["size"],
                "mtime": prepared.extra["mtime_ns"],
                "image": outcome.image_id,
            }
            for outcome, prepared in zip(outcomes, batch, strict=True)
        ],
    )


def _remove_unreferenced_images(session: Session, storage: Storage, image_ids: set[int]) -> int:
    """Bulk-indexed images (no uploader) that no indexed file refers to any more."""
    if not image_ids:
        return 0
    orphaned = (
        session.execute(
            text(
                "SELECT i.id FROM images i WHERE i.id = ANY(:ids) AND i.uploaded_by IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM indexed_files f WHERE f.image_id = i.id)"
            ),
            {"ids": list(image_ids)},
        )
        .scalars()
        .all()
    )
    return delete_images(session, storage, list(orphaned)) if orphaned else 0


def _read_and_prepare(path: Path, stat: os.stat_result, embedder: Embedder, metadata, root: Path):
    data = path.read_bytes()
    name, description = None, None
    if metadata:
        relative = path.relative_to(root).as_posix()
        name, description = metadata.get(relative) or metadata.get(path.name) or (None, None)
    prepared = prepare_image(data, path.name, embedder.settings, name, description, embedder=embedder)
    prepared.extra.update(path=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return prepared


def _embed_ahead(
    embedder: Embedder, submitted: list[tuple[str, Future]]
) -> tuple[list[PreparedImage], list[tuple[str, str]]]:
    """A batch being prepared by the pool, with its vectors once it is ready, and the files it
    rejected. Runs on the model thread, so the model goes on to the next batch without waiting
    for the current one to be stored."""
    prepared_batch: list[PreparedImage] = []
    rejected: list[tuple[str, str]] = []
    for path, future in submitted:
        try:
            prepared_batch.append(future.result())
        except RejectedImage as exc:
            rejected.append((path, str(exc)))
        except OSError as exc:
            rejected.append((path, f"cannot read: {exc.strerror or exc}"))
    if prepared_batch:
        embed_prepared(embedder, prepared_batch)
    return prepared_batch, rejected


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def index_folder(
    session: Session,
    embedder: Embedder,
    storage: Storage,
    root: Path,
    recursive: bool = False,
    metadata: MetadataMapping | None = None,
    prune: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    on_progress: Callable[[int, int, IndexSummary], None] | None = None,
) -> IndexSummary:
    """Index the images under `root`. `on_progress(done, total, summary)` is called after each
    batch (the web app shows it); `progress` draws a terminal progress bar."""
    from tqdm import tqdm

    started = time.perf_counter()
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise IndexingError(f"{root} is not a folder.")
    mapping = load_metadata(metadata) if metadata else None
    # The model's load is timed apart from the run: a first run in a new process spends seconds on
    # it, and counted in, 100 images indexed at 20 images/s were reported at 4.
    load_started = time.perf_counter()
    embedder.load()  # fails here, before any file is read, when the model is unavailable
    summary = IndexSummary(model_load_seconds=time.perf_counter() - load_started)
    batch_size = batch_size or embedder.settings.embed_batch_size

    # Files of a run killed between writing and committing (older than a few minutes).
    summary.orphans_removed = len(sweep_stale_pending(session, storage))

    files = find_images(root, recursive)
    known = _known_files(session, root)
    seen: set[str] = set()
    work: list[tuple[Path, os.stat_result]] = []
    for path in files:
        key = str(path)
        seen.add(key)
        try:
            stat = path.stat()
        except OSError as exc:
            summary.rejected.append((key, f"cannot read: {exc.strerror}"))
            continue
        previous = known.get(key)
        if previous and previous[0] == stat.st_size and previous[1] == stat.st_mtime_ns:
            summary.skipped += 1
        else:
            work.append((path, stat))

    if work:
        load_started = time.perf_counter()
        embedder.load_image_tower()  # a run with nothing new to embed does not need it
        summary.model_load_seconds += time.perf_counter() - load_started

    replaced_images: set[int] = set()
    bar = tqdm(total=len(work), unit="img", desc="indexing", disable=not progress or not work, dynamic_ncols=True)

    def building() -> None:
        summary.building_index = True
        if progress:
            tqdm.write("building the vector index ...")
        if on_progress is not None:
            on_progress(len(work), len(work), summary)

    # A run that at least doubles the gallery builds the vector index once, at its end (if the
    # gallery is large enough to have one: `db.fit_vector_index`).
    with deferred_vector_index(session, embedder.settings, len(work), on_build=building):
        # Three stages overlap: threads decode the batch after next, one thread runs the model on the
        # next batch, and this thread stores the current one (files, then one transaction) — storing
        # took a third of the time when it waited for the model (docs/benchmarks.md). The model
        # thread takes each batch from the pool itself: when it had to wait for this thread to hand
        # it over, it sat idle whenever storing a batch took longer than embedding the next.
        with (
            ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 2))) as pool,
            ThreadPoolExecutor(max_workers=1) as model_thread,
        ):
            batches = list(_batches(work, batch_size))
            embedding: deque[Future] = deque()

            def start(index: int) -> None:
                if index < len(batches):
                    submitted = [
                        (str(p), pool.submit(_read_and_prepare, p, st, embedder, mapping, root))
                        for p, st in batches[index]
                    ]
                    embedding.append(model_thread.submit(_embed_ahead, embedder, submitted))

            start(0)
            start(1)
            try:
                for index in range(len(batches)):
                    prepared_batch, rejected = embedding.popleft().result()
                    start(index + 2)
                    summary.rejected.extend(rejected)
                    if prepared_batch:
                        outcomes = store_prepared(
                            session, embedder, storage, prepared_batch, before_commit=_record_files
                        )
                        for outcome, prepared in zip(outcomes, prepared_batch, strict=True):
                            previous = known.get(prepared.extra["path"])
                            if previous and previous[2] != outcome.image_id:
                                replaced_images.add(previous[2])
                            if outcome.status == "duplicate":
                                summary.reused += 1
                            elif previous:
                                summary.updated += 1
                            else:
                                summary.indexed += 1
                    bar.update(len(batches[index]))
                    bar.set_postfix(new=summary.indexed, updated=summary.updated, rejected=len(summary.rejected))
                    if on_progress is not None:
                        on_progress(min(len(work), (index + 1) * batch_size), len(work), summary)
            except BaseException:
                # Stop at once: drop the batches queued for preparing and embedding (their files
                # are only read; nothing of theirs is stored yet).
                pool.shutdown(wait=False, cancel_futures=True)
                model_thread.shutdown(wait=False, cancel_futures=True)
                raise
        bar.close()
        build_started = time.perf_counter()
    if summary.building_index:
        summary.index_build_seconds = time.perf_counter() - build_started
        summary.building_index = False

    if replaced_images:
        _remove_unreferenced_images(session, storage, replaced_images)

    direct_children_only = not recursive
    for path in sorted(set(known) - seen):
        if direct_children_only and Path(path).parent != root:
            continue
        summary.missing.append(path)
    if prune and summary.missing:
        gone_images = {known[p][2] for p in summary.missing}
        session.execute(text("DELETE FROM indexed_files WHERE path = ANY(:paths)"), {"paths": summary.missing})
        session.commit()
        _remove_unreferenced_images(session, storage, gone_images)
        summary.pruned = len(summary.missing)
    summary.seconds = time.perf_counter() - started - summary.model_load_seconds
    return summary
