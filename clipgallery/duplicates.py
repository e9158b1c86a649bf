"""Near-duplicate detection: groups of images whose vectors lie within a distance of each other.

Exact duplicates (the same bytes) never get a second row: ingest finds them by SHA-256. This
finds the rest — the same picture resized, re-compressed, converted, lightly edited — from the
stored vectors alone, so no model is loaded.

How it works (the vector work in PostgreSQL, through the HNSW index; a gallery without the index,
one below `vector_index_min_vectors`, compares its vectors exactly in matrix products instead,
`_exact_close_pairs`):

1. For each stored vector `e1` of the model, its `neighbours` nearest vectors, by a LATERAL join
   whose inner query is an ordinary index-served nearest-neighbour search::

       SELECT e1.image_id AS a, nn.image_id AS b, nn.distance
       FROM image_embeddings e1
       CROSS JOIN LATERAL (
           SELECT e2.image_id, e2.model_id, e2.embedding <=> e1.embedding AS distance
           FROM image_embeddings e2
           ORDER BY e2.embedding <=> e1.embedding
           LIMIT :neighbours + 1            -- + 1: the image finds itself first
       ) nn
       WHERE e1.model_id = :model_id AND nn.model_id = :model_id
         AND nn.image_id <> e1.image_id AND nn.distance <= :max_distance;

   The conditions sit outside the LATERAL on purpose: inside, they would filter the index scan's
   candidates (and with pgvector's iterative scan, keep it searching far past the near copies).
   `hnsw.ef_search` is set (transaction-local) to a bounded value ≥ neighbours + 1 and the
   iterative scan is switched off, so each inner search costs one bounded graph walk.
   The outer rows go in id-ordered chunks: one statement per chunk, progress between them.
2. The images the pairs link are cut into groups around keepers (`_groups_around_keepers`): the
   best image to keep (most pixels, then the oldest) takes every image linked to it, directly or
   through one other, that lies within the threshold of itself, measured exactly from the two
   vectors; the best of the rest does the same, and so on.
   So every image of a group is a near copy of the group's suggested keeper, and deleting "all but
   the keeper" deletes only those. Linking alone (single linkage: A~B and B~C put A, B and C
   together even when A and C are far apart) chained whole galleries into one group: 971 of 1,000
   photos at similarity 0.95 with a random-weight model, and a series of shots of one scene with a
   real one.

Complexity: n index searches of cost ~O(ef_search · log n) each, so O(n log n) for the gallery,
plus, for the p pairs found (p ≤ n · neighbours, in practice a few per near copy), one exact
comparison of each keeper with the images within two links of it.
Measured on this 2-core machine: see docs/operations.md ("Near-duplicates").

Distances here are **cosine distances** (1 − similarity) whatever the index metric: the
threshold is converted to the index metric's own distance for the query (cosine, L2 and inner
product agree on clipgallery's unit vectors), and the distances found are converted back. The L1
metric implies no similarity and is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
from sqlalchemy import bindparam, select, text
from sqlmodel import Session

from clipgallery.config import Settings
from clipgallery.db import vector_index_present
from clipgallery.gallery import REEMBED_COMMAND, ModelMismatchError, file_url
from clipgallery.models import METRIC_OPERATORS, ImageEmbedding
from clipgallery.search import (
    MAX_EF_SEARCH,
    InvalidQuery,
    _has_iterative_scan,
    distance_bound,
    similarity_from_distance,
)

log = logging.getLogger(__name__)

# Outer rows per statement: small enough for regular progress reports, large enough that the
# per-statement overhead does not matter.
CHUNK_SIZE = 5000
MAX_NEIGHBOURS = 100


@dataclass(frozen=True)
class DuplicateImage:
    id: int
    name: str
    thumbnail_url: str
    original_url: str
    width: int
    height: int
    byte_size: int
    mime_type: str
    created_at: datetime | None
    # Cosine distance to the group's suggested keeper; the keeper's own: to its closest copy.
    distance: float
    similarity: float  # 1 - distance

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DuplicateGroup:
    """Near copies of one image, the suggested keeper: it comes first, then the others by id."""

    images: tuple[DuplicateImage, ...]
    keep_id: int  # suggested image to keep: most pixels, then the oldest, then the lowest id
    distance: float  # the farthest image from the keeper (cosine distance): all of it appears at this threshold
    closest_distance: float  # the keeper's closest copy
    pairs: tuple[tuple[int, int, float], ...]  # (keeper id, id, cosine distance) per copy, closest first
    model_id: int = 0  # whose vectors were compared
    max_distance: float = 1.0  # the threshold the group was formed at

    @property
    def similarity(self) -> float:
        """The least similarity of an image to the keeper (1 - distance)."""
        return 1.0 - self.distance

    @property
    def ids(self) -> list[int]:
        return [image.id for image in self.images]

    @property
    def keeper(self) -> DuplicateImage:
        return next(image for image in self.images if image.id == self.keep_id)


def similarity_to_distance(min_similarity: float) -> float:
    """A minimum similarity as the cosine distance threshold (1 - similarity)."""
    if not -1.0 <= min_similarity <= 1.0:
        raise InvalidQuery(f"The minimum similarity must be between -1 and 1, got {min_similarity}.")
    return 1.0 - min_similarity


# --- which model's vectors ---------------------------------------------------------------------


def configured_model_weights(settings: Settings) -> tuple[str, str]:
    """(architecture, weights) of the configured model, as embedding_models records it, without
    loading the model (a checkpoint or model directory is hashed, which takes a second or two)."""
    from clipgallery.embedding import _find_weights, file_sha256, get_embedder, resolve_model_spec

    embedder = get_embedder(settings)
    if embedder.loaded:
        identity = embedder.identity
        return identity.architecture, identity.weights
    spec = resolve_model_spec(settings)
    if spec.model_dir is not None:
        weights = _find_weights(spec.model_dir)
        return spec.architecture, "sha256:" + file_sha256(weights) if weights else ""
    if spec.checkpoint is not None:
        return spec.architecture, "sha256:" + file_sha256(spec.checkpoint) if spec.checkpoint.is_file() else ""
    return spec.architecture, spec.pretrained_tag or "random"


def stored_model_id(session: Session, settings: Settings) -> int | None:
    """The model whose vectors to compare, without loading any model; None when there are no vectors.

    Vectors of one model are always comparable with each other, so a gallery whose vectors all
    come from one model uses that model, whatever is configured. During a change of models (some
    vectors of each), the configured model's vectors are used; when it has none, ModelMismatchError.
    """
    state = session.execute(
        text(
            "SELECT (SELECT min(model_id) FROM image_embeddings) AS lowest, "
            "(SELECT max(model_id) FROM image_embeddings) AS highest"
        )
    ).one()
    if state.lowest is None:
        return None
    if state.lowest == state.highest:
        return state.lowest
    architecture, weights = configured_model_weights(settings)
    model_id = session.execute(
        text(
            "SELECT m.id FROM embedding_models m WHERE m.architecture = :a AND m.weights = :w "
            "AND EXISTS (SELECT 1 FROM image_embeddings e WHERE e.model_id = m.id)"
        ),
        {"a": architecture, "w": weights},
    ).scalar()
    if model_id is None:
        raise ModelMismatchError(
            "The gallery holds vectors of several models and none of the configured one: "
            f"run `{REEMBED_COMMAND}` first."
        )
    log.warning("the gallery holds vectors of several models: comparing only those of model %d", model_id)
    return model_id


# --- the scan ----------------------------------------------------------------------------------


def pairs_sql(metric: str) -> str:
    """The statement that finds the close pairs of one chunk of images (exposed for docs and tests)."""
    operator = METRIC_OPERATORS[metric]
    return (
        "SELECT e1.image_id AS a, nn.image_id AS b, nn.distance "
        "FROM image_embeddings e1 "
        "CROSS JOIN LATERAL ("
        f"  SELECT e2.image_id, e2.model_id, e2.embedding {operator} e1.embedding AS distance"
        "  FROM image_embeddings e2"
        f"  ORDER BY e2.embedding {operator} e1.embedding"
        "  LIMIT :inner_limit"
        ") nn "
        "WHERE e1.model_id = :model_id AND e1.image_id BETWEEN :first_id AND :last_id "
        "AND nn.model_id = :model_id AND nn.image_id <> e1.image_id AND nn.distance <= :bound"
    )


def _validate(settings: Settings, max_distance: float, neighbours: int, limit_groups: int | None) -> None:
    if settings.index_metric == "l1":
        raise InvalidQuery(
            "Near-duplicate detection needs a similarity: the L1 index metric has none (use cosine, l2 or ip)."
        )
    if not 0.0 <= max_distance <= 1.0:
        raise InvalidQuery(
            f"The distance threshold must be between 0 and 1 (a similarity between 1 and 0), got {max_distance}."
        )
    if not 1 <= neighbours <= MAX_NEIGHBOURS:
        raise InvalidQuery(f"neighbours must be between 1 and {MAX_NEIGHBOURS}, got {neighbours}.")
    if limit_groups is not None and limit_groups < 1:
        raise InvalidQuery(f"The group limit must be at least 1, got {limit_groups}.")


def find_close_pairs(
    session: Session,
    settings: Settings,
    model_id: int,
    max_distance: float,
    neighbours: int = 10,
    ef_search: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[int, int], float]:
    """{(lower id, higher id): cosine distance} for every pair of the model's images found within
    `max_distance` (cosine) of each other among each image's `neighbours` nearest."""
    _validate(settings, max_distance, neighbours, None)
    if not vector_index_present(session):
        return _exact_close_pairs(session, model_id, max_distance, neighbours, progress)
    metric = settings.index_metric
    bound = distance_bound(metric, 1.0 - max_distance)
    # Near copies are the very closest neighbours: the image queries' beam finds them (99.4 % of
    # planted copies at 100k with ef_search 40, docs/operations.md), narrower than text queries need.
    ef = min(MAX_EF_SEARCH, max(neighbours + 1, ef_search or settings.hnsw_ef_search_image))
    ids = (
        session.execute(
            text("SELECT image_id FROM image_embeddings WHERE model_id = :m ORDER BY image_id"), {"m": model_id}
        )
        .scalars()
        .all()
    )
    # Transaction-local settings (the session's transaction ends with it): a bounded graph walk per image.
    iterative = ", set_config('hnsw.iterative_scan', 'off', true)" if _has_iterative_scan(session) else ""
    session.execute(text(f"SELECT set_config('hnsw.ef_search', :ef, true){iterative}"), {"ef": str(ef)})
    statement = text(pairs_sql(metric))
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), CHUNK_SIZE):
        chunk = ids[start : start + CHUNK_SIZE]
        rows = session.execute(
            statement,
            {
                "model_id": model_id,
                "first_id": chunk[0],
                "last_id": chunk[-1],
                "inner_limit": neighbours + 1,
                "bound": bound,
            },
        ).all()
        for a, b, distance in rows:
            similarity = similarity_from_distance(metric, float(distance))
            cosine = max(0.0, 1.0 - similarity)
            key = (a, b) if a < b else (b, a)
            if cosine < pairs.get(key, 2.0):
                pairs[key] = cosine
        if progress is not None:
            progress(start + len(chunk), len(ids))
    return pairs


