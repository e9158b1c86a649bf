"""Near-duplicate detection: real images through the real ingest, grouped by their stored vectors.

The test model has random weights, so its distances are not a pretrained model's: here near
copies (resized, re-compressed, brightened) lie within cosine distance ~0.0015 of their original
and unrelated pictures 0.015 or more apart (measured), which sets the thresholds used below.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import numpy as np
import pytest
from PIL import ImageEnhance
from sqlalchemy import text

from clipgallery import cli
from clipgallery.duplicates import (
    DuplicateImage,
    _groups_around_keepers,
    find_close_pairs,
    find_near_duplicate_groups,
    pairs_sql,
    similarity_to_distance,
    stored_model_id,
    without_images,
)
from clipgallery.embedding import ModelIdentity
from clipgallery.gallery import ModelMismatchError, delete_images, register_model
from clipgallery.ingest import ingest_image
from clipgallery.search import InvalidQuery
from tests.conftest import encode, picture

NEAR = 0.005  # similarity 0.995: every near copy below, every unrelated pair above (with this model)


@pytest.fixture
def family(settings, session, embedder, storage) -> dict[str, int]:
    """name -> image id: two pictures with near copies, and unrelated pictures."""
    base = picture(11, (160, 120))
    second = picture(12, (160, 120))
    images = [
        ("small", encode(base.resize((120, 90)), "PNG")),  # the oldest, but fewer pixels
        ("original", encode(base, "PNG")),
        ("recompressed", encode(base, "JPEG", quality=60)),
        ("brighter", encode(ImageEnhance.Brightness(base).enhance(1.1), "PNG")),
        ("second", encode(second, "PNG")),
        ("second copy", encode(second, "JPEG", quality=85)),
        *[(f"unrelated {seed}", encode(picture(seed, (160, 120)), "PNG")) for seed in range(20, 26)],
    ]
    ids = {}
    for name, data in images:
        outcome = ingest_image(session, embedder, storage, data, f"{name}.png", name)
        assert outcome.status == "added", outcome.reason
        ids[name] = outcome.image_id
    return ids


def _names(group) -> set[str]:
    return {image.name for image in group.images}


def _groups(session, settings, max_distance=NEAR, **options):
    return find_near_duplicate_groups(session, settings, stored_model_id(session, settings), max_distance, **options)


def test_near_copies_group_with_their_original_and_unrelated_images_do_not(settings, session, family):
    groups = _groups(session, settings)
    assert [_names(g) for g in groups] == [
        {"small", "original", "recompressed", "brighter"},
        {"second", "second copy"},
    ] or [_names(g) for g in groups] == [{"second", "second copy"}, {"small", "original", "recompressed", "brighter"}]
    assert [g.distance for g in groups] == sorted(g.distance for g in groups)  # tightest first
    first = next(g for g in groups if len(g.images) == 4)
    # The keeper: most pixels (the small copy is older but smaller), then the oldest.
    assert first.keep_id == family["original"] and first.images[0].id == family["original"]
    assert first.keeper.name == "original" and first.images[0].pixels == 160 * 120
    assert [i.id for i in first.images[1:]] == sorted(i.id for i in first.images[1:])
    for group in groups:
        assert 0.0 <= group.closest_distance <= group.distance <= NEAR
        assert group.similarity == pytest.approx(1 - group.distance)
        assert len(group.pairs) >= len(group.images) - 1
        for image in group.images:
            assert image.similarity >= 1 - NEAR and image.similarity == pytest.approx(1 - image.distance)
            assert image.thumbnail_url.startswith("/files/thumbs/") and image.original_url.startswith("/files/")


def _image(image_id: int, pixels: int = 100) -> DuplicateImage:
    return DuplicateImage(image_id, f"image {image_id}", "", "", pixels, 1, 1000, "image/png", None, 0.0, 1.0)


def _at_angle(degrees: float) -> np.ndarray:
    """A unit vector at `degrees` from the first axis, in the plane of the first two."""
    vector = np.zeros(8, dtype=np.float32)
    vector[0], vector[1] = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return vector


def test_every_image_of_a_group_is_a_near_copy_of_its_keeper():
    """Links chain: A~B and B~C linked A, B and C into one group although A and C are far apart, and
    "keep suggested, delete others" would have deleted C as a copy of A. A keeper's group holds only
    the images within the threshold of the keeper; the others form groups of their own."""
    threshold = 1 - np.cos(np.radians(10))  # images within 10 degrees of each other are near copies
    # A chain, 6 degrees a step: each image is a near copy of the next, not of the one after it.
    vectors = {i: _at_angle(6 * (i - 1)) for i in range(1, 6)}
    images = {i: _image(i, pixels=1000 if i == 3 else 100) for i in vectors}  # 3: most pixels
    groups = _groups_around_keepers(list(vectors), images, vectors, 1, threshold)
    # 3 keeps its neighbours 2 and 4; then 1 (oldest id of the rest) and 5 are 24 degrees apart.
    assert [[image.id for image in g.images] for g in groups] == [[3, 2, 4]]
    (group,) = groups
    six = 1 - np.cos(np.radians(6))
    assert group.keep_id == 3 and sorted(i for _, i, _ in group.pairs) == [2, 4]
    assert all(k == 3 and d == pytest.approx(six, abs=1e-6) for k, _, d in group.pairs)
    assert group.distance == pytest.approx(six, abs=1e-6)
    assert [image.similarity for image in group.images] == pytest.approx([np.cos(np.radians(6))] * 3, abs=1e-6)

    # Random clusters: whatever the links, each group is its keeper's copies and no image is in two.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 8))
    points = np.repeat(centres, 5, axis=0) + rng.normal(scale=0.15, size=(100, 8))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    vectors = {i: points[i].astype(np.float32) for i in range(100)}
    images = {i: _image(i, pixels=int(rng.integers(1, 1000))) for i in vectors}
    groups = _groups_around_keepers(list(vectors), images, vectors, 1, 0.05)
    seen = [image.id for g in groups for image in g.images]
    assert len(seen) == len(set(seen)) and groups
    for g in groups:
        keeper = vectors[g.keep_id]
        assert all(1 - float(vectors[image.id] @ keeper) <= 0.05 + 1e-6 for image in g.images)
        assert g.keep_id == min(g.ids, key=lambda i: (-images[i].pixels, i))


def test_more_copies_than_compared_neighbours_form_one_group():
    """25 copies of one picture, each linked only to its 10 nearest (as the scan compares them): the
    keeper finds the others through the copies it is linked to."""
    rng = np.random.default_rng(1)
    points = np.ones((25, 8)) + rng.normal(scale=0.01, size=(25, 8))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    vectors = {i: points[i].astype(np.float32) for i in range(25)}
    images = {i: _image(i, pixels=1000 if i == 7 else 100) for i in vectors}
    links: dict[int, set[int]] = {}
    for i in vectors:
        nearest = np.argsort(1 - points @ points[i])[1:11]
        for j in nearest:
            links.setdefault(i, set()).add(int(j))
            links.setdefault(int(j), set()).add(i)
    assert max(len(linked) for linked in links.values()) < 24
    (group,) = _groups_around_keepers(list(vectors), images, vectors, 1, 0.01, links)
    assert group.keep_id == 7 and sorted(group.ids) == list(range(25))


def test_deleting_copies_keeps_the_rest_of_the_group():
    vectors = {i: _at_angle(2 * i) for i in range(1, 5)}
    images = {i: _image(i, pixels=1000 if i == 1 else 100) for i in vectors}
    (group,) = _groups_around_keepers(list(vectors), images, vectors, 1, 0.01)
    assert group.ids == [1, 2, 3, 4]
    # Copies deleted: the keeper keeps the others, measured as before (no database needed).
    (smaller,) = without_images(None, [group], [4])
    assert smaller.ids == [1, 2, 3] and smaller.distance == pytest.approx(1 - np.cos(np.radians(4)), abs=1e-6)
    assert without_images(None, [group], [2, 3, 4]) == []


def test_the_threshold_decides(settings, session, family):
    # The brightened copy is the farthest of the near copies (~0.0013); the others are ~0.0001 apart.
    tight = _groups(session, settings, 0.0006)
    assert {"small", "original", "recompressed"} in [_names(g) for g in tight]
    assert not any("brighter" in _names(g) for g in tight)
    # Far looser than any near copy: unrelated pictures start to join.
    loose = _groups(session, settings, 0.2)
    assert sum(len(g.images) for g in loose) > 6
    # Only the tightest groups, when asked.
    (only,) = _groups(session, settings, limit_groups=1)
    assert only == _groups(session, settings)[0]
    # Similarity in, distance out.
    assert similarity_to_distance(0.95) == pytest.approx(0.05)
    with pytest.raises(InvalidQuery):
        similarity_to_distance(1.5)
    with pytest.raises(InvalidQuery):
        _groups(session, settings, 1.5)
    with pytest.raises(InvalidQuery, match="L1"):
        _groups(session, settings.with_overrides(index_metric="l1"))


def test_deleting_rebuilds_the_groups_without_a_new_scan(settings, session, storage, family):
    groups = _groups(session, settings)
    assert delete_images(session, storage, [family["original"], family["second copy"]]) == 2
    rebuilt = without_images(session, groups, [family["original"], family["second copy"]])
    # The pair lost a member and is gone; the four lost their keeper and are cut again around a new
    # one (most pixels among the rest, then the oldest: the re-compressed copy).
    assert [_names(g) for g in rebuilt] == [{"small", "recompressed", "brighter"}]
    assert rebuilt[0].keep_id == family["recompressed"]
    assert [[i.id for i in g.images] for g in rebuilt] == [[i.id for i in g.images] for g in _groups(session, settings)]


def test_the_scan_uses_the_hnsw_index(settings, session, family):
    session.execute(text("SET LOCAL enable_seqscan = off"))
    plan = session.execute(
        text("EXPLAIN (COSTS OFF) " + pairs_sql("cosine")),
        {"model_id": 1, "first_id": 1, "last_id": 100, "inner_limit": 11, "bound": 0.05},
    ).scalars()
    assert "Index Scan using image_embeddings_embedding_hnsw" in "\n".join(plan)


def test_a_gallery_without_the_index_finds_the_same_groups_exactly(settings, session, family):
    """A gallery below `vector_index_min_vectors` has no HNSW index: its pairs come from matrix
    products over the vectors (the same neighbours and threshold, found exactly)."""
    from clipgallery.models import HNSW_INDEX_NAME

    with_index = _groups(session, settings)
    session.execute(text(f"DROP INDEX {HNSW_INDEX_NAME}"))
    progress = []
    without = _groups(session, settings, progress=lambda done, total: progress.append((done, total)))
    assert [[i.id for i in g.images] for g in without] == [[i.id for i in g.images] for g in with_index]
    for exact, indexed in zip(without, with_index, strict=True):
        assert exact.distance == pytest.approx(indexed.distance, abs=1e-5)
        assert exact.keep_id == indexed.keep_id
    assert progress[-1] == (12, 12)
    # Each image against its `neighbours` nearest only, as through the index.
    model_id = stored_model_id(session, settings)
    nearest_only = find_close_pairs(session, settings, model_id, 0.2, neighbours=1)
    assert 0 < len(nearest_only) <= 12 < len(find_close_pairs(session, settings, model_id, 0.2, neighbours=10))
    session.rollback()


def test_which_model_is_compared(settings, session, family):
    model_id = stored_model_id(session, settings)
    # A gallery half-way through a change of models: only the configured model's vectors count.
    other = register_model(session, ModelIdentity("tiny-vit", "sha256:other", 64))
    session.execute(
        text("UPDATE image_embeddings SET model_id = :other WHERE image_id = :id"),
        {"other": other, "id": family["brighter"]},
    )
    session.commit()
    assert stored_model_id(session, settings) == model_id
    groups = _groups(session, settings)
    assert {"small", "original", "recompressed"} in [_names(g) for g in groups]
    assert not any("brighter" in _names(g) for g in groups)
    # Two models, neither of them the configured one.
    session.execute(
        text("UPDATE image_embeddings SET model_id = :other WHERE image_id <> :id"),
        {"other": other, "id": family["brighter"]},
    )
    third = register_model(session, ModelIdentity("tiny-vit", "sha256:third", 64))
    session.execute(
        text("UPDATE image_embeddings SET model_id = :third WHERE image_id = :id"),
        {"third": third, "id": family["small"]},
    )
    session.commit()
    with pytest.raises(ModelMismatchError, match="reembed"):
        stored_model_id(session, settings)
    # One model only, whatever is configured: its vectors are comparable with each other.
    session.execute(text("UPDATE image_embeddings SET model_id = :other"), {"other": other})
    session.commit()
    assert stored_model_id(session, settings) == other


def test_an_empty_gallery_has_no_duplicates(settings, session):
    assert stored_model_id(session, settings) is None
    assert find_near_duplicate_groups(session, settings, None, 0.05) == []


def test_the_command(settings, family, monkeypatch, capsys):
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    monkeypatch.setenv("COLUMNS", "160")
    assert cli.main(["duplicates", "--min-similarity", "0.995", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_distance"] == pytest.approx(NEAR)
    groups = {frozenset(image["name"] for image in g["images"]): g for g in out["groups"]}
    assert set(groups) == {
        frozenset({"small", "original", "recompressed", "brighter"}),
        frozenset({"second", "second copy"}),
    }
    four = groups[frozenset({"small", "original", "recompressed", "brighter"})]
    assert four["keep"] == family["original"] and [i["keep"] for i in four["images"]] == [True, False, False, False]

    assert cli.main(["duplicates", "--threshold", str(NEAR), "--limit", "1"]) == 0
    table = capsys.readouterr().out
    assert "similarity ≥ 0.995" in table and "1 group (the first 1), " in table
    assert table.count("keep") == 1
    assert len(re.findall(r"\bduplicate\b", table)) == len(out["groups"][0]["images"]) - 1

    assert cli.main(["duplicates", "--threshold", "0.0000001"]) == 0
    assert "no near-duplicates" in capsys.readouterr().out

    assert cli.main(["duplicates", "--min-similarity", "2"]) == 1
    assert "between -1 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_api_route(gallery):
    """GET /api/admin/duplicates on the running app (its gallery is shared with other tests)."""
    tag = uuid.uuid4().hex[:8]
    base = picture(uuid.uuid4().int % 2**32, (160, 120))
    original = gallery.add_image(encode(base, "PNG"), "api-original.png", f"API original {tag}").image_id
    copy = gallery.add_image(encode(base.resize((120, 90)), "JPEG", quality=90), "c.jpg", f"API copy {tag}").image_id
    headers = {"Authorization": f"Bearer {gallery.api_token(gallery.create_admin(f'dup-api-{tag}'))}"}
    with httpx.Client(base_url=gallery.base_url, timeout=60) as client:
        assert client.get("/api/admin/duplicates").status_code == 401
        assert client.get("/api/admin/duplicates", params={"max_distance": 2}, headers=headers).status_code == 422
        # NEAR, as everywhere here: a tighter 0.001 failed once in a few hundred random pictures
        # (the int8 image tower's copies reach 0.00101; unrelated pictures start at 0.0087).
        response = client.get("/api/admin/duplicates", params={"max_distance": NEAR}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["max_distance"] == NEAR and body["min_similarity"] == pytest.approx(1 - NEAR)
    (group,) = [g for g in body["groups"] if original in {i["id"] for i in g["images"]}]
    assert [(i["id"], i["keep"]) for i in group["images"]] == [(original, True), (copy, False)]
    assert group["keep"] == original and group["similarity"] >= 1 - NEAR
    assert group["images"][1]["page_url"] == f"/image/{copy}"
    assert group["images"][1]["thumbnail_url"].startswith("/files/")
