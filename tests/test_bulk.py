import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from clipgallery import db
from clipgallery.bulk import IndexingError, MetadataMapping, index_folder
from clipgallery.gallery import known_file_paths
from clipgallery.models import HNSW_INDEX_NAME, hnsw_index_statements
from tests.conftest import files_on_disk, jpeg


def _make_folder(root, count, start=0):
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for n in range(start, start + count):
        target = root / "sub" if n % 3 == 0 else root
        (target / f"photo_{n:03d}.jpg").write_bytes(jpeg(500 + n))


def _count(session, table):
    return session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def _vector_index(session) -> tuple[int, str] | None:
    """(oid, definition) of the HNSW index, None when there is none."""
    session.rollback()
    row = session.execute(
        text("SELECT c.oid, pg_get_indexdef(c.oid) FROM pg_class c WHERE c.relname = :name"),
        {"name": HNSW_INDEX_NAME},
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def _index_present_at_each_store(monkeypatch, session) -> list[bool]:
    import clipgallery.bulk as bulk

    seen = []
    real_store = bulk.store_prepared

    def watching_store(session_, *args, **kwargs):
        seen.append(_vector_index(session) is not None)
        return real_store(session_, *args, **kwargs)

    monkeypatch.setattr(bulk, "store_prepared", watching_store)
    return seen


def test_index_then_rerun_skips_everything(tmp_path, session, embedder, storage):
    _make_folder(tmp_path / "pics", 12)
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")

    first = index_folder(session, embedder, storage, tmp_path / "pics", recursive=True, progress=False)
    assert (first.indexed, first.skipped, len(first.rejected)) == (12, 0, 1)
    assert first.rejected[0][0].endswith("broken.jpg") and "Not a supported image" in first.rejected[0][1]
    assert _count(session, "images") == 12 and _count(session, "image_embeddings") == 12

    second = index_folder(session, embedder, storage, tmp_path / "pics", recursive=True, progress=False)
    assert (second.indexed, second.updated, second.skipped) == (0, 0, 12)


def test_the_model_load_is_timed_apart_from_the_run(tmp_path, settings, session, storage):
    """A first run in a new process loads the model: counted in the run's time, 100 images
    embedded at 20 images/s were reported at 4. A run with nothing new leaves the image tower unloaded."""
    from clipgallery.embedding import Embedder

    _make_folder(tmp_path / "pics", 3)
    fresh = Embedder(settings)
    first = index_folder(session, fresh, storage, tmp_path / "pics", recursive=True, progress=False)
    assert first.indexed == 3 and first.model_load_seconds > 0 and first.seconds > 0
    assert f"loading the model took {first.model_load_seconds:.1f} s" in "\n".join(first.lines())

    another = Embedder(settings)
    again = index_folder(session, another, storage, tmp_path / "pics", recursive=True, progress=False)
    assert again.skipped == 3 and another._image_tower is None


def test_an_images_files_are_where_index_found_it_or_the_gallerys_copy(tmp_path, session, embedder, storage):
    from clipgallery.gallery import image_files
    from clipgallery.ingest import ingest_image

    _make_folder(tmp_path / "pics", 1)
    (tmp_path / "pics" / "copy.jpg").write_bytes(jpeg(500))  # the same picture twice
    index_folder(session, embedder, storage, tmp_path / "pics", recursive=True, progress=False)
    indexed_id = session.execute(text("SELECT image_id FROM indexed_files LIMIT 1")).scalar_one()
    uploaded = ingest_image(session, embedder, storage, jpeg(900), "upload.jpg")
    stored_path = session.execute(text("SELECT stored_path FROM images WHERE id = :i"), {"i": uploaded.image_id})

    files = image_files(session, storage, [indexed_id, uploaded.image_id, 10**6])
    found_at = [str(tmp_path / "pics" / "copy.jpg"), str(tmp_path / "pics" / "sub" / "photo_000.jpg")]
    assert files[indexed_id][:2] == found_at
    assert len(files[indexed_id]) == 3 and os.path.isfile(files[indexed_id][2])  # then the gallery's copy
    assert files[uploaded.image_id] == [str(storage.path(stored_path.scalar_one()))]
    assert 10**6 not in files  # no such image (deleted since a search, say)


def test_non_recursive_index_takes_only_the_top_folder(tmp_path, session, embedder, storage):
    _make_folder(tmp_path / "pics", 9)
    summary = index_folder(session, embedder, storage, tmp_path / "pics", recursive=False, progress=False)
    assert summary.indexed == 6  # 3 of the 9 live in sub/


def test_renamed_changed_and_vanished_files(tmp_path, session, embedder, storage):
    root = tmp_path / "pics"
    _make_folder(root, 6)
    index_folder(session, embedder, storage, root, recursive=True, progress=False)
    vectors_before = _count(session, "image_embeddings")

    (root / "photo_001.jpg").rename(root / "renamed.jpg")  # same bytes, new name: reuse
    (root / "photo_002.jpg").write_bytes(jpeg(9999))  # new content under an old name: update
    os.utime(root / "photo_002.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    (root / "photo_004.jpg").unlink()  # vanished

    summary = index_folder(session, embedder, storage, root, recursive=True, progress=False)
    assert (summary.reused, summary.updated, summary.indexed) == (1, 1, 0)
    assert sorted(os.path.basename(p) for p in summary.missing) == ["photo_001.jpg", "photo_004.jpg"]
    assert summary.pruned == 0
    # The replaced version of photo_002 is gone; the renamed file kept its image and vector.
    assert _count(session, "images") == vectors_before
    assert any("--prune" in line for line in summary.lines())

    pruned = index_folder(session, embedder, storage, root, recursive=True, prune=True, progress=False)
    assert pruned.pruned == 2
    assert _count(session, "images") == 5  # photo_004 removed; renamed.jpg still holds photo_001's image
    assert _count(session, "indexed_files") == 5
    assert files_on_disk(storage) == known_file_paths(session)
    again = index_folder(session, embedder, storage, root, recursive=True, progress=False)
    assert (again.skipped, again.missing) == (5, [])


def test_files_a_killed_writer_left_are_swept_by_the_next_run_and_young_ones_spared(
    tmp_path, session, embedder, storage
):
    root = tmp_path / "photos"
    _make_folder(root, 2)
    index_folder(session, embedder, storage, root, progress=False)
    kept = sorted(known_file_paths(session))[0]  # a file a row refers to

    # A writer killed inside `pending`: its record stays, naming files written without a row.
    named = [kept, "originals/aa/bb/lost.jpg", "thumbs/aa/bb/lost.jpg", "thumbs/never/written.jpg", "../../outside"]
    stale = storage.pending(named)
    stale.__enter__()
    storage.write("originals/aa/bb/lost.jpg", b"x")
    storage.write("thumbs/aa/bb/lost.jpg", b"y")
    (old_record,) = (storage.root / ".pending").glob("*.json")
    an_hour_ago = time.time() - 3600
    os.utime(old_record, (an_hour_ago, an_hour_ago))
    # Another process's record, still being worked on.
    young = storage.pending(["originals/cc/dd/busy.jpg"])
    young.__enter__()
    storage.write("originals/cc/dd/busy.jpg", b"z")

    summary = index_folder(session, embedder, storage, root, progress=False)
    assert summary.orphans_removed == 2
    assert not old_record.exists() and len(list((storage.root / ".pending").glob("*.json"))) == 1
    assert files_on_disk(storage) == known_file_paths(session) | {"originals/cc/dd/busy.jpg"}
    assert kept in files_on_disk(storage)
    young.__exit__(None, None, None)
    assert list((storage.root / ".pending").glob("*.json")) == []


def test_storing_and_deleting_leave_no_record_behind(tmp_path, session, embedder, storage):
    from clipgallery.gallery import delete_images

    root = tmp_path / "photos"
    _make_folder(root, 3)
    index_folder(session, embedder, storage, root, progress=False)
    ids = session.execute(text("SELECT id FROM images")).scalars().all()
    assert delete_images(session, storage, ids[:1]) == 1
    assert files_on_disk(storage) == known_file_paths(session)
    assert list((storage.root / ".pending").glob("*.json")) == []


def test_metadata_csv_gives_names_and_descriptions(tmp_path, session, embedder, storage):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "10001.jpg").write_bytes(jpeg(1))
    (root / "10002.jpg").write_bytes(jpeg(2))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(
        "id,filename,articleType,baseColour,productDisplayName\n"
        "10001,10001.jpg,Watches,Black,Titan Men Black Watch\n"
        '10002,10002.jpg,Sandals,Brown,"Clarks Women Brown Sandals, size 5"\n'
    )
    mapping = MetadataMapping(csv_file, "filename", "{productDisplayName}", "{baseColour} {articleType}")
    index_folder(session, embedder, storage, root, metadata=mapping, progress=False)
    rows = session.execute(text("SELECT name, description FROM images ORDER BY original_filename")).all()
    assert [tuple(r) for r in rows] == [
        ("Titan Men Black Watch", "Black Watches"),
        ("Clarks Women Brown Sandals, size 5", "Brown Sandals"),
    ]


@pytest.mark.parametrize(
    "mapping_args,words",
    [
        (("nope", None, None), "no file column named 'nope'"),
        (("filename", "{missing}", None), "unknown columns missing"),
        (("filename", "{a.__class__}", None), "plain column names"),
    ],
)
def test_bad_metadata_mapping_is_refused(mapping_args, words, tmp_path, session, embedder, storage):
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("filename,a\nx.jpg,1\n")
    (tmp_path / "x.jpg").write_bytes(jpeg(3))
    with pytest.raises(IndexingError, match=words):
        index_folder(session, embedder, storage, tmp_path, metadata=MetadataMapping(csv_file, *mapping_args))
    assert _count(session, "images") == 0


def test_a_killed_index_run_resumes_and_indexes_every_image_exactly_once(tmp_path, settings, session, storage):
    root = tmp_path / "many"
    root.mkdir()
    total = 240
    for n in range(total):
        (root / f"{n:04d}.jpg").write_bytes(jpeg(2000 + n, (64, 64)))
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "CLIPGALLERY_MODEL": settings.model_name,
        "CLIPGALLERY_UPLOAD_DIR": str(settings.upload_dir),
        "CLIPGALLERY_STATE_DIR": str(settings.state_dir),
        "CLIPGALLERY_TORCH_THREADS": "1",
        "CLIPGALLERY_VECTOR_INDEX_MIN_VECTORS": "0",  # indexed at any size, as the other tests' galleries
    }
    command = [sys.executable, "-m", "clipgallery.cli", "index", str(root), "--quiet", "--batch-size", "4"]
    process = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            session.rollback()
            if _count(session, "images") >= 12 or process.poll() is not None:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the indexer finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    session.rollback()
    done_before = _count(session, "images")
    assert 0 < done_before < total

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"indexed {total - done_before}," in rerun.stdout and f"skipped {done_before}," in rerun.stdout
    session.rollback()
    assert _count(session, "images") == total
    assert _count(session, "image_embeddings") == total
    assert _count(session, "indexed_files") == total
    duplicated = session.execute(
        text("SELECT count(*) FROM (SELECT image_id FROM indexed_files GROUP BY 1 HAVING count(*) > 1) d")
    ).scalar_one()
    assert duplicated == 0
    # Every file on disk belongs to a row (the killed batch's files were reused by the rerun).
    leftovers = {p for p in files_on_disk(storage) if "/.tmp-" not in p}
    assert leftovers == known_file_paths(session)
    # The killed run held the vector index back (240 images into an empty gallery): the rerun
    # built it again.
    assert _vector_index(session) is not None