# Rows compared with the whole gallery per matrix product of the exact path: 256 rows of
# similarities with 100k vectors take 100 MB.
EXACT_CHUNK_ROWS = 256


def _exact_close_pairs(
    session: Session,
    model_id: int,
    max_distance: float,
    neighbours: int,
    progress: Callable[[int, int], None] | None,
) -> dict[tuple[int, int], float]:
    """`find_close_pairs` for a gallery without the HNSW index (one below
    `vector_index_min_vectors`, or one whose index a bulk run holds back): n exact scans in SQL
    would cost O(n²) distance evaluations one query at a time (≈ 35 s at 10k vectors here); the
    same comparisons as matrix products over the vectors fetched once take a fraction of that, and
    find each image's true nearest neighbours."""
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.embedding)
        .where(ImageEmbedding.model_id == model_id)
        .order_by(ImageEmbedding.image_id)
    ).all()
    pairs: dict[tuple[int, int], float] = {}
    if len(rows) < 2:
        return pairs
    ids = np.array([row[0] for row in rows])
    vectors = np.stack([np.asarray(row[1], dtype=np.float32) for row in rows])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    take = min(neighbours + 1, len(ids))  # + 1: each image finds itself first
    for start in range(0, len(ids), EXACT_CHUNK_ROWS):
        similarities = vectors[start : start + EXACT_CHUNK_ROWS] @ vectors.T
        nearest = np.argpartition(-similarities, take - 1, axis=1)[:, :take]
        for offset, columns in enumerate(nearest):
            a = int(ids[start + offset])
            for column in columns:
                b = int(ids[column])
                cosine = max(0.0, 1.0 - float(similarities[offset, column]))
                if b != a and cosine <= max_distance:
                    key = (a, b) if a < b else (b, a)
                    if cosine < pairs.get(key, 2.0):
                        pairs[key] = cosine
        if progress is not None:
            progress(min(start + EXACT_CHUNK_ROWS, len(ids)), len(ids))
    return pairs


