"""Model identity: vectors record their model, a different model is refused until re-embedded."""

import json
import time

import numpy as np
import pytest
from sqlalchemy import text

from clipgallery.embedding import Embedder, ModelUnavailableError, TowerPasses, create_random_model_dir
from clipgallery.gallery import ModelMismatchError, gallery_status
from clipgallery.ingest import ingest_image, reembed_images
from clipgallery.search import search_image_bytes, search_text
from tests.conftest import TINY_MODEL_CFG, jpeg, picture


def test_vectors_are_unit_length_float32_and_deterministic(embedder):
    from tests.conftest import picture

    images = [picture(1), picture(2)]
    first = embedder.encode_images(images)
    again = embedder.encode_images(images[::-1])[::-1]
    assert first.dtype == np.float32 and first.shape == (2, 64)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.allclose(first, again, atol=1e-5)  # batch order does not matter
    text_vector = embedder.encode_text("a photo of a dog")
    assert text_vector.shape == (64,) and abs(float(np.linalg.norm(text_vector)) - 1) < 1e-5
    assert embedder.encode_text("a photo of a dog") is text_vector  # cached


def test_submit_text_encodes_in_the_background_only_when_the_text_tower_is_free(embedder):
    """A new query's Future is computed by a worker thread (the caller meanwhile sends its SQL); a
    cached query, or any while the tower is busy, is already done when submit_text returns."""
    import threading

    expected = embedder.encode_texts(["a yellow submarine"])[0]
    embedder._text_cache.clear()
    future = embedder.submit_text("  a yellow submarine ")
    assert np.allclose(future.result(timeout=30), expected, atol=1e-6)
    cached = embedder.submit_text("a yellow submarine")
    assert cached.done() and cached.result() is future.result()

    embedder._text_cache.clear()
    results: list = []
    with embedder._tower_passes["text"].alone():
        waiting = threading.Thread(target=lambda: results.append(embedder.submit_text("a red balloon")))
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive()  # submit_text itself waits for the tower: nothing queued in the background
    waiting.join(timeout=30)
    assert results[0].done() and results[0].result().shape == expected.shape


def test_query_passes_run_side_by_side_up_to_capacity_and_a_batch_pass_runs_alone():
    """TowerPasses: one query pass per core at once; a batch pass waits until none runs. Between
    the two kinds the first to wait goes first: a query waiting before the batch goes before it (so
    back-to-back indexing batches cannot hold image queries back), and a query arriving after the
    batch waits for it (so overlapping queries cannot starve the batch)."""
    import threading

    passes = TowerPasses(capacity=2)
    inside: list[str] = []
    finish_queries = threading.Event()

    def query(name: str, hold: threading.Event | None = None) -> None:
        with passes.beside_others():
            inside.append(name)
            if hold is not None:
                hold.wait(30)

    def batch() -> None:
        with passes.alone():
            inside.append("batch")

    def waiting(count: int) -> None:
        _wait_until(lambda: len(passes._waiting["query"]) + len(passes._waiting["alone"]) == count)

    first, second = (threading.Thread(target=query, args=(n, finish_queries)) for n in ("first", "second"))
    first.start()
    second.start()
    _wait_until(lambda: len(inside) == 2)
    assert sorted(inside) == ["first", "second"] and not passes.has_room()
    later = [
        threading.Thread(target=query, args=("third",)),
        threading.Thread(target=batch),
        threading.Thread(target=query, args=("fourth",)),
    ]
    for count, thread in enumerate(later, start=1):
        thread.start()
        waiting(count)  # each waits before the next arrives
    assert len(inside) == 2
    finish_queries.set()
    for thread in (first, second, *later):
        thread.join(30)
    assert inside[2:] == ["third", "batch", "fourth"] and passes.has_room()