@pytest.mark.parametrize(
    ("index_held_back", "expected"),
    [
        # A small run beside the index: one report per batch, the index in place throughout.
        (False, [(4, 10, 4, False, True), (8, 10, 8, False, True), (10, 10, 10, False, True)]),
        # A run that holds the index back: one more report when its build starts (at a million
        # vectors that takes many minutes: the admin page must not sit at 100 % in silence).
        (
            True,
            [
                (4, 10, 4, False, False),
                (8, 10, 8, False, False),
                (10, 10, 10, False, False),
                (10, 10, 10, True, False),
            ],
        ),
    ],
)
def test_progress_is_reported_per_batch_and_when_the_held_back_index_is_built(
    index_held_back, expected, tmp_path, session, embedder, storage, monkeypatch
):
    if index_held_back:
        monkeypatch.setattr(db, "DEFERRED_INDEX_MIN_VECTORS", 4)
    _make_folder(tmp_path / "pics", 10)
    seen = []
    summary = index_folder(
        session,
        embedder,
        storage,
        tmp_path / "pics",
        recursive=True,
        progress=False,
        batch_size=4,
        on_progress=lambda done, total, s: seen.append(
            (done, total, s.indexed, s.building_index, _vector_index(session) is not None)
        ),
    )
    assert seen == expected
    assert not summary.building_index
    assert (summary.index_build_seconds is not None) == index_held_back
    assert _vector_index(session) is not None