def find_near_duplicate_groups(
    session: Session,
    settings: Settings,
    model_id: int | None,
    max_distance: float,
    limit_groups: int | None = None,
    neighbours: int = 10,
    ef_search: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[DuplicateGroup]:
    """Groups of near-duplicate images of model `model_id` (see `stored_model_id`), tightest first.

    `max_distance` is a cosine distance (1 − similarity): two images within it are near copies.
    Each image is compared with its `neighbours` nearest images through the HNSW index, so the
    cost grows as O(n log n) with the gallery (see the module docstring); a group of more than
    `neighbours` + 1 copies of one picture is still found whole: its images are linked through
    each other, and each is then measured against the keeper.
    Groups are sorted by the distance at which they are complete, then largest first, and cut
    to `limit_groups`. `model_id` None (no vectors) gives no groups.
    """
    _validate(settings, max_distance, neighbours, limit_groups)
    if model_id is None:
        return []
    started = time.perf_counter()
    pairs = find_close_pairs(session, settings, model_id, max_distance, neighbours, ef_search, progress)
    groups = groups_from_pairs(session, pairs, model_id, max_distance)
    log.info(
        "near-duplicates: %d pairs, %d groups within cosine distance %.4f in %.2f s",
        len(pairs),
        len(groups),
        max_distance,
        time.perf_counter() - started,
    )
    return groups[:limit_groups] if limit_groups is not None else groups


# --- pairs to groups ---------------------------------------------------------------------------


def _keeper_key(image: DuplicateImage) -> tuple:
    # Most pixels first; then the oldest (the likely original); then the lowest id.
    created = image.created_at.timestamp() if image.created_at else float("inf")
    return (-image.pixels, created, image.id)


def _groups_around_keepers(
    members: Iterable[int],
    images: dict[int, DuplicateImage],
    vectors: dict[int, np.ndarray],
    model_id: int,
    max_distance: float,
    links: dict[int, set[int]] | None = None,
) -> list[DuplicateGroup]:
    """`members` cut into groups of near copies of a keeper: the best image to
    keep takes every other within `max_distance` of itself, then the best of the rest, and so on
    (an image alone forms no group). Distances are exact, from the vectors. A keeper's copies are
    looked for among the images linked to it directly or through one other (`links`; None: among
    all `members`): that finds a set of copies larger than each image's compared neighbours whole,
    while the work stays linear in the images where a loose threshold links a whole gallery."""
    order = sorted((i for i in members if i in images and i in vectors), key=lambda i: _keeper_key(images[i]))
    unassigned = set(order)
    groups = []
    for keeper in order:
        if keeper not in unassigned:
            continue
        unassigned.discard(keeper)
        if links is None:
            reach = unassigned
        else:
            reach = set(links.get(keeper, ()))
            for linked in list(reach):
                reach |= links.get(linked, set())
        candidates = sorted(i for i in reach if i in unassigned)
        if not candidates:
            continue
        distances = 1.0 - np.stack([vectors[i] for i in candidates]) @ vectors[keeper]
        copies = {i: max(0.0, float(d)) for i, d in zip(candidates, distances, strict=True) if d <= max_distance}
        if copies:
            unassigned -= copies.keys()
            groups.append(_group(keeper, copies, images, model_id, max_distance))
    return groups


def _group(
    keeper: int, copies: dict[int, float], images: dict[int, DuplicateImage], model_id: int, max_distance: float
) -> DuplicateGroup:
    closest = min(copies.values())
    group = [replace(images[keeper], distance=closest, similarity=1.0 - closest)]
    group += [replace(images[i], distance=d, similarity=1.0 - d) for i, d in sorted(copies.items())]
    return DuplicateGroup(
        images=tuple(group),
        keep_id=keeper,
        distance=max(copies.values()),
        closest_distance=closest,
        pairs=tuple(sorted(((keeper, i, d) for i, d in copies.items()), key=lambda t: (t[2], t[1]))),
        model_id=model_id,
        max_distance=float(max_distance),
    )


def _images(session: Session, ids: Iterable[int]) -> dict[int, DuplicateImage]:
    """The images' details (distances still to be filled in)."""
    ids = list(ids)
    if not ids:
        return {}
    rows = session.execute(
        text(
            "SELECT id, name, thumbnail_path, stored_path, width, height, byte_size, mime_type, created_at "
            "FROM images WHERE id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": ids},
    ).all()
    return {
        row.id: DuplicateImage(
            id=row.id,
            name=row.name,
            thumbnail_url=file_url(row.thumbnail_path),
            original_url=file_url(row.stored_path),
            width=row.width,
            height=row.height,
            byte_size=row.byte_size,
            mime_type=row.mime_type,
            created_at=row.created_at,
            distance=0.0,
            similarity=1.0,
        )
        for row in rows
    }


def _unit_vectors(session: Session, model_id: int, ids: Iterable[int]) -> dict[int, np.ndarray]:
    """The images' vectors of model `model_id`, scaled to unit length."""
    ids = list(ids)
    if not ids:
        return {}
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.embedding).where(
            ImageEmbedding.model_id == model_id, ImageEmbedding.image_id.in_(ids)
        )
    ).all()
    vectors = {}
    for image_id, embedding in rows:
        vector = np.asarray(embedding, dtype=np.float32)
        vectors[image_id] = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vectors


