"""The open_clip model: loaded once per process, thread-safely; L2-normalised float32 vectors out.

A model is named in one of three ways (see README "Models"):
- an open_clip architecture and a pretrained tag, downloaded by open_clip on first use
  (CLIPGALLERY_MODEL=ViT-B-32, CLIPGALLERY_PRETRAINED=laion2b_s34b_b79k);
- an architecture and a local checkpoint file (CLIPGALLERY_PRETRAINED=/path/to/weights.pt);
- a model directory holding open_clip_config.json and the weights, as written by
  `clipgallery model create` and `clipgallery train` (CLIPGALLERY_MODEL=/path/to/dir).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipgallery.allocator import tune_for_tensors
from clipgallery.config import Settings, get_settings
from clipgallery.precision_checks import RememberedChecks
from clipgallery.towers import (
    first_line,
    fused_tensor_conversion,
    int8_if_faithful,
    int8_text_if_faithful,
    native_bf16,
    quantize_int8,
    resolve_precision,
    text_tower,
    to_bf16,
    trace_image_tower,
    trace_text_tower,
    trim_text_padding,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
TEXT_CACHE_SIZE = 4096
MIN_IMAGES_PER_PART = 8  # of a batch split over the cores (`Embedder._split_image_pass`)


class ModelUnavailableError(RuntimeError):
    """No model can be loaded; the message says why and how to provide one."""


@dataclass(frozen=True)
class ModelIdentity:
    """What made a vector: recorded beside every stored embedding."""

    architecture: str
    weights: str
    dimension: int

    def __str__(self) -> str:
        return f"{self.architecture} / {self.weights} ({self.dimension}-d)"


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from, resolved from the settings without loading anything."""

    architecture: str
    model_dir: Path | None
    checkpoint: Path | None
    pretrained_tag: str | None
    dimension: int

    @property
    def source(self) -> str:
        if self.model_dir:
            return f"model directory {self.model_dir}"
        if self.checkpoint:
            return f"{self.architecture} with checkpoint {self.checkpoint}"
        return f"{self.architecture} with pretrained weights '{self.pretrained_tag}'"


def _how_to_provide_a_model() -> str:
    return (
        "Provide a model in one of these ways: (1) with network access, a pretrained tag such as "
        "CLIPGALLERY_MODEL=ViT-B-32 CLIPGALLERY_PRETRAINED=laion2b_s34b_b79k (downloaded once from the model hub); "
        "(2) a local checkpoint file: CLIPGALLERY_PRETRAINED=/path/to/open_clip_weights.pt; "
        "(3) a model directory: CLIPGALLERY_MODEL=/path/to/dir, made by `clipgallery train` "
        "or, to try the app without any weights, `clipgallery model create models/demo` (random weights: "
        "the plumbing works, the results are meaningless)."
    )


def resolve_model_spec(settings: Settings) -> ModelSpec:
    """Work out architecture, weight source and vector dimension from the settings alone."""
    import open_clip

    name = settings.model_name
    if name.startswith("local-dir:"):
        name = name[len("local-dir:") :]
    candidate = Path(name).expanduser()
    if candidate.is_dir() or "/" in name or name.startswith("."):
        model_dir = candidate.resolve()
        config_path = model_dir / MODEL_CONFIG_FILE
        if not config_path.is_file():
            raise ModelUnavailableError(
                f"CLIPGALLERY_MODEL={settings.model_name} is not a model directory ({config_path} not found). "
                + _how_to_provide_a_model()
            )
        config = json.loads(config_path.read_text())
        architecture = config.get("clipgallery", {}).get("architecture") or model_dir.name
        return ModelSpec(architecture, model_dir, None, None, int(config["model_cfg"]["embed_dim"]))

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelUnavailableError(
            f"CLIPGALLERY_MODEL={name} is not an open_clip architecture (see open_clip.list_models()) "
            "nor a model directory."
        )
    pretrained = settings.pretrained
    as_path = Path(pretrained).expanduser()
    looks_like_path = "/" in pretrained or as_path.suffix in (".pt", ".pth", ".bin", ".safetensors")
    if looks_like_path:
        return ModelSpec(name, None, as_path.resolve(), None, int(model_cfg["embed_dim"]))
    return ModelSpec(name, None, None, pretrained, int(model_cfg["embed_dim"]))