def test_a_batch_that_cannot_be_stored_stops_the_run_and_keeps_what_was_committed(
    tmp_path, session, embedder, storage, monkeypatch
):
    """The database refusing a batch ends the run with that error: batches committed before it
    stay (with their files), the failed one leaves no rows or files, and the batches queued
    behind it are dropped rather than decoded and embedded."""
    import clipgallery.bulk as bulk

    _make_folder(tmp_path / "pics", 40)
    embedded, stored = [], []
    real_embed, real_store = bulk.embed_prepared, bulk.store_prepared

    def counting_embed(embedder_, batch):
        embedded.append(len(batch))
        return real_embed(embedder_, batch)

    def failing_store(session_, embedder_, storage_, batch, **kwargs):
        if len(stored) == 2:
            raise RuntimeError("disk full")
        stored.append(len(batch))
        return real_store(session_, embedder_, storage_, batch, **kwargs)

    monkeypatch.setattr(bulk, "embed_prepared", counting_embed)
    monkeypatch.setattr(bulk, "store_prepared", failing_store)
    with pytest.raises(RuntimeError, match="disk full"):
        index_folder(session, embedder, storage, tmp_path / "pics", recursive=True, progress=False, batch_size=4)
    session.rollback()
    assert _count(session, "images") == _count(session, "indexed_files") == 8
    assert files_on_disk(storage) == known_file_paths(session)
    # The failed batch, the one embedded beside it, and at most the one being prepared then.
    assert 3 <= len(embedded) <= 5 < 10