def _sort(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    return sorted(groups, key=lambda g: (g.distance, -len(g.images), g.images[0].id))


def groups_from_pairs(
    session: Session, pairs: dict[tuple[int, int], float], model_id: int, max_distance: float
) -> list[DuplicateGroup]:
    """Close pairs {(id, id): cosine distance} → groups of near copies of a keeper, with their
    image details, tightest first."""
    links: dict[int, set[int]] = {}
    for a, b in pairs:
        links.setdefault(a, set()).add(b)
        links.setdefault(b, set()).add(a)
    # A keeper reaches only images linked to it, so no group spans two sets of linked images.
    images, vectors = _images(session, links), _unit_vectors(session, model_id, links)
    return _sort(_groups_around_keepers(links, images, vectors, model_id, max_distance, links))


def without_images(session: Session, groups: list[DuplicateGroup], removed: Iterable[int]) -> list[DuplicateGroup]:
    """The groups after some images were deleted, without scanning again: a group that lost copies
    keeps the rest (it vanishes below two images); one that lost its keeper is cut again around
    the best of its other images, from their vectors (they were near the keeper, not necessarily
    near each other)."""
    removed = set(removed)
    result: list[DuplicateGroup] = []
    for group in groups:
        if not removed & set(group.ids):
            result.append(group)
        elif group.keep_id not in removed:
            copies = {i: d for _, i, d in group.pairs if i not in removed}
            if copies:
                images = {image.id: image for image in group.images}
                result.append(_group(group.keep_id, copies, images, group.model_id, group.max_distance))
        else:
            left = [image.id for image in group.images if image.id not in removed]
            images = {image.id: image for image in group.images}
            vectors = _unit_vectors(session, group.model_id, left)
            result += _groups_around_keepers(left, images, vectors, group.model_id, group.max_distance)
    return _sort(result)