def _wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_text_queries_are_encoded_side_by_side_one_per_core_with_the_same_vectors(embedder, monkeypatch):
    """Two new text queries at once on two cores each get a single-threaded pass of their own, at
    the same time, and their vectors are exactly those each gets alone; a batch of texts (all the
    threads) waits until no query pass runs."""
    import threading

    two_cores = embedder.sharing_model(torch_threads=2, query_threads=1)
    queries = ["a red balloon over a field", "a grey cat"]
    alone = {q: two_cores.encode_texts([q])[0] for q in queries}
    both_inside = threading.Barrier(2, timeout=30)  # broken if the passes ran one after the other
    original = two_cores._text_tower

    def tower(tokens):
        if len(tokens) == 1:
            both_inside.wait()
        return original(tokens)

    monkeypatch.setattr(two_cores, "_text_tower", tower)
    vectors: dict[str, np.ndarray] = {}
    workers = [threading.Thread(target=lambda q=q: vectors.__setitem__(q, two_cores.encode_text(q))) for q in queries]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not both_inside.broken
    assert all(np.array_equal(vectors[q], alone[q]) for q in queries)

    batch: list[np.ndarray] = []
    with two_cores._tower_passes["text"].beside_others():
        worker = threading.Thread(target=lambda: batch.append(two_cores.encode_texts(queries)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not batch  # the batch pass waits for the query pass
    worker.join(30)
    assert batch and batch[0].shape == (2, 64)


# An image searched for alone against its vector stored from a batch: not exactly 0 where the image
# tower is int8 (the default on CPUs without AMX), which quantises a pass's activations with one
# scale for the whole pass (measured 4e-5 here).
SAME_IMAGE_DISTANCE = 2e-4


def test_an_image_batch_runs_as_one_single_threaded_pass_per_core(settings, monkeypatch):
    """With 2 torch threads a batch of 16 runs as two 1-thread passes of 8 side by side (no barrier
    after every operation), and gives the vectors one pass over the whole batch gives."""
    import torch

    embedder = Embedder(settings.with_overrides(torch_threads=2))
    pixels = torch.stack([embedder.preprocess(picture(seed)) for seed in range(16)])
    one_pass = embedder._image_pass
    passes = []

    def recording(batch):
        passes.append((len(batch), torch.get_num_threads()))
        return one_pass(batch)

    monkeypatch.setattr(embedder, "_image_pass", recording)
    split = embedder.encode_preprocessed(pixels)
    assert passes == [(8, 1), (8, 1)]
    with torch.inference_mode():
        whole = one_pass(pixels)
    # Dynamic int8 quantises a pass's activations with one scale for the whole pass, so an image's
    # vector moves slightly with its batch-mates (cosine 0.9998 here); other precisions do not.
    closeness = 0.999 if embedder.precisions[0] == "int8" else 0.9999
    assert split.shape == whole.shape and np.min(np.sum(split * whole, axis=1)) >= closeness
    passes.clear()
    embedder.encode_preprocessed(pixels[:12])  # too few images for two parts of 8
    assert passes == [(12, 2)]


def test_the_image_tower_is_prepared_on_first_use_and_once(settings, monkeypatch):
    """Converting and tracing the image tower is most of a model load: a process that only encodes
    words (a CLI word search) never pays for it; the first image pass does, once, however many
    threads ask at the same time."""
    import threading

    import clipgallery.embedding as embedding

    prepared = []
    real_trace = embedding.trace_image_tower

    def counting_trace(visual):
        prepared.append(threading.get_ident())
        time.sleep(0.2)  # let the other threads arrive while it is being prepared
        return real_trace(visual)

    monkeypatch.setattr(embedding, "trace_image_tower", counting_trace)
    fresh = Embedder(settings)
    fresh.encode_text("a dog on a beach")
    assert fresh.loaded and fresh._image_tower is None and prepared == []

    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda s=s: results.append(fresh.encode_images([picture(s)]))) for s in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(prepared) == 1 and len(results) == 3 and fresh._image_tower is not None
    assert fresh.precisions[0] in ("fp32", "int8", "bf16")
    # The same vectors as a model whose image tower was prepared up front.
    assert np.allclose(fresh.encode_images([picture(0)]), Embedder(settings).encode_images([picture(0)]), atol=1e-5)


def test_a_text_query_does_not_wait_for_the_image_tower(embedder, monkeypatch):
    """Each tower has its own lock: a text query is not queued behind an image query or an
    indexing batch in the same process. And a query runs on CLIPGALLERY_QUERY_THREADS threads
    whatever the calling thread's own torch setting (it is per thread)."""
    import threading

    import torch

    embedder.load()
    threads_in_pass = []
    original = embedder._text_tower

    def recording(tokens):
        threads_in_pass.append(torch.get_num_threads())
        return original(tokens)

    monkeypatch.setattr(embedder, "_text_tower", recording)
    done = threading.Event()

    def query() -> None:
        torch.set_num_threads(2)  # a server thread's own setting
        embedder.encode_texts(["a query while the image tower is busy"])
        done.set()

    with embedder._tower_passes["image"].alone():  # as if an image pass were running
        worker = threading.Thread(target=query)
        worker.start()
        assert done.wait(30), "the text query waited for the image tower"
    worker.join()
    assert threads_in_pass == [embedder.settings.query_threads] == [1]
    with embedder._tower_passes["text"].alone():
        assert embedder.encode_images([picture(7)]).shape == (1, 64)


def test_identity_records_architecture_and_checkpoint_hash(embedder, tiny_model_dir):
    identity = embedder.identity
    assert identity.architecture == "tiny-vit"
    assert identity.weights.startswith("sha256:") and len(identity.weights) == 7 + 64
    assert identity.dimension == 64


def test_checkpoint_file_with_a_named_architecture_loads(tmp_path, settings):
    """The path real users take with downloaded weights: CLIPGALLERY_PRETRAINED=/path/file."""
    import open_clip
    import torch

    model = open_clip.create_model("RN50", pretrained=None)
    checkpoint = tmp_path / "rn50.pt"
    torch.save(model.state_dict(), checkpoint)
    embedder = Embedder(settings.with_overrides(model_name="RN50", pretrained=str(checkpoint)))
    embedder.load()
    assert embedder.identity.architecture == "RN50" and embedder.identity.dimension == 1024


def test_missing_model_gives_a_clear_message_and_the_status_still_answers(settings, tmp_path):
    broken = settings.with_overrides(model_name=str(tmp_path / "no-such-model"))
    embedder = Embedder(broken)
    with pytest.raises(ModelUnavailableError, match="clipgallery model create"):
        embedder.load()
    ok, detail = embedder.status()
    assert not ok and "not a model directory" in detail
    weights_missing = tmp_path / "empty-model"
    weights_missing.mkdir()
    (weights_missing / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}))
    with pytest.raises(ModelUnavailableError, match="holds no weights"):
        Embedder(settings.with_overrides(model_name=str(weights_missing))).load()
    status = gallery_status(broken, load_model=True)
    assert status.database_ok and not status.model_ok and status.image_count == 0