def test_a_run_that_doubles_the_gallery_builds_the_vector_index_once_at_its_end(
    tmp_path, settings, session, embedder, storage, monkeypatch
):
    """Growing an HNSW graph row by row costs several times a build (docs/scaling.md): a run
    writing at least as many vectors as are stored (a quarter, in a small gallery) drops the index
    and builds it at its end; a smaller run keeps it. Searches work throughout."""
    from clipgallery.search import search_text

    monkeypatch.setattr(db, "DEFERRED_INDEX_MIN_VECTORS", 6)
    before = _vector_index(session)
    present = _index_present_at_each_store(monkeypatch, session)
    _make_folder(tmp_path / "first", 12)
    first = index_folder(session, embedder, storage, tmp_path / "first", progress=False, batch_size=4)
    assert first.indexed == 8 and present == [False, False]
    assert first.index_build_seconds is not None and any("vector index built" in line for line in first.lines())
    rebuilt = _vector_index(session)
    assert rebuilt is not None and rebuilt[0] != before[0]
    # The settings' definition (metric, m, ef_construction), as the migration makes it.
    assert rebuilt[1] == before[1] and f"m='{settings.hnsw_m}'" in rebuilt[1]
    assert hnsw_index_statements(settings)[0].split(" USING ")[1].split(" WITH ")[0] in rebuilt[1]
    assert len(search_text(session, embedder, "a photo").hits) == 8

    # 4 new images beside 8 stored: in a gallery small enough to search without the index, a run
    # writing a quarter of the stored vectors or more holds it back too ...
    monkeypatch.setattr(db, "DEFERRED_INDEX_MIN_VECTORS", 4)
    present.clear()
    _make_folder(tmp_path / "second", 6, start=100)
    second = index_folder(session, embedder, storage, tmp_path / "second", progress=False, batch_size=4)
    assert second.indexed == 4 and present == [False] and second.index_build_seconds is not None
    rebuilt = _vector_index(session)
    assert rebuilt is not None
    # ... but beside a larger gallery (here: more than 10 stored) the index stays and grows.
    monkeypatch.setattr(db, "SMALL_GALLERY_VECTORS", 10)
    present.clear()
    _make_folder(tmp_path / "third", 6, start=200)
    third = index_folder(session, embedder, storage, tmp_path / "third", progress=False, batch_size=4)
    assert third.indexed == 4 and present == [True]
    assert third.index_build_seconds is None and _vector_index(session) == rebuilt
    assert len(search_text(session, embedder, "a photo", k=50).hits) == 16