def configured_dimension(settings: Settings | None = None) -> int:
    """Vector length of the configured model; used by the migration that creates the column."""
    return resolve_model_spec(settings or get_settings()).dimension


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256_in_background(path: Path) -> Future[str]:
    """`file_sha256(path)` on a thread of its own: the caller loads the model meanwhile. hashlib
    lets go of the GIL while it hashes, so on a second core the weights' digest (0.4 s for
    ViT-B/32's 605 MB here) no longer adds to the load."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-sha256")
    try:
        return executor.submit(file_sha256, path)
    finally:
        executor.shutdown(wait=False)


def _find_weights(model_dir: Path) -> Path | None:
    for pattern in (WEIGHTS_FILE, "*.safetensors", "*.bin", "*.pt", "*.pth"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found[0]
    return None


class TowerPasses:
    """Who runs a forward pass through one tower now. A pass that uses every torch thread (a
    batch) runs alone; single-threaded query passes run side by side, up to `capacity` (one per
    core). Between the two kinds the first to wait goes first: a waiting batch holds back query
    passes that come after it (a stream of overlapping queries would otherwise never leave the
    tower empty), and queries waiting before it go first (so back-to-back indexing batches do not
    hold image queries back for a whole bulk run).

    Side by side because a single-threaded query pass cannot use a second core, and two of them
    share the tower's weights without copying them: ViT-B-32 int8 text tower, 2 cores (AMD Zen 3),
    200 new queries one after another 10.3-11.6 ms each, two at a time 5.7-5.9 ms per query, the
    vectors bit for bit the same (docs/reliability.md); batching text queries into one pass instead
    would make a query's int8 vector depend on its companions (one activation scale per pass).
    Image queries waiting together do share a pass (`Embedder._encode_query_image`), and such
    passes run side by side too."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._running = 0  # slots taken: 1 per query pass, the whole capacity for a pass alone
        self._tickets = itertools.count()  # order of arrival
        self._waiting: dict[str, set[int]] = {"alone": set(), "query": set()}
        self._condition = threading.Condition()

    def resize(self, capacity: int) -> None:
        with self._condition:
            self.capacity = max(1, capacity)
            self._condition.notify_all()

    def has_room(self) -> bool:
        """Whether a query pass would start now (advisory: another thread may take the room first)."""
        return self._running < self.capacity and not self._waiting["alone"]

    def _first_waiting(self, kind: str, ticket: int) -> bool:
        """Whether no pass of the other kind has waited longer than `ticket`."""
        other = self._waiting["query" if kind == "alone" else "alone"]
        return not other or min(other) > ticket

    @contextmanager
    def _turn(self, kind: str, fits: Callable[[], bool], taken: Callable[[], int]) -> Iterator[None]:
        with self._condition:
            ticket = next(self._tickets)
            self._waiting[kind].add(ticket)
            try:
                self._condition.wait_for(lambda: fits() and self._first_waiting(kind, ticket))
            finally:
                self._waiting[kind].discard(ticket)
                self._condition.notify_all()  # the passes that waited behind this one may fit now
            slots = taken()
            self._running += slots
        try:
            yield
        finally:
            with self._condition:
                self._running -= slots
                self._condition.notify_all()

    def alone(self) -> contextlib.AbstractContextManager[None]:
        """A pass with the tower to itself."""
        return self._turn("alone", lambda: self._running == 0, lambda: self.capacity)

    def beside_others(self) -> contextlib.AbstractContextManager[None]:
        """A single-threaded query pass, beside other such passes."""
        return self._turn("query", lambda: self._running < self.capacity, lambda: 1)