def test_a_loaded_model_holds_its_checkpoint_exactly(settings, tiny_model_dir, tmp_path):
    """Models are built without their random initialisation (`weights_loaded_after`): every
    weight and buffer must then come from the file, for a model directory and a checkpoint path
    alike, and the initialisation works again afterwards (`clipgallery model create` needs it)."""
    import open_clip
    import torch
    from safetensors.torch import load_file

    from clipgallery.embedding import _find_weights

    stored = load_file(str(_find_weights(tiny_model_dir)))
    fp32 = dict(precision="fp32", text_precision="fp32", trace_text_tower=False, trace_image_tower=False)
    embedder = Embedder(settings.with_overrides(**fp32))
    embedder.load()
    state = embedder._model.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[name], tensor) for name, tensor in stored.items())

    checkpoint = tmp_path / "rn50.pt"
    model = open_clip.create_model("RN50", pretrained=None)
    torch.save(model.state_dict(), checkpoint)
    loaded = Embedder(settings.with_overrides(model_name="RN50", pretrained=str(checkpoint), **fp32))
    loaded.load()
    assert all(torch.equal(loaded._model.state_dict()[name], tensor) for name, tensor in model.state_dict().items())

    again = torch.nn.Linear(4, 4)
    assert again.weight.abs().sum() > 0 and torch.nn.init.normal_(torch.zeros(100)).abs().sum() > 0