def test_an_index_build_asks_for_the_memory_its_graph_needs_and_a_parallel_worker():
    """A small build: not the gigabytes sized for a million vectors (a parallel build reserves all
    of it up front), never more than the server allows, and at least the 32 MB per participant
    below which PostgreSQL plans no worker."""
    mb, gb = 2**20, 2**30
    small = db.index_build_settings(1_024, 512, 48, 6 * gb, workers=1)
    assert small == {"maintenance_work_mem": f"{64 * mb // 1024}kB", "min_parallel_table_scan_size": "0"}
    graph = 40_000 * (4 * 512 + 32 * 48 + 200) * 1.5  # 227 MB
    assert db.index_build_settings(40_000, 512, 48, 6 * gb, workers=1)["maintenance_work_mem"] == (
        f"{int(graph) // 1024}kB"
    )
    # Builds of minutes keep the server's setting (and still get a worker).
    assert db.index_build_settings(100_000, 512, 48, 6 * gb, 1) == {
        "maintenance_work_mem": f"{6 * gb // 1024}kB",
        "min_parallel_table_scan_size": "0",
    }
    assert db.index_build_settings(10, 512, 16, 16 * mb, 2)["maintenance_work_mem"] == f"{16 * mb // 1024}kB"
    # A vector column without a dimension counts as HNSW's largest.
    assert db.index_build_settings(20_000, -1, 16, 6 * gb, 1) == db.index_build_settings(20_000, 2000, 16, 6 * gb, 1)
    assert db.index_build_settings(20_000, -1, 16, 6 * gb, 1) != db.index_build_settings(20_000, 512, 16, 6 * gb, 1)


def test_the_index_build_settings_hold_for_the_build_only(settings, session, embedder, storage):
    from clipgallery.ingest import ingest_image

    ingest_image(session, embedder, storage, jpeg(3), "three.jpg", "Three")
    session.commit()
    with db.get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:

        def show(name):
            return connection.execute(text(f"SHOW {name}")).scalar_one()

        def memory_bytes():
            return connection.execute(text("SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")).scalar()

        server_values = {name: show(name) for name in ("maintenance_work_mem", "min_parallel_table_scan_size")}
        configured, workers = memory_bytes(), int(show("max_parallel_maintenance_workers"))
        with db.sized_for_index_build(connection.connection.driver_connection, settings) as chosen:
            assert show("min_parallel_table_scan_size") == "0"
            # One vector: the floor that lets the server's workers take part, within its setting.
            assert memory_bytes() == min(configured, 32 * 2**20 * (workers + 1))
            dimension = embedder.identity.dimension
            assert chosen == db.index_build_settings(1, dimension, settings.hnsw_m, configured, workers)
        assert {name: show(name) for name in server_values} == server_values
        connection.execute(text(f"DROP INDEX {HNSW_INDEX_NAME}"))
        assert db.fit_vector_index(connection, settings)
        assert {name: show(name) for name in server_values} == server_values
    assert _vector_index(session) is not None


def test_a_gallery_below_the_threshold_has_no_vector_index_until_it_grows(
    tmp_path, settings, session, storage, monkeypatch
):
    """Under `vector_index_min_vectors` an exact scan is about as fast as the graph and finds every
    true neighbour: a bulk run into such a gallery builds no index (and drops the one a fresh
    gallery starts with); the upload or run that takes it to the threshold builds one; it is kept
    down to half the threshold, and a start-up in a gallery shrunk below that drops it."""
    from clipgallery.embedding import Embedder
    from clipgallery.gallery import delete_images
    from clipgallery.ingest import ingest_image
    from clipgallery.search import search_text

    small = settings.with_overrides(vector_index_min_vectors=8)
    embedder = Embedder(small)
    monkeypatch.setattr(db, "DEFERRED_INDEX_MIN_VECTORS", 4)
    assert _vector_index(session) is not None  # as the migration made it

    _make_folder(tmp_path / "first", 5)
    first = index_folder(session, embedder, storage, tmp_path / "first", recursive=True, progress=False, batch_size=4)
    assert first.indexed == 5 and first.index_build_seconds is None and _vector_index(session) is None
    page = search_text(session, embedder, "a photo")
    assert page.exact and len(page.hits) == 5
    assert db.describe_vector_index(session, small).startswith("none: fewer than 8 vectors")

    for n in range(3):  # uploads: the one that makes 8 vectors builds the index
        assert ingest_image(session, embedder, storage, jpeg(900 + n), f"upload_{n}.jpg").status == "added"
        assert (_vector_index(session) is not None) == (n == 2)
    assert not search_text(session, embedder, "a photo").exact
    assert db.describe_vector_index(session, small).startswith(
        f"HNSW (m {small.hnsw_m}, ef_construction {small.hnsw_ef_construction}), "
    )

    ids = session.execute(text("SELECT id FROM images ORDER BY id")).scalars().all()
    delete_images(session, storage, ids[:4])  # 4 left: half the threshold, kept
    db.migrate(small)
    assert _vector_index(session) is not None
    delete_images(session, storage, ids[4:5])  # 3 left: dropped at the next start
    db.migrate(small)
    assert _vector_index(session) is None and search_text(session, embedder, "a photo").exact

    _make_folder(tmp_path / "second", 3, start=100)  # 6: too few to hold an index back, none built
    second = index_folder(session, embedder, storage, tmp_path / "second", recursive=True, progress=False, batch_size=4)
    assert second.indexed == 3 and second.index_build_seconds is None and _vector_index(session) is None
    _make_folder(tmp_path / "third", 3, start=200)  # 9: past the threshold, built at the run's end
    third = index_folder(session, embedder, storage, tmp_path / "third", recursive=True, progress=False, batch_size=4)
    assert third.indexed == 3 and third.index_build_seconds is not None
    assert any("vector index built" in line for line in third.lines())
    assert _vector_index(session) is not None
    assert len(search_text(session, embedder, "a photo").hits) == 9