class Embedder:
    """A loaded open_clip model. Use `get_embedder()` for the process-wide instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._load_lock = threading.Lock()
        # A batch's forward pass has its tower to itself: torch already uses every core for it, and
        # concurrent passes would only fight over them. Single-threaded query passes run side by
        # side, one per core (`TowerPasses`, sized at load); image queries waiting together share a
        # pass (`_encode_query_image`). The towers share no layers, so a text query (milliseconds)
        # need not wait behind an image query or an indexing batch.
        self._tower_passes = {"image": TowerPasses(), "text": TowerPasses()}
        self._image_tower_lock = threading.Lock()  # preparing it (`load_image_tower`)
        self._model = None
        self._image_tower = None  # model.visual, or its TorchScript trace (`trace_image_tower`)
        self._text_tower = None  # `text_tower(model)`, or its TorchScript trace (`trace_text_tower`)
        self._threads = 1
        self._preprocess = None
        self._tokenizer = None
        self._identity: ModelIdentity | None = None
        self._precisions = ("fp32", "fp32")  # (image tower, text tower) in force, once loaded
        self._int8_checks: RememberedChecks | None = None  # set at load
        self._error: ModelUnavailableError | None = None
        self._query_queue: list[tuple[torch.Tensor, Future]] = []
        self._query_queue_lock = threading.Lock()
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_lock = threading.Lock()
        # Threads start on first use.
        self._text_executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="clipgallery-text")
        self._pass_executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="clipgallery-pass")

    # -- loading ------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def error(self) -> ModelUnavailableError | None:
        return self._error

    def load(self, retry: bool = False) -> None:
        """Load the model once; a failure is remembered (and re-raised) unless `retry` is set."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            if self._error is not None and not retry:
                raise self._error
            try:
                self._load()
                self._error = None
            except ModelUnavailableError as exc:
                self._error = exc
                raise
            except Exception as exc:
                self._error = ModelUnavailableError(
                    f"The CLIP model could not be loaded: {exc}. " + _how_to_provide_a_model()
                )
                raise self._error from exc

    def _load(self) -> None:
        spec = resolve_model_spec(self.settings)
        # resolve_model_spec has checked that a model directory holds its config.
        config = json.loads((spec.model_dir / MODEL_CONFIG_FILE).read_text()) if spec.model_dir else None
        package_text_tower = bool(config and config.get("clipgallery", {}).get("text_tower_package"))
        with quiet_package_text_tower_loading() if package_text_tower else contextlib.nullcontext():
            self._load_spec(spec, config)

    def _load_spec(self, spec: ModelSpec, config: dict | None) -> None:
        """`config`: the model directory's open_clip config, if the model is one."""
        import open_clip
        import torch

        tune_for_tensors()
        threads = self.settings.torch_threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        self._threads = threads
        self._size_query_passes()
        log.info("loading CLIP model: %s", spec.source)
        if spec.model_dir is not None:
            weights = _find_weights(spec.model_dir)
            if weights is None:
                raise ModelUnavailableError(
                    f"Model directory {spec.model_dir} holds no weights file. " + _how_to_provide_a_model()
                )
            digest = file_sha256_in_background(weights)
            if config.get("clipgallery", {}).get("text_tower_package"):
                model, preprocess = _create_with_package_text_tower(spec.model_dir, config, weights)
            else:
                with weights_loaded_after():
                    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{spec.model_dir}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{spec.model_dir}")
            weights_id = "sha256:" + digest.result()
        elif spec.checkpoint is not None:
            if not spec.checkpoint.is_file():
                raise ModelUnavailableError(
                    f"Checkpoint file {spec.checkpoint} does not exist. " + _how_to_provide_a_model()
                )
            digest = file_sha256_in_background(spec.checkpoint)
            with weights_loaded_after():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.architecture, pretrained=str(spec.checkpoint)
                )
            tokenizer = open_clip.get_tokenizer(spec.architecture)
            weights_id = "sha256:" + digest.result()
        else:
            unreachable = unreachable_model_hub() if spec.pretrained_tag else None
            try:
                # open_clip logs a failed download before raising it; the error raised below says
                # it once, with what to do.
                with (
                    hub_offline() if unreachable else contextlib.nullcontext(),
                    weights_loaded_after(),
                    without_root_messages("Failed to download weights"),
                ):
                    model, _, preprocess = open_clip.create_model_and_transforms(
                        spec.architecture, pretrained=spec.pretrained_tag
                    )
            except Exception as exc:
                reason = first_line(exc)
                if unreachable:
                    reason = f"they are not in the local cache, and the model hub cannot be reached: {unreachable}"
                raise ModelUnavailableError(
                    f"No CLIP model is available: {spec.source} could not be loaded ({reason}). "
                    "Pretrained weights are downloaded from the model hub on first use, which needs network access. "
                    + _how_to_provide_a_model()
                ) from exc
            tokenizer = open_clip.get_tokenizer(spec.architecture)
            weights_id = spec.pretrained_tag or "random"
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._int8_checks = RememberedChecks.for_model(self.settings.state_dir, weights_id, spec.architecture, config)
        text_precision = resolve_precision(self.settings.text_precision, "text")
        if text_precision == "int8" and self.settings.text_precision == "auto":
            model, faithful = self._int8_if_faithful(
                "text", lambda known: int8_text_if_faithful(model, tokenizer, known)
            )
            if not faithful:
                text_precision = "bf16" if native_bf16() else "fp32"
        elif text_precision == "int8":
            model = quantize_int8(model, towers=("text",))
        if text_precision == "bf16":
            model = to_bf16(model, towers=("text",))
        dimension = int(getattr(model, "embed_dim", 0) or spec.dimension)
        self._preprocess = fused_tensor_conversion(preprocess)
        self._tokenizer = tokenizer
        self._identity = ModelIdentity(spec.architecture, weights_id, dimension)
        self._precisions = (self._precisions[0], text_precision)
        self._set_text_tower(model)
        self._model = model
        log.info(
            "CLIP model ready: %s (text tower %s%s, %d torch threads; the image tower is prepared on first use)",
            self._identity,
            text_precision,
            ", traced" if isinstance(self._text_tower, torch.jit.ScriptModule) else "",
            threads,
        )

    def load_image_tower(self) -> None:
        """Load the model, then convert the image tower to its precision and trace it, once.

        Done on the first image pass rather than in `load`: it is most of a load (ViT-B/32 here:
        int8 conversion and its fidelity check 2.0 s, the trace 2.0 s, of 7.1 s), and a process that
        only encodes words — a `clipgallery search` for words, a server's first text query — never
        needs it. The server starts it right after loading the model (`preload_model`)."""
        self.load()
        if self._image_tower is not None:
            return
        with self._image_tower_lock:
            if self._image_tower is not None:
                return
            import open_clip.transformer

            model = self._model
            transformer = isinstance(model.visual, open_clip.transformer.VisionTransformer)
            image_precision = resolve_precision(self.settings.precision, "image", transformer)
            if image_precision == "int8" and self.settings.precision == "auto":
                model, faithful = self._int8_if_faithful(
                    "image", lambda known: int8_if_faithful(model, self._preprocess, known)
                )
                if not faithful:
                    image_precision = "bf16" if native_bf16() else "fp32"
            elif image_precision == "int8":
                model = quantize_int8(model)
            if image_precision == "bf16":
                model = to_bf16(model, towers=("image",))
            traced = trace_image_tower(model.visual) if self.settings.trace_image_tower else None
            self._precisions = (image_precision, self._precisions[1])
            self._image_tower = traced if traced is not None else model.visual
            log.info("image tower ready: %s%s", image_precision, ", traced" if traced is not None else "")

    def _int8_if_faithful(self, tower: str, check: Callable[[float | None], tuple]) -> tuple[object, bool]:
        """`check(known)` (`int8_if_faithful` or `int8_text_if_faithful`), given the finding of an
        earlier load's check of this model when one is remembered, else remembering its own."""
        known = self._int8_checks.closeness(tower) if self._int8_checks is not None else None
        model, faithful, closeness = check(known)
        if self._int8_checks is not None and known is None:
            self._int8_checks.remember(tower, closeness)
        return model, faithful

    def sharing_model(self, **settings_changes) -> Embedder:
        """Another Embedder on this one's loaded model (no second copy in memory) under other
        settings, e.g. `query_threads` (the bench compares such variants side by side)."""
        self.load_image_tower()
        other = Embedder(self.settings.with_overrides(**settings_changes))
        other._model, other._image_tower, other._text_tower = self._model, self._image_tower, self._text_tower
        other._threads = other.settings.torch_threads or self._threads
        other._size_query_passes()
        other._preprocess, other._tokenizer, other._identity = self._preprocess, self._tokenizer, self._identity
        other._precisions = self._precisions
        if other.settings.trace_text_tower != self.settings.trace_text_tower:
            other._set_text_tower(self._model)
        return other

    def text_variant(self, model) -> Embedder:
        """Like `sharing_model`, but text goes through `model`'s text tower: a copy of this one's
        model with its text side converted (another precision), which the bench sets side by side."""
        other = self.sharing_model()
        other._set_text_tower(model)
        other._model = model
        return other

    def _set_text_tower(self, model) -> None:
        traced = trace_text_tower(model, self._tokenizer) if self.settings.trace_text_tower else None
        self._text_tower = traced if traced is not None else text_tower(model)

    @property
    def identity(self) -> ModelIdentity:
        self.load()
        assert self._identity is not None
        return self._identity

    @property
    def precisions(self) -> tuple[str, str]:
        """(image tower, text tower) precision in force: the settings with "auto" resolved."""
        self.load_image_tower()
        return self._precisions

    def status(self) -> tuple[bool, str]:
        """(ok, human-readable detail); tries to load the model if that has not been tried yet."""
        try:
            self.load()
        except ModelUnavailableError as exc:
            return False, str(exc)
        return True, f"{self._identity} loaded"

    # -- encoding -----------------------------------------------------------------------------

    def preprocess(self, image: PILImage.Image) -> torch.Tensor:
        """The model's resize/crop/normalise transform for one RGB image (safe to call from threads)."""
        self.load()
        # On one thread: preprocessing runs beside the model (bulk indexing's threads, server
        # threads), and its small tensor operations spread over several threads would wait for
        # cores the model is using.
        with torch_threads(1):
            return self._preprocess(image)

    def _size_query_passes(self) -> None:
        query_threads = self.settings.query_threads
        for passes in self._tower_passes.values():
            passes.resize(self._threads // query_threads if query_threads > 0 else 1)

    @contextmanager
    def _forward_pass(self, tower: str, batch_size: int) -> Iterator[None]:
        """A forward pass through `tower` (see `TowerPasses`); a single query (batch of one) runs on
        `query_threads` threads. Splitting one short query over both cores gains little on an idle machine and,
        while other work runs, loses 5-10x to threads waiting for each other (docs/benchmarks.md)."""
        import torch

        # Set on every pass (see torch_threads), so server threads started before the model was
        # loaded obey the settings too.
        wanted = self._threads
        single_query = batch_size == 1 and self.settings.query_threads > 0
        if single_query:
            wanted = min(self.settings.query_threads, wanted)
        passes = self._tower_passes[tower]
        with passes.beside_others() if single_query else passes.alone(), torch.inference_mode(), torch_threads(wanted):
            yield

    def encode_preprocessed(self, batch: torch.Tensor) -> np.ndarray:
        """(n, d) float32 unit vectors of preprocessed images. A single image (a query) shares its
        forward pass with the other queries waiting for the image tower (`_encode_query_image`)."""
        self.load_image_tower()
        if len(batch) == 1 and self.settings.query_batch > 1:
            return self._encode_query_image(batch[0])[None, :]
        with self._forward_pass("image", len(batch)):
            return self._split_image_pass(batch)

    def _split_image_pass(self, batch: torch.Tensor) -> np.ndarray:
        """A batch split over the torch threads: one single-threaded pass per part, side by side.

        One pass on N threads meets at a barrier after each of its few hundred operations, and
        waits there whenever any of its threads is off its core, as happens beside indexing's own
        decoding, thumbnails and database writes. ViT-B-32 bf16, batch 32, 2 cores: one 2-thread
        pass 133-139 images/s, two 1-thread passes 160-163; beside two threads making thumbnails
        73 against 106-109. Side-by-side passes meet once per batch.

        Each pass reads all the weights, so a part keeps at least MIN_IMAGES_PER_PART images (a
        heuristic for machines with many cores, where parts then get several threads each)."""
        import torch

        parts = max(1, min(self._threads, len(batch) // MIN_IMAGES_PER_PART))
        if parts == 1:
            return self._image_pass(batch)
        threads_per_part = self._threads // parts

        def part_pass(part: torch.Tensor) -> np.ndarray:
            with torch.inference_mode(), torch_threads(threads_per_part):
                return self._image_pass(part)

        first, *others = torch.tensor_split(batch, parts)
        futures = [self._pass_executor.submit(part_pass, part) for part in others]
        try:
            first_vectors = part_pass(first)  # this thread takes a part too
        finally:
            wait(futures)  # no part outlives the tower lock, even when one fails
        return np.concatenate([first_vectors, *(f.result() for f in futures)])

    def _image_pass(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        # The image tower's own dtype: bf16 when `to_bf16` converted it (its input must match).
        image_dtype = next(self._model.visual.parameters()).dtype
        features = self._image_tower(batch.to(image_dtype))
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    def _encode_query_image(self, pixels: torch.Tensor) -> np.ndarray:
        """Concurrent image queries are embedded together: each query pass (one per core, side by
        side, `TowerPasses`) takes every query waiting (up to `query_batch`). Under load this is
        what keeps queues short: one pass of 16 images costs about a third of 16 passes of one
        (bf16 here; docs/benchmarks.md), and an idle server still answers a lone query at once,
        with no waiting for company. Side by side, because a query pass runs on one thread: with one
        pass at a time, 2-4 clients sending image queries got 8.3-8.7 queries/s on 2 cores (AMD Zen
        3, int8), with one pass per core 15.8-17.3 (docs/reliability.md)."""
        import torch

        request: Future = Future()
        with self._query_queue_lock:
            self._query_queue.append((pixels, request))
        while not request.done():
            with self._forward_pass("image", 1):
                with self._query_queue_lock:
                    taken = self._query_queue[: self.settings.query_batch]
                    del self._query_queue[: len(taken)]
                if not taken:
                    break  # a pass running beside this one took this query: its result follows
                try:
                    vectors = self._image_pass(torch.stack([p for p, _ in taken]))
                except Exception as exc:  # every query of the pass gets the error, raised in its thread
                    for _, waiting in taken:
                        waiting.set_exception(exc)
                    continue
                for (_, waiting), vector in zip(taken, vectors, strict=True):
                    waiting.set_result(vector)
        return request.result()

    def encode_images(self, images: Sequence[PILImage.Image]) -> np.ndarray:
        """(n, d) float32, each row of unit length."""
        import torch

        if not images:
            return np.zeros((0, self.identity.dimension), dtype=np.float32)
        batch = torch.stack([self.preprocess(image) for image in images])
        return self.encode_preprocessed(batch)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        self.load()
        tokens = trim_text_padding(self._model, self._tokenizer(list(texts)))
        with self._forward_pass("text", len(tokens)):
            features = self._text_tower(tokens)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    def encode_text(self, text: str) -> np.ndarray:
        """One query's vector, cached by query text (the cache belongs to this model instance)."""
        key = text.strip()
        with self._text_cache_lock:
            cached = self._text_cache.get(key)
            if cached is not None:
                self._text_cache.move_to_end(key)
                return cached
        vector = self.encode_texts([key])[0]
        vector.setflags(write=False)
        with self._text_cache_lock:
            self._text_cache[key] = vector
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return vector

    def submit_text(self, text: str) -> Future[np.ndarray]:
        """`encode_text` as a Future, so the caller can work meanwhile (a search sends the
        statements that do not need the vector). A new query is encoded in a background thread
        when a text pass could start now; a cached one, or any while the tower is full, is encoded
        here before returning: a query waiting its turn then holds nothing else meanwhile (no
        database connection)."""
        key = text.strip()
        with self._text_cache_lock:
            cached = key in self._text_cache
        if not cached and self._tower_passes["text"].has_room():
            return self._text_executor.submit(self.encode_text, key)
        done: Future[np.ndarray] = Future()
        done.set_result(self.encode_text(key))
        return done


# torch.nn.init's functions that modules call while they are built (nn.Linear's reset, open_clip's
# init_parameters, ...).
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextmanager
def weights_loaded_after() -> Iterator[None]:
    """Modules built inside the block skip their random initialisation (torch.nn.init's functions
    do nothing), for a model whose every weight is then loaded from a checkpoint — open_clip loads
    a full checkpoint strictly, so a weight the file lacks is an error, not a hole. The
    initialisation was a third of a load: ViT-B-32 built in 2.1 s, 0.55 without, with the same
    state afterwards. The same trick as transformers' `no_init_weights`; it is process-wide while
    it lasts, and models are only built while loading one."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}

    def skip(tensor, *args, **kwargs):
        return tensor

    for name in saved:
        setattr(torch.nn.init, name, skip)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


# How long to wait for the model hub to answer before treating it as unreachable.
HUB_PROBE_TIMEOUT_S = 5.0


def unreachable_model_hub() -> str | None:
    """Why the Hugging Face hub (or the mirror HF_ENDPOINT names) cannot be reached, or None when
    it answers (any HTTP status) or huggingface_hub is offline by choice (HF_HUB_OFFLINE). Asked
    once, with a short timeout, before pretrained weights are looked up: without a network,
    huggingface_hub retries each request five times with back-off, ≈ 1 minute before a machine
    that never had the weights learns so, and as long again each time cached weights are loaded."""
    import httpx
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return None
    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)  # proxies from the environment apply
    except httpx.HTTPError as exc:
        return f"{constants.ENDPOINT}: {type(exc).__name__}: {exc}"
    return None


@contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode inside the block: weights come from its cache at once, or
    their absence is known at once. (Its mode is read per request from this module attribute; the
    environment variable is read only when it is imported.)"""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """`count` torch threads inside the block, for the calling thread: torch's thread count is
    per thread (OpenMP), so this neither needs nor takes a lock."""
    import torch

    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous:
            torch.set_num_threads(previous)


def package_model_dir(package: str) -> Path:
    """The Hugging Face model directory shipped inside an installed Python package (``<package>/model``)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"This model's text tower comes from the Python package {package!r}, which is not installed "
            f"(pip install {package.replace('_', '-')})."
        )
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelUnavailableError(f"Package {package!r} has no model files under {model_dir}.")
    return model_dir


def _create_with_package_text_tower(model_dir: Path, config: dict, weights: Path):
    """A model directory written by `clipgallery train --mode lit`: its weights file holds the trained
    parts only; the locked text tower is loaded from the installed package the config names (never a
    path of the machine that trained it), after checking it is the exact tower the model was trained with."""
    import open_clip
    from safetensors.torch import load_file

    block = config["clipgallery"]
    text_dir = package_model_dir(block["text_tower_package"])
    expected = block.get("text_tower_sha256")
    if expected:
        found = file_sha256(text_dir / "model.safetensors")
        if found != expected:
            raise ModelUnavailableError(
                f"Model directory {model_dir} was trained with another version of the text tower in package "
                f"{block['text_tower_package']!r} (sha256 {expected[:12]}…, installed {found[:12]}…): install the "
                "version it was trained with, or train again."
            )
    text_cfg = dict(config["model_cfg"]["text_cfg"], hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir))
    text_cfg["hf_model_pretrained"] = True
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory: never ask the hub
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{model_dir}", load_weights=False, text_cfg=text_cfg
        )
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    result = model.load_state_dict(load_file(str(weights)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("text.transformer.")]
    if missing or result.unexpected_keys:
        raise ModelUnavailableError(
            f"Weights in {weights} do not fit the model in {model_dir / MODEL_CONFIG_FILE} "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})."
        )
    return model, preprocess


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextmanager
def quiet_package_text_tower_loading() -> Iterator[None]:
    """Around building (and tracing) a model whose locked text tower comes from an installed
    sentence-model package: transformers' load report (the sentence model's pooler weights, unused
    by design), its weight-loading progress bar, its notice about a training loss it looks up when
    the tower is traced, and open_clip's "initialized partially" (the tower's weights come from the
    package, not the checkpoint) are expected, and would greet every CLI command with warnings.
    Errors still raise; other warnings still show."""
    from transformers.utils import logging as hf_logging  # open_clip imports transformers anyway

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with without_root_messages("initialized partially"):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def without_root_messages(fragment: str) -> Iterator[None]:
    """Records of the root logger (where open_clip logs) containing `fragment` are dropped inside the block."""
    dropped = _DropMessages(fragment)
    logging.getLogger().addFilter(dropped)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(dropped)


_embedders: dict[Settings, Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(settings: Settings | None = None) -> Embedder:
    """The process-wide model for these settings (not loaded until first use or `load()`)."""
    settings = settings or get_settings()
    with _embedders_lock:
        embedder = _embedders.get(settings)
        if embedder is None:
            embedder = _embedders[settings] = Embedder(settings)
        return embedder


def create_random_model_dir(
    output: Path,
    architecture: str = "ViT-B-32",
    model_cfg: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a model directory with randomly initialised weights of an open_clip architecture.

    For trying the app and for tests on machines without pretrained weights: every loading and
    embedding code path is the real one, only the numbers mean nothing.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = model_cfg or open_clip.get_model_config(architecture)
    if cfg is None:
        raise ValueError(f"Unknown open_clip architecture {architecture!r}")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg) if "hf_model_name" not in cfg.get("text_cfg", {}) else None
    if model is None:
        raise ValueError("create_random_model_dir builds plain CLIP models only")
    output.mkdir(parents=True, exist_ok=True)
    image_size = cfg["vision_cfg"].get("image_size", 224)
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "size": image_size if isinstance(image_size, int) else list(image_size),
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "clipgallery": {"architecture": architecture, "weights": "random", "seed": seed},
    }
    (output / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(output / WEIGHTS_FILE))
    return output