def test_an_unreachable_model_hub_is_known_at_once(settings, tmp_path, monkeypatch):
    """Offline, huggingface_hub retries each request five times with back-off (≈ 1 minute for one
    model, and as long for weights it has cached): the hub is asked once, and when it does not
    answer the weights are looked up in the local cache alone."""
    import huggingface_hub.utils._http as hub_http
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # no weights cached
    waits: list[float] = []
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)  # where a retry would wait
    embedder = Embedder(settings.with_overrides(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ModelUnavailableError, match=r"not in the local cache, and the model hub cannot be reached"):
        embedder.load()
    assert waits == []
    assert constants.HF_HUB_OFFLINE is False  # offline for the lookup only


def test_another_model_is_refused_until_reembed(settings, session, embedder, storage, other_model_dir, monkeypatch):
    from clipgallery import db
    from clipgallery.models import HNSW_INDEX_NAME

    index_oid = "SELECT to_regclass(:name)::oid"
    monkeypatch.setattr(db, "DEFERRED_INDEX_MIN_VECTORS", 2)  # re-embedding the whole gallery
    for seed in range(5):
        ingest_image(session, embedder, storage, jpeg(seed), f"{seed}.jpg")
    other = Embedder(settings.with_overrides(model_name=str(other_model_dir)))
    other.load()
    with pytest.raises(ModelMismatchError, match="clipgallery reembed"):
        search_text(session, other, "anything")
    with pytest.raises(ModelMismatchError, match="clipgallery reembed"):
        ingest_image(session, other, storage, jpeg(99), "new.jpg")
    assert "clipgallery reembed" in gallery_status(other.settings, load_model=True).model_detail

    index_before = session.execute(text(index_oid), {"name": HNSW_INDEX_NAME}).scalar()
    progress, index_at_build_start = [], []
    assert (
        reembed_images(
            session,
            other,
            storage,
            progress=False,
            on_progress=lambda done, total: progress.append((done, total)),
            on_index_build=lambda: index_at_build_start.append(
                session.execute(text(index_oid), {"name": HNSW_INDEX_NAME}).scalar()
            ),
        )
        == 5
    )
    # The build is announced once, after the last batch, while the index is still missing.
    assert progress[-1] == (5, 5) and index_at_build_start == [None]
    models = session.execute(text("SELECT DISTINCT model_id FROM image_embeddings")).scalars().all()
    assert len(models) == 1
    # Built anew once the vectors were replaced (not grown by five updates with dead entries).
    assert session.execute(text(index_oid), {"name": HNSW_INDEX_NAME}).scalar() not in (None, index_before)
    page = search_image_bytes(session, other, jpeg(3), k=1)
    assert page.hits[0].distance == pytest.approx(0, abs=SAME_IMAGE_DISTANCE)
    with pytest.raises(ModelMismatchError):
        search_text(session, embedder, "the old model is now the foreign one")


def test_reembed_to_another_dimension_rebuilds_the_column_and_index(settings, session, embedder, storage, tmp_path):
    for seed in range(3):
        ingest_image(session, embedder, storage, jpeg(seed), f"{seed}.jpg")
    cfg = {**TINY_MODEL_CFG, "embed_dim": 32}
    wide = create_random_model_dir(tmp_path / "d32", "tiny-vit-32", cfg, seed=3)
    other = Embedder(settings.with_overrides(model_name=str(wide)))
    with pytest.raises(ModelMismatchError, match="64-d vectors"):
        search_text(session, other, "x")
    assert reembed_images(session, other, storage, progress=False) == 3
    column = session.execute(
        text(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'image_embeddings'::regclass AND attname = 'embedding'"
        )
    ).scalar_one()
    assert column == "vector(32)"
    assert search_image_bytes(session, other, jpeg(1), k=1).hits[0].distance == pytest.approx(
        0, abs=SAME_IMAGE_DISTANCE
    )


@pytest.mark.parametrize("architecture", ["tiny", "ViT-B-32"])
def test_text_tower_stopped_at_the_end_token_gives_the_same_vectors(architecture, tiny_model_dir):
    """The shortcut in encode_text_to_end_token is exact, not an approximation; and so is its
    TorchScript trace (what queries run), at other lengths and batch sizes than it was traced with."""
    import open_clip
    import torch

    from clipgallery.towers import encode_text_to_end_token, trace_text_tower, trim_text_padding

    if architecture == "tiny":
        model = open_clip.create_model(f"local-dir:{tiny_model_dir}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")
    else:
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
    model.eval()
    queries = ["dog", "a photo of a red sports car on a rainy street at night", "", "x " * 100, "sneakers"]
    tokens = tokenizer(queries)
    with torch.inference_mode():
        full = model.encode_text(tokens)
        short = encode_text_to_end_token(model, tokens)
        one_by_one = torch.cat([encode_text_to_end_token(model, tokenizer([q])) for q in queries])
        traced = trace_text_tower(model, tokenizer)
        assert isinstance(traced, torch.jit.ScriptModule)
        traced_batch = traced(trim_text_padding(model, tokens))
        traced_one_by_one = torch.cat([traced(trim_text_padding(model, tokenizer([q]))) for q in queries])
    assert torch.allclose(full, short, atol=1e-5, rtol=1e-4)
    assert torch.allclose(full, one_by_one, atol=1e-5, rtol=1e-4)
    assert torch.allclose(full, traced_batch, atol=1e-5, rtol=1e-4)
    assert torch.allclose(full, traced_one_by_one, atol=1e-5, rtol=1e-4)


def test_an_empty_gallery_adopts_the_models_dimension(settings, session, storage, tmp_path):
    cfg = {**TINY_MODEL_CFG, "embed_dim": 48}
    other = Embedder(settings.with_overrides(model_name=str(create_random_model_dir(tmp_path / "d48", "t48", cfg))))
    outcome = ingest_image(session, other, storage, jpeg(5), "x.jpg")
    assert outcome.status == "added"
    assert search_image_bytes(session, other, jpeg(5), k=1).hits[0].id == outcome.image_id


def test_migrations_do_not_need_a_model(empty_settings, tmp_path):
    from clipgallery import db

    no_model = empty_settings.with_overrides(model_name=str(tmp_path / "not-there"))
    db.migrate(no_model)
    assert db.current_revision(no_model) is not None


def test_concurrent_image_queries_share_one_forward_pass(embedder, monkeypatch):
    """Image queries that arrive while the image tower is busy are embedded together, each gets
    its own vector back, and an error in the shared pass reaches every query in it."""
    import threading

    images = [picture(seed) for seed in range(6)]
    alone = np.concatenate([embedder.encode_images([image]) for image in images])
    passes = []
    original = embedder._image_pass

    def counting(batch):
        passes.append(len(batch))
        return original(batch)

    monkeypatch.setattr(embedder, "_image_pass", counting)
    entered = []  # query passes entered: a query taken by a pass beside its own waits, it does not retry
    original_forward_pass = embedder._forward_pass

    def counting_forward_pass(tower: str, batch_size: int):
        entered.append(tower)
        return original_forward_pass(tower, batch_size)

    monkeypatch.setattr(embedder, "_forward_pass", counting_forward_pass)
    results: dict[int, np.ndarray] = {}

    def query(i: int) -> None:
        results[i] = embedder.encode_images([images[i]])[0]

    queries = [threading.Thread(target=query, args=(i,)) for i in range(len(images))]
    _queue_up_while_the_image_tower_is_busy(embedder, queries)
    assert passes == [len(images)] and len(entered) <= len(images)
    together = np.stack([results[i] for i in range(len(images))])
    assert np.min(np.sum(together * alone, axis=1)) >= 0.999

    def failing(batch):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(embedder, "_image_pass", failing)
    errors = []

    def failing_query() -> None:
        try:
            embedder.encode_images([images[0]])
        except RuntimeError as exc:
            errors.append(str(exc))

    _queue_up_while_the_image_tower_is_busy(embedder, [threading.Thread(target=failing_query) for _ in range(3)])
    assert errors == ["out of memory"] * 3 and embedder._query_queue == []


def test_image_queries_run_side_by_side_one_pass_per_core(embedder, monkeypatch):
    """A query pass runs on one thread, so on two cores a second image query gets a pass of its own
    at the same time instead of waiting for the first; each vector is the one it gets alone."""
    import threading

    two_cores = embedder.sharing_model(torch_threads=2, query_threads=1)
    images = [picture(11), picture(12)]
    alone = [two_cores.encode_images([image])[0] for image in images]
    first_inside = threading.Event()
    both_inside = threading.Barrier(2, timeout=10)  # broken if the second pass waited for the first
    original = two_cores._image_pass

    def image_pass(batch):
        first_inside.set()
        both_inside.wait()
        return original(batch)

    monkeypatch.setattr(two_cores, "_image_pass", image_pass)
    results: dict[int, np.ndarray] = {}
    workers = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, two_cores.encode_images([images[i]])[0]))
        for i in range(2)
    ]
    workers[0].start()
    assert first_inside.wait(30)  # the first query is in its pass before the second arrives
    workers[1].start()
    for worker in workers:
        worker.join(30)
    assert not both_inside.broken
    assert all(np.array_equal(results[i], alone[i]) for i in range(2))


def _queue_up_while_the_image_tower_is_busy(embedder, workers) -> None:
    """Start `workers` (each one image query) while a pass holds the image tower, let go once all
    of them wait in the queue, and wait for them to finish."""
    with embedder._tower_passes["image"].alone():
        for worker in workers:
            worker.start()
        _wait_until(lambda: len(embedder._query_queue) == len(workers))
    for worker in workers:
        worker.join(30)
