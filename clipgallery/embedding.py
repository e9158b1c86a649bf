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
import functools
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipgallery.allocator import release_freed_memory, tune_for_tensors
from clipgallery.config import Settings, get_settings

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


def _find_weights(model_dir: Path) -> Path | None:
    for pattern in (WEIGHTS_FILE, "*.safetensors", "*.bin", "*.pt", "*.pth"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found[0]
    return None


class Embedder:
    """A loaded open_clip model. Use `get_embedder()` for the process-wide instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._load_lock = threading.Lock()
        # One forward pass at a time per tower: torch already uses every core for one batch, and
        # concurrent passes would only fight over them. The towers share no layers, so a text
        # query (milliseconds) need not wait behind an image query or an indexing batch.
        self._tower_locks = {"image": threading.Lock(), "text": threading.Lock()}
        self._model = None
        self._image_tower = None  # model.visual, or its TorchScript trace (`trace_image_tower`)
        self._text_tower = None  # `text_tower(model)`, or its TorchScript trace (`trace_text_tower`)
        self._threads = 1
        self._preprocess = None
        self._tokenizer = None
        self._identity: ModelIdentity | None = None
        self._precisions = ("fp32", "fp32")  # (image tower, text tower) in force, once loaded
        self._error: ModelUnavailableError | None = None
        self._query_queue: list[tuple[torch.Tensor, Future]] = []
        self._query_queue_lock = threading.Lock()
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_lock = threading.Lock()
        # Threads start on first use.
        self._text_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="clipgallery-text")
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
        log.info("loading CLIP model: %s", spec.source)
        if spec.model_dir is not None:
            weights = _find_weights(spec.model_dir)
            if weights is None:
                raise ModelUnavailableError(
                    f"Model directory {spec.model_dir} holds no weights file. " + _how_to_provide_a_model()
                )
            if config.get("clipgallery", {}).get("text_tower_package"):
                model, preprocess = _create_with_package_text_tower(spec.model_dir, config, weights)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{spec.model_dir}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{spec.model_dir}")
            weights_id = "sha256:" + file_sha256(weights)
        elif spec.checkpoint is not None:
            if not spec.checkpoint.is_file():
                raise ModelUnavailableError(
                    f"Checkpoint file {spec.checkpoint} does not exist. " + _how_to_provide_a_model()
                )
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.architecture, pretrained=str(spec.checkpoint)
            )
            tokenizer = open_clip.get_tokenizer(spec.architecture)
            weights_id = "sha256:" + file_sha256(spec.checkpoint)
        else:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.architecture, pretrained=spec.pretrained_tag
                )
            except Exception as exc:
                raise ModelUnavailableError(
                    f"No CLIP model is available: {spec.source} could not be loaded ({_first_line(exc)}). "
                    "Pretrained weights are downloaded from the model hub on first use, which needs network access. "
                    + _how_to_provide_a_model()
                ) from exc
            tokenizer = open_clip.get_tokenizer(spec.architecture)
            weights_id = spec.pretrained_tag or "random"
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        import open_clip.transformer

        transformer = isinstance(model.visual, open_clip.transformer.VisionTransformer)
        image_precision = resolve_precision(self.settings.precision, "image", transformer)
        if image_precision == "int8" and self.settings.precision == "auto":
            model, faithful = int8_if_faithful(model, fused_tensor_conversion(preprocess))
            if not faithful:
                image_precision = "bf16" if native_bf16() else "fp32"
        elif image_precision == "int8":
            model = quantize_int8(model)
        if image_precision == "bf16":
            model = to_bf16(model, towers=("image",))
        traced = trace_image_tower(model.visual) if self.settings.trace_image_tower else None
        self._image_tower = traced if traced is not None else model.visual
        text_precision = resolve_precision(self.settings.text_precision, "text")
        if text_precision == "bf16":
            model = to_bf16(model, towers=("text",))
        dimension = int(getattr(model, "embed_dim", 0) or spec.dimension)
        self._preprocess = fused_tensor_conversion(preprocess)
        self._tokenizer = tokenizer
        self._identity = ModelIdentity(spec.architecture, weights_id, dimension)
        self._precisions = (image_precision, text_precision)
        self._set_text_tower(model)
        self._model = model
        log.info(
            "CLIP model ready: %s (image tower %s%s, text tower %s%s, %d torch threads)",
            self._identity,
            image_precision,
            ", traced" if self._image_tower is not model.visual else "",
            text_precision,
            ", traced" if isinstance(self._text_tower, torch.jit.ScriptModule) else "",
            threads,
        )

    def sharing_model(self, **settings_changes) -> Embedder:
        """Another Embedder on this one's loaded model (no second copy in memory) under other
        settings, e.g. `query_threads` (the bench compares such variants side by side)."""
        self.load()
        other = Embedder(self.settings.with_overrides(**settings_changes))
        other._model, other._image_tower, other._text_tower = self._model, self._image_tower, self._text_tower
        other._threads = self._threads
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
        self.load()
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

    @contextmanager
    def _forward_pass(self, tower: str, batch_size: int) -> Iterator[None]:
        """One forward pass at a time through `tower`; a single query (batch of one) runs on
        `query_threads` threads. Splitting one short query over both cores gains little on an idle machine and,
        while other work runs, loses 5-10x to threads waiting for each other (docs/benchmarks.md)."""
        import torch

        # Set on every pass (see torch_threads), so server threads started before the model was
        # loaded obey the settings too.
        wanted = self._threads
        if batch_size == 1 and self.settings.query_threads > 0:
            wanted = min(self.settings.query_threads, wanted)
        with self._tower_locks[tower], torch.inference_mode(), torch_threads(wanted):
            yield

    def encode_preprocessed(self, batch: torch.Tensor) -> np.ndarray:
        """(n, d) float32 unit vectors of preprocessed images. A single image (a query) shares its
        forward pass with the other queries waiting for the image tower (`_encode_query_image`)."""
        self.load()
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
        """Concurrent image queries are embedded together: whoever gets the image tower takes every
        query waiting (up to `query_batch`) into one pass. Under load this is what keeps queues short:
        one pass of 16 images costs about a third of 16 passes of one (bf16 here; docs/benchmarks.md),
        and an idle server still answers a lone query at once, with no waiting for company."""
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
                    continue  # another pass took this query; its result is set
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
        when the text tower is free; a cached one, or any while the tower is busy, is encoded
        here before returning: a query waiting its turn then holds nothing else meanwhile (no
        database connection)."""
        key = text.strip()
        with self._text_cache_lock:
            cached = key in self._text_cache
        if not cached and not self._tower_locks["text"].locked():
            return self._text_executor.submit(self.encode_text, key)
        done: Future[np.ndarray] = Future()
        done.set_result(self.encode_text(key))
        return done


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


def encode_text_to_end_token(model, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower run only up to the last end-of-text token in the batch.

    Queries are a few tokens long but are padded to 77. The text transformer's attention is
    causal, so no position sees the padding after it, and the pooled feature is taken at the
    end-of-text token: dropping the padding gives the same vector (tests prove it) for a
    fraction of the work. Models this does not apply to use their own encode_text.
    """
    return text_tower(model)(trim_text_padding(model, tokens))


def _pools_at_end_token(model) -> bool:
    """A CLIP text tower whose causal attention and end-of-text pooling make its padding inert."""
    import open_clip

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def trim_text_padding(model, tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` without the padding columns no text of the batch needs (exact, see
    `encode_text_to_end_token`); unchanged for a model whose padding is not provably inert."""
    import open_clip

    if _pools_at_end_token(model):
        pad = 0  # CLIP's tokenizer pads with token 0
    else:
        hf_config = getattr(getattr(model, "text", None), "config", None)
        pad = getattr(hf_config, "pad_token_id", None)
        # A Hugging Face tower masks its padding out of attention and pooling: trimming it is exact.
        if not isinstance(getattr(model, "text", None), open_clip.hf_model.HFTextEncoder) or pad is None:
            return tokens
    length = int((tokens != pad).sum(dim=1).max())
    return tokens[:, : max(length, 1)]


def text_tower(model):
    """The model's text side as one module: token ids (trimmed by `trim_text_padding`) in,
    unnormalised text features out; it shares the model's weights. `trace_text_tower` traces it."""
    import open_clip
    import torch

    class ClipTextTower(torch.nn.Module):
        """CLIP's encode_text for a batch of any length up to the context length (the positions and
        the causal mask are cut to it), pooled at each text's end-of-text token."""

        def __init__(self, model) -> None:
            super().__init__()
            self.token_embedding = model.token_embedding
            self.transformer = model.transformer
            self.ln_final = model.ln_final
            self.register_buffer("positional_embedding", model.positional_embedding.data, persistent=False)
            self.register_buffer("attn_mask", model.attn_mask, persistent=False)
            projection = model.text_projection
            self.projection_layer = projection if isinstance(projection, torch.nn.Module) else None
            self.register_buffer(
                "projection",
                None if projection is None or self.projection_layer is not None else projection.data,
                persistent=False,
            )
            self.cast_dtype = model.transformer.get_cast_dtype()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            length = tokens.shape[1]
            x = self.token_embedding(tokens).to(self.cast_dtype)
            x = x + self.positional_embedding[:length].to(self.cast_dtype)
            x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
            x = self.ln_final(x)
            x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # the end-of-text token has the largest id
            if self.projection_layer is not None:
                return self.projection_layer(x)
            return x if self.projection is None else x @ self.projection

    class ModelTextTower(torch.nn.Module):
        """Any other model: its own encode_text (open_clip's CustomTextCLIP: its `text` module)."""

        def __init__(self, model) -> None:
            super().__init__()
            text = getattr(model, "text", None)
            self.encoder = text if type(model) is not open_clip.CLIP and isinstance(text, torch.nn.Module) else None
            self.model = None if self.encoder is not None else model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.encoder(tokens) if self.encoder is not None else self.model.encode_text(tokens)

    return ClipTextTower(model) if _pools_at_end_token(model) else ModelTextTower(model)


def trace_text_tower(model, tokenizer) -> object | None:
    """`text_tower(model)` as a TorchScript trace, or None when it cannot be traced faithfully.

    As for the image tower (`trace_image_tower`): no GIL per operation, and less Python per query
    (ViT-B-32 bf16, one query on one core: 10 -> 6.5 ms; a MiniLM LiT tower 5.2 -> 2.7 ms). The
    sequence length and batch size stay free in the trace: it is checked against the eager tower
    on texts of other lengths, alone and padded in one batch."""

    def tokens(texts: list[str]) -> torch.Tensor:
        return trim_text_padding(model, tokenizer(texts))

    checks = (["x"], ["a red dress with long sleeves on a wooden chair"], ["x", "a red dress and a hat"])
    return _checked_trace("text", text_tower(model), tokens(["a photo of a dog"]), [tokens(t) for t in checks])


def _checked_trace(tower_name: str, tower, example, checks: list) -> object | None:
    """`tower` traced on `example`, then run traced and eagerly on each of `checks` (inputs of
    other shapes, so a shape baked into the trace is caught); None, with a warning, when the
    tracer cannot follow the tower or the two disagree (cosine below 0.9999)."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(tower, example, strict=False)
            for inputs in checks:
                same = torch.nn.functional.cosine_similarity(traced(inputs).float(), tower(inputs).float(), dim=-1)
                if float(same.min()) < 0.9999:
                    log.warning(
                        "the traced %s tower differs from the eager one (cosine %.5f): not used", tower_name, same.min()
                    )
                    return None
    except Exception as exc:  # any model the tracer cannot follow: the eager tower is used
        log.warning("the %s tower could not be traced (%s): running it eagerly", tower_name, _first_line(exc))
        return None
    return traced


def _self_attention_module():
    import torch

    class LinearSelfAttention(torch.nn.Module):
        """nn.MultiheadAttention (self-attention only) with its packed q/k/v projection as an
        nn.Linear, so dynamic quantisation reaches it too: quantize_dynamic skips
        MultiheadAttention's in_proj_weight, a quarter of a ViT block's multiply-adds."""

        def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
            super().__init__()
            dim = mha.embed_dim
            self.num_heads = mha.num_heads
            self.batch_first = mha.batch_first
            self.qkv = torch.nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
            self.qkv.weight = torch.nn.Parameter(mha.in_proj_weight.detach().clone(), requires_grad=False)
            if mha.in_proj_bias is not None:
                self.qkv.bias = torch.nn.Parameter(mha.in_proj_bias.detach().clone(), requires_grad=False)
            self.out_proj = torch.nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
            self.out_proj.weight = torch.nn.Parameter(mha.out_proj.weight.detach().clone(), requires_grad=False)
            if mha.out_proj.bias is not None:
                self.out_proj.bias = torch.nn.Parameter(mha.out_proj.bias.detach().clone(), requires_grad=False)

        def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
            if (key is not None and key is not query) or (value is not None and value is not query):
                raise ValueError("LinearSelfAttention handles self-attention only")
            x = query if self.batch_first else query.transpose(0, 1)
            out = self.out_proj(self.heads(x, attn_mask))
            return (out if self.batch_first else out.transpose(0, 1)), None

        def heads(self, x, attn_mask=None):
            """Self-attention of batch-first `x` up to the output projection: (batch, length, dim)."""
            batch, length, dim = x.shape
            q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(q.dtype)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return out.transpose(1, 2).reshape(batch, length, dim)

    return LinearSelfAttention


def fused_tensor_conversion(preprocess):
    """`preprocess` (a torchvision Compose ending in ToTensor, Normalize, as open_clip builds
    them) with those two steps done as one: the 8-bit RGB pixels become the normalised floats in
    one multiply-add, instead of a division by 255 and then a normalisation, each over a fresh
    tensor. 0.84 -> 0.40 ms per 224-px image on one core; values within 1e-6 of torchvision's.
    Anything else (another pipeline, an image that is not 8-bit RGB by then) runs unchanged."""
    import torch
    from PIL import Image as PILImage
    from torchvision import transforms

    steps = list(getattr(preprocess, "transforms", ()))
    if (
        len(steps) < 2
        or type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor")
        or not isinstance(steps[-1], transforms.Normalize)
        or len(steps[-1].mean) != 3
        or len(steps[-1].std) != 3
    ):
        return preprocess
    head, tail = transforms.Compose(steps[:-2]), transforms.Compose(steps[-2:])
    mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(steps[-1].std, dtype=torch.float32).view(-1, 1, 1)
    scale, shift = 1.0 / (255.0 * std), -mean / std

    def run(image):
        image = head(image)
        if not isinstance(image, PILImage.Image) or image.mode != "RGB":
            return tail(image)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
        return pixels.mul_(scale).add_(shift)

    return run


def _patch_embedding_module():
    import torch

    class PatchEmbeddingLinear(torch.nn.Module):
        """A ViT's patch embedding (a Conv2d whose kernel is its stride, no padding) as a Linear
        layer over the flattened patches, which dynamic quantisation then turns into int8. Same
        output shape and values as the convolution (up to float rounding)."""

        def __init__(self, conv: torch.nn.Conv2d) -> None:
            super().__init__()
            self.patch = conv.kernel_size[0]
            self.out_channels = conv.out_channels
            self.linear = torch.nn.Linear(
                conv.in_channels * self.patch * self.patch, conv.out_channels, bias=conv.bias is not None
            )
            with torch.no_grad():
                self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
                if conv.bias is not None:
                    self.linear.bias.copy_(conv.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, channels, height, width = x.shape
            k = self.patch
            rows, columns = height // k, width // k
            patches = (
                x[:, :, : rows * k, : columns * k]
                .reshape(batch, channels, rows, k, columns, k)
                .permute(0, 2, 4, 1, 3, 5)
                .reshape(batch, rows * columns, channels * k * k)
            )
            # A view in the convolution's layout: the caller's flatten + permute gets the Linear's
            # contiguous output back without a copy.
            return self.linear(patches).transpose(1, 2).unflatten(2, (rows, columns))

    return PatchEmbeddingLinear


def _is_patch_embedding(conv) -> bool:
    import torch

    return (
        isinstance(conv, torch.nn.Conv2d)
        and conv.kernel_size == conv.stride
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


# The kernels int8 layers are packed for (each layer keeps its own; the process-wide setting is
# only read while packing). oneDNN's VNNI kernels ran the ViT-B/32 image tower 1.2x as fast as
# fbgemm's, PyTorch's x86 default (2 cores, AMD Zen 4: 61 -> 73 images/s, vectors as close to
# fp32: docs/benchmarks.md). fbgemm where a build lacks oneDNN.
INT8_ENGINE = "onednn"


@contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """`torch.backends.quantized.engine` set to `name` for the block, when this build has it."""
    import torch

    before = torch.backends.quantized.engine
    if name in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_int8(model, towers: tuple[str, ...] = ("image",)):
    """Dynamic int8 quantisation of every Linear layer (weights int8, activations quantised per
    batch at run time; VNNI/AMX kernels on x86). Self-attention projections are first turned into
    Linear layers so they are quantised too, and so is a ViT's patch embedding (a convolution
    that took 7 % of the int8 tower's time in fp32; as an int8 Linear the tower runs 1.15x
    faster, vectors as close to fp32 as before: docs/benchmarks.md). Vectors stay within cos 0.99+ of fp32 (see
    tests/test_embedding_precision.py and docs/benchmarks.md). CPU only; returns the model.

    `towers`: "image" (the model's `visual`), "text" (everything else). CLIPGALLERY_PRECISION=int8
    quantises the image tower only: that is where indexing spends its time, while a query's text
    tower is small, and int8 moved a trained LiT model's MiniLM text vectors too far (top-10
    overlap with fp32 0.74; docs/benchmarks.md)."""
    import warnings

    import open_clip
    import torch

    def chosen(name: str) -> bool:
        in_image = name == "visual" or name.startswith("visual.")
        return ("image" in towers and in_image) or ("text" in towers and not in_image)

    attention = _self_attention_module()
    for name, module in model.named_modules():
        if (
            isinstance(module, open_clip.transformer.ResidualAttentionBlock)
            and not hasattr(module, "ln_1_kv")  # cross-attention blocks keep nn.MultiheadAttention
            and isinstance(module.attn, torch.nn.MultiheadAttention)
            and module.attn._qkv_same_embed_dim
            and chosen(name)
        ):
            module.attn = attention(module.attn)
    patch_embedding = _patch_embedding_module()
    vision_towers = [
        module
        for name, module in model.named_modules()
        if isinstance(module, open_clip.transformer.VisionTransformer) and chosen(name)
    ]
    for tower in vision_towers:
        if _is_patch_embedding(tower.conv1):
            tower.conv1 = patch_embedding(tower.conv1)
    # ResNet towers' attention pooling reads its q/k/v Linear layers' weights directly (it never
    # calls them): those stay in fp32.
    weight_readers = [
        name for name, module in model.named_modules() if isinstance(module, open_clip.modified_resnet.AttentionPool2d)
    ]
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed here.
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.default_dynamic_qconfig
        targets = {
            name: qconfig
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and chosen(name)
            and not any(name.startswith(f"{r}.") for r in weight_readers)
        }
        with quantized_engine(INT8_ENGINE):
            model = torch.ao.quantization.quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)
    for module in model.modules():
        if isinstance(module, open_clip.transformer.ResidualAttentionBlock) and hasattr(
            module.mlp.c_fc, "_packed_params"
        ):
            # open_clip asks the first block's c_fc for the activations' dtype; quantised
            # layers keep no float weight, so say it the way open_clip expects.
            module.mlp.c_fc.int8_original_dtype = torch.float32
    release_freed_memory()
    return model


# What "auto" asks of the int8 image tower on probe pictures before it keeps it: every vector within
# this cosine of fp32's. A random-weight ViT-B/32 gives 0.9996 (top-10 overlap with fp32 0.97);
# a trained transformer with outlier activations can give far less (MiniLM: 0.91), and then int8
# would reorder results.
INT8_AUTO_MIN_COSINE = 0.999


def probe_pictures(count: int = 8, size: int = 256) -> list[PILImage.Image]:
    """Deterministic picture-like images (smooth colour fields with edges and fine texture) on
    which a reduced-precision tower is compared with fp32 at load."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size * 3 // 4, size=2))
            w, h = (int(v) for v in rng.integers(size // 8, size // 3, size=2))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill)
        pictures.append(picture)
    return pictures


def int8_if_faithful(model, preprocess) -> tuple[object, bool]:
    """(`model` with its image tower in int8, True) if that keeps the tower's vectors of
    `probe_pictures` within INT8_AUTO_MIN_COSINE of fp32's; else (`model` with the image tower as
    it was, False), with a warning. For "auto" only: CLIPGALLERY_PRECISION=int8, asked for by
    name, is applied without this check."""
    import copy

    import torch

    pixels = torch.stack([preprocess(picture) for picture in probe_pictures()])
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model.visual(pixels).float(), dim=-1)
    kept = copy.deepcopy(model.visual)
    model = quantize_int8(model)
    with torch.inference_mode():
        quantised = torch.nn.functional.normalize(model.visual(pixels).float(), dim=-1)
    closeness = float((reference * quantised).sum(-1).min())
    if closeness >= INT8_AUTO_MIN_COSINE:
        log.info("int8 image tower kept: cosine %.5f to fp32 on probe pictures", closeness)
        del kept
        release_freed_memory()
        return model, True
    model.visual = kept
    release_freed_memory()
    log.warning(
        "the int8 image tower moved this model's vectors too far (cosine %.4f to fp32 on probe pictures, "
        "below %.3f): CLIPGALLERY_PRECISION=auto keeps it in bf16 or fp32",
        closeness,
        INT8_AUTO_MIN_COSINE,
    )
    return model, False


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it) and
    torch's build has the oneDNN operators the packed bf16 layers use (`_packed_bf16_linear`)."""
    import torch

    try:
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise  # noqa: B018
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _has_cpu_feature(name: str) -> bool:
    import torch

    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def resolve_precision(requested: str, tower: str = "image", transformer: bool = True) -> str:
    """A tower's precision setting in force. "auto" picks what is fastest on this CPU within the
    fidelity criterion (top-10 overlap with fp32 >= 0.9, eval mAP within 1 point; docs/benchmarks.md):

    - text tower (one short query at a time: streaming the weights is the cost, so halving their
      bytes is what counts): bf16 where the CPU has it natively, else fp32.
    - image tower (batches: arithmetic is the cost): bf16 with AMX tiles (Intel Sapphire Rapids
      and later; ViT-B/32 model only 108 img/s vs int8's 56 on such a Xeon); else, for a vision
      `transformer` (its time is in Linear layers, which int8 quantises), int8 where the CPU has
      int8 dot products (VNNI; AMD Zen 4: 64 img/s vs bf16's 42 and fp32's 19); else bf16 where
      native (a convolutional tower: int8 leaves its convolutions in fp32, bf16 does not); else fp32."""
    if requested != "auto":
        return requested
    if tower == "text":
        return "bf16" if native_bf16() else "fp32"
    if native_bf16() and _has_cpu_feature("amx_tile"):
        return "bf16"
    if transformer and _has_cpu_feature("vnni"):
        return "int8"
    return "bf16" if native_bf16() else "fp32"


# The oneDNN call as TorchScript: its empty `Scalar?[]` argument is a type the tracer cannot record
# from Python (`trace_image_tower` traces through this function instead).
_PACKED_LINEAR_SOURCE = """
def packed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    no_scalars = torch.jit.annotate(List[Optional[number]], [])
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", no_scalars, "")

def packed_linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    no_scalars = torch.jit.annotate(List[Optional[number]], [])
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", no_scalars, approximate)

def packed_linear_add(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, residual, weight, bias, "add")
"""


@functools.cache  # one TorchScript compilation per process, shared by every packed layer and block
def _packed_linear_functions():
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        return torch.jit.CompilationUnit(_PACKED_LINEAR_SOURCE)


def _packed_bf16_linear():
    import torch

    packed_linear = _packed_linear_functions().packed_linear

    class PackedBf16Linear(torch.nn.Module):
        """An inference-only nn.Linear with bf16 weights pre-packed in oneDNN's blocked layout.

        A text query's pass is bound by reading the weights, not by arithmetic: bf16 halves the
        bytes, and the pre-packed layout saves oneDNN re-laying them out on every call (ViT-B-32's
        text tower, one query on one core here: 35 ms fp32 -> 18 ms plain bf16 -> 12 ms packed).
        Image batches are bound by arithmetic, which AMX does in bf16 (4x fp32 at batch 16)."""

        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            weight = linear.weight.detach().to(torch.bfloat16)
            self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1))
            bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
            self.register_buffer("bias", bias)
            # open_clip and Hugging Face ask a layer's .weight for the dtype to cast activations to.
            self.register_buffer("weight", torch.empty(0, dtype=torch.bfloat16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            return packed_linear(flat, self.packed_weight, self.bias).reshape(*shape[:-1], self.out_features)

    return PackedBf16Linear


def _fuse_bf16_blocks(side, attention, packed_linear) -> None:
    """Each plain transformer block of a packed bf16 image tower (`to_bf16`) replaced by one whose GELU
    and residual additions are done by oneDNN inside the Linear layers before them (post-ops),
    saving a pass over the activations each: ViT-B-32 image batch, one core, 13.0 -> 12.2 ms per
    image. Blocks of any other shape (layer scale, cross-attention, extra norms) stay as they are."""
    import open_clip
    import torch

    fused_block = _fused_bf16_block()
    for module in list(side.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, open_clip.transformer.ResidualAttentionBlock):
                continue
            mlp = dict(child.mlp.named_children()) if isinstance(child.mlp, torch.nn.Sequential) else {}
            if (
                not hasattr(child, "ln_1_kv")
                and isinstance(child.attn, attention)
                and child.attn.batch_first
                and all(isinstance(getattr(child.attn, layer), packed_linear) for layer in ("qkv", "out_proj"))
                and all(type(getattr(child, scale)) is torch.nn.Identity for scale in ("ls_1", "ls_2"))
                and list(mlp) == ["c_fc", "gelu", "c_proj"]
                and isinstance(mlp["c_fc"], packed_linear)
                and isinstance(mlp["c_proj"], packed_linear)
            ):
                setattr(module, name, fused_block(child))


def _fused_bf16_block():
    import torch

    functions = _packed_linear_functions()
    linear_gelu, linear_add = functions.packed_linear_gelu, functions.packed_linear_add

    class FusedBf16Block(torch.nn.Module):
        """open_clip's ResidualAttentionBlock (no layer scale, self-attention, batch first) with
        packed bf16 layers, computing x + attn(ln_1(x)), then x + mlp(ln_2(x)), with the
        additions and an exact or tanh GELU fused into the Linear layers (one rounding to bf16
        instead of two, so the result is if anything closer to fp32)."""

        def __init__(self, block) -> None:
            super().__init__()
            # The block's own modules, under their own names: open_clip asks resblocks[0].mlp.c_fc
            # for the dtype to cast to, and state dicts keep their keys.
            self.ln_1, self.attn, self.ln_2, self.mlp = block.ln_1, block.attn, block.ln_2, block.mlp
            activation = block.mlp.gelu
            self.gelu_approximate = activation.approximate if type(activation) is torch.nn.GELU else None

        def get_weight_dtype(self) -> torch.dtype:
            return self.mlp.c_fc.weight.dtype

        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            if k_x is not None or v_x is not None:
                raise ValueError("FusedBf16Block handles self-attention only")
            attn, mlp = self.attn, self.mlp
            batch, length, dim = q_x.shape
            residual = q_x.reshape(-1, dim).to(torch.bfloat16)
            out = attn.heads(self.ln_1(q_x), attn_mask).reshape(-1, dim)
            x = linear_add(out, residual, attn.out_proj.packed_weight, attn.out_proj.bias)
            hidden = self.ln_2(x)
            if self.gelu_approximate is None:
                hidden = mlp.gelu(mlp.c_fc(hidden))
            else:
                hidden = linear_gelu(hidden, mlp.c_fc.packed_weight, mlp.c_fc.bias, self.gelu_approximate)
            x = linear_add(hidden, x, mlp.c_proj.packed_weight, mlp.c_proj.bias)
            return x.view(batch, length, dim)

    return FusedBf16Block


def to_bf16(model, towers: tuple[str, ...] = ("image", "text")):
    """`towers` ("image": the model's `visual`; "text": everything else) in bf16 for inference,
    their Linear layers pre-packed; returns the model.

    Vectors stay within cosine 0.9999 of fp32 (tests/test_embedding_precision.py; docs/benchmarks.md
    for speed and for ranking fidelity on trained models). Needs a CPU with native bf16 (see
    `resolve_precision`); elsewhere bf16 is emulated and slower. The image tower's input must be
    cast to bf16 (`Embedder.encode_preprocessed` does)."""
    import open_clip
    import torch

    attention = _self_attention_module()
    packed_linear = _packed_bf16_linear()
    sides = [child for name, child in model.named_children() if ("image" if name == "visual" else "text") in towers]
    for side in sides:
        # ResNet towers' attention pooling reads its q/k/v layers' weights directly: plain bf16 Linear.
        weight_readers = {
            id(layer)
            for pool in side.modules()
            if isinstance(pool, open_clip.modified_resnet.AttentionPool2d)
            for layer in pool.children()
        }
        for module in side.modules():
            if (
                isinstance(module, open_clip.transformer.ResidualAttentionBlock)
                and not hasattr(module, "ln_1_kv")  # cross-attention blocks keep nn.MultiheadAttention
                and isinstance(module.attn, torch.nn.MultiheadAttention)
                and module.attn._qkv_same_embed_dim
            ):
                # nn.MultiheadAttention wants float masks and weights of one dtype; the Linear form
                # runs q/k/v through one packed matrix and casts the causal mask to bf16.
                module.attn = attention(module.attn)
        side.to(torch.bfloat16)
        for module in list(side.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and id(child) not in weight_readers:
                    setattr(module, name, packed_linear(child))
        if side is getattr(model, "visual", None):
            # Batches only: for one text query (a few tokens) the fused kernels measured no faster
            # (ViT-B-32 text tower, one core: 10.9-11.8 ms fused vs 10.6-11.3 plain).
            _fuse_bf16_blocks(side, attention, packed_linear)
    if "text" in towers:
        # CLIP keeps text-side tensors on the model itself (embeddings, projection), not in a module.
        for name in ("positional_embedding", "text_projection"):
            parameter = getattr(model, name, None)
            if isinstance(parameter, torch.nn.Parameter):
                parameter.data = parameter.data.to(torch.bfloat16)
    release_freed_memory()
    return model


def trace_image_tower(visual) -> object | None:
    """The image tower as a TorchScript trace, or None when it cannot be traced faithfully.

    A traced forward pass runs in C++ without taking Python's GIL for each of its few hundred
    operations. Eager, an image pass in a server waits for the GIL between operations while the
    other threads run Python (requests, database calls, decoding): a batch-4 bf16 pass measured
    74 ms alone and 1,144 ms beside 8 busy Python threads; traced 84 and 283 ms (the rest is
    sharing the cores). The trace is checked against the eager tower at two batch sizes, so a shape
    baked into it is caught. (torch.jit is deprecated in favour of torch.export/compile, which
    need a compiler toolchain at run time; the eager tower stays the fallback.)"""
    import torch

    size = getattr(visual, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    dtype = next(visual.parameters()).dtype
    generator = torch.Generator().manual_seed(0)

    def pixels(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, height, width, generator=generator).to(dtype)

    return _checked_trace("image", visual, pixels(2), [pixels(1), pixels(3)])


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
    partially = _DropMessages("initialized partially")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger().addFilter(partially)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(partially)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