def test_a_failed_run_still_builds_the_vector_index_it_held_back(tmp_path, session, embedder, storage, monkeypatch):
    import clipgallery.bulk as bulk

    monkeypatch.setattr(db, "DEFERRED_INDEX_MIN_VECTORS", 4)
    real_store = bulk.store_prepared
    stored = []

    def failing_store(session_, *args, **kwargs):
        if stored:
            raise RuntimeError("disk full")
        stored.append(_vector_index(session))
        return real_store(session_, *args, **kwargs)

    monkeypatch.setattr(bulk, "store_prepared", failing_store)
    _make_folder(tmp_path / "pics", 12)
    with pytest.raises(RuntimeError, match="disk full"):
        index_folder(session, embedder, storage, tmp_path / "pics", recursive=True, progress=False, batch_size=4)
    assert stored == [None]  # held back while the run wrote
    assert _vector_index(session) is not None


def test_the_vector_index_is_built_by_the_last_run_holding_it_back_or_at_the_next_start(
    settings, session, embedder, storage
):
    """Runs holding the index back share an advisory lock: a start-up (`db.migrate`) meanwhile
    leaves the index to them, and builds it when a run died without doing so. Searches meanwhile
    scan every vector, and say so."""
    from clipgallery.ingest import ingest_image
    from clipgallery.search import search_text
    from tests.conftest import jpeg

    ingest_image(session, embedder, storage, jpeg(7), "seven.jpg", "Seven")
    assert not search_text(session, embedder, "seven").exact
    with db.deferred_vector_index(session, settings, incoming=500) as deferred:
        assert deferred and _vector_index(session) is None
        page = search_text(session, embedder, "seven")
        assert page.exact and page.hits[0].name == "Seven"
        db.migrate(settings)
        assert _vector_index(session) is None
    assert _vector_index(session) is not None

    with db.get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"DROP INDEX {HNSW_INDEX_NAME}"))  # what a run killed mid-way leaves
    db.migrate(settings)
    assert _vector_index(session) is not None


def test_a_long_transaction_on_the_vectors_keeps_the_index_in_place(settings, session):
    """Dropping the index waits for every transaction that read the table, and every new search
    would queue behind that wait: after DROP_INDEX_LOCK_TIMEOUT the run gives up and keeps it."""
    before = _vector_index(session)
    with db.session_scope(settings) as reader:
        reader.execute(text("SELECT count(*) FROM image_embeddings")).scalar_one()  # transaction left open
        started = time.monotonic()
        with db.deferred_vector_index(session, settings, incoming=500) as deferred:
            assert not deferred
        assert time.monotonic() - started < 10
        reader.rollback()
    assert _vector_index(session) == before


def test_a_role_that_may_write_rows_but_not_drop_indexes_keeps_the_index(settings, session):
    """A deployment whose migrations run as the tables' owner and the app as a plain writer: the
    run cannot drop the index, so it keeps it (and grows it row by row) instead of failing."""
    from sqlalchemy.engine import make_url

    role = f"gallery_writer_{os.getpid()}"
    session.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    session.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'))
    session.execute(text(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    session.commit()
    writer = settings.with_overrides(
        database_url=make_url(settings.database_url).set(username=role).render_as_string(False)
    )
    try:
        before = _vector_index(session)
        with (
            db.session_scope(writer) as writer_session,
            db.deferred_vector_index(writer_session, writer, incoming=500) as deferred,
        ):
            assert not deferred
        assert _vector_index(session) == before
    finally:
        db.dispose_engine(writer)
        session.rollback()
        session.execute(text(f'DROP OWNED BY "{role}"'))
        session.execute(text(f'DROP ROLE "{role}"'))
        session.commit()
