"""How the model's two towers run fast on a CPU, each way checked against the plain fp32 model.

- the text tower stopped at the end-of-text token (`encode_text_to_end_token`: exact, not an
  approximation) and traced (`trace_text_tower`);
- the image tower traced (`trace_image_tower`: no GIL per operation), with its preprocessing's
  tensor conversion fused (`fused_tensor_conversion`);
- reduced precision: int8 dynamic quantisation of the Linear layers (`quantize_int8`, kept by the
  default `auto` only if it stays close to fp32: `int8_if_faithful`, `int8_text_if_faithful`) and bf16 with weights
  pre-packed for oneDNN (`to_bf16`); `resolve_precision` picks them for this CPU.

`embedding.Embedder` applies these when it loads a model; the bench measures each against fp32
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from clipgallery.allocator import release_freed_memory

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

log = logging.getLogger(__name__)


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name if it has no message), for one-line messages."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
            # torch's own check traces the tower a second time on the same example (a fifth of a
            # model's load time); the checks below run other shapes, which is what can differ.
            traced = torch.jit.trace(tower, example, strict=False, check_trace=False)
            for inputs in checks:
                same = torch.nn.functional.cosine_similarity(traced(inputs).float(), tower(inputs).float(), dim=-1)
                if float(same.min()) < 0.9999:
                    log.warning(
                        "the traced %s tower differs from the eager one (cosine %.5f): not used", tower_name, same.min()
                    )
                    return None
    except Exception as exc:  # any model the tracer cannot follow: the eager tower is used
        log.warning("the %s tower could not be traced (%s): running it eagerly", tower_name, first_line(exc))
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


def int8_engine(tower: str) -> str:
    """The kernels a tower's int8 layers are packed for (each layer keeps its own; the process-wide
    setting is only read while packing). oneDNN's VNNI kernels ran the ViT-B/32 image tower 1.2x as
    fast as fbgemm's, PyTorch's x86 default (2 cores, AMD Zen 4: 61 -> 73 images/s, vectors as
    close to fp32: docs/benchmarks.md). Without VNNI (plain AVX2, AMD Zen 3) oneDNN's int8 kernels
    are slow on the few rows of one text query: ViT-B/32 text tower, one query on one thread,
    23.5 ms against fbgemm's 8.1 (same vectors; image batches about even), so a text tower there
    is packed for fbgemm. Where a build lacks the engine, the build's default."""
    if tower == "text" and not _has_cpu_feature("vnni"):
        return "fbgemm"
    return "onednn"


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


def _in_image_tower(module_name: str) -> bool:
    return module_name == "visual" or module_name.startswith("visual.")


def quantize_int8(model, towers: tuple[str, ...] = ("image",)):
    """Dynamic int8 quantisation of every Linear layer (weights int8, activations quantised per
    batch at run time; VNNI/AMX kernels on x86). Self-attention projections are first turned into
    Linear layers so they are quantised too, and so is a ViT's patch embedding (a convolution
    that took 7 % of the int8 tower's time in fp32; as an int8 Linear the tower runs 1.15x
    faster, vectors as close to fp32 as before: docs/benchmarks.md). Vectors stay within cos 0.99+ of fp32 (see
    tests/test_embedding_precision.py and docs/benchmarks.md). CPU only; returns the model.

    `towers`: "image" (the model's `visual`), "text" (everything else): CLIPGALLERY_PRECISION and
    CLIPGALLERY_TEXT_PRECISION each say int8 for one tower. Not every model takes it: int8 moved a
    trained LiT model's MiniLM text vectors too far (top-10 overlap with fp32 0.74;
    docs/benchmarks.md), which is why "auto" checks first (`int8_if_faithful`, `int8_text_if_faithful`)."""
    import warnings

    import open_clip
    import torch

    def chosen(name: str) -> bool:
        in_image = _in_image_tower(name)
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
        for tower in towers:
            targets = {
                name: qconfig
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear)
                and chosen(name)
                and _in_image_tower(name) == (tower == "image")
                and not any(name.startswith(f"{r}.") for r in weight_readers)
            }
            with quantized_engine(int8_engine(tower)):
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
# The same for the int8 text tower, on `PROBE_QUERIES`. A query vector is compared with every
# image, so what counts is the top-10 overlap with fp32 (>= 0.9): a random-weight ViT-B/32 text
# tower gives cosine 0.997 here and overlap 0.93 with its images; the trained LiT model's MiniLM
# tower 0.83 here and overlap 0.76 (docs/benchmarks.md), and keeps bf16.
INT8_TEXT_AUTO_MIN_COSINE = 0.995
# Short queries as people type them, varied in length and subject.
PROBE_QUERIES = (
    "dog",
    "red sneakers",
    "a wristwatch with a leather strap",
    "sunset over the mountains",
    "a photo of a church in the snow",
    "two children playing football on a beach",
    "blue denim jacket",
    "a cup of coffee on a wooden table",
    "parachute",
    "an old map of the city with handwritten notes in the margin",
    "cat sleeping",
    "a woman in a yellow summer dress",
)


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


def int8_if_faithful(model, preprocess, remembered: float | None = None) -> tuple[object, bool, float]:
    """(`model` with its image tower in int8, True, closeness) if that keeps the tower's vectors of
    `probe_pictures` within INT8_AUTO_MIN_COSINE of fp32's (closeness: their least cosine); else
    (`model` with the image tower as it was, False, closeness), with a warning. For "auto" only:
    CLIPGALLERY_PRECISION=int8, asked for by name, is applied without this check. `remembered`: the
    closeness an earlier check of the same model found (`precision_checks`), held against the
    threshold without checking again."""
    import copy

    import torch

    if remembered is not None:
        return _apply_remembered("image", model, remembered, INT8_AUTO_MIN_COSINE)
    pixels = torch.stack([preprocess(picture) for picture in probe_pictures()])
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model.visual(pixels).float(), dim=-1)
    kept = copy.deepcopy(model.visual)
    model = quantize_int8(model)
    with torch.inference_mode():
        quantised = torch.nn.functional.normalize(model.visual(pixels).float(), dim=-1)
    closeness = float((reference * quantised).sum(-1).min())
    if _int8_verdict("image", closeness, INT8_AUTO_MIN_COSINE):
        del kept
        release_freed_memory()
        return model, True, closeness
    model.visual = kept
    release_freed_memory()
    return model, False, closeness


def int8_text_if_faithful(model, tokenizer, remembered: float | None = None) -> tuple[object, bool, float]:
    """(`model` with its text tower in int8, True, closeness) if that keeps the vectors of
    `PROBE_QUERIES` within INT8_TEXT_AUTO_MIN_COSINE of fp32's; else (the fp32 model, False,
    closeness). For CLIPGALLERY_TEXT_PRECISION=auto only, like `int8_if_faithful` for the image tower."""
    import copy

    import torch

    if remembered is not None:
        return _apply_remembered("text", model, remembered, INT8_TEXT_AUTO_MIN_COSINE)
    tokens = trim_text_padding(model, tokenizer(list(PROBE_QUERIES)))

    def vectors(model) -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.normalize(text_tower(model)(tokens).float(), dim=-1)

    reference = vectors(model)
    # The fp32 text side is kept (the image tower is shared, not copied) until int8 has passed.
    visual, model.visual = model.visual, torch.nn.Identity()
    try:
        kept = copy.deepcopy(model)
    finally:
        model.visual = visual
    model = quantize_int8(model, towers=("text",))
    closeness = float((reference * vectors(model)).sum(-1).min())
    if _int8_verdict("text", closeness, INT8_TEXT_AUTO_MIN_COSINE):
        del kept
        release_freed_memory()
        return model, True, closeness
    kept.visual = visual
    del model
    release_freed_memory()
    return kept, False, closeness


def _apply_remembered(tower: str, model, closeness: float, minimum: float) -> tuple[object, bool, float]:
    faithful = _int8_verdict(tower, closeness, minimum, remembered=True)
    if faithful:
        model = quantize_int8(model, towers=(tower,))
    return model, faithful, closeness


def _int8_verdict(tower: str, closeness: float, minimum: float, remembered: bool = False) -> bool:
    """Whether an int8 tower whose probe vectors are `closeness` (least cosine) from fp32's is
    kept, logged either way. A refused image tower is a warning (a CLIP image tower normally
    passes); a refused text tower is not: a LiT model's MiniLM tower always ends there."""
    probes, setting = {
        "image": ("pictures", "CLIPGALLERY_PRECISION"),
        "text": ("queries", "CLIPGALLERY_TEXT_PRECISION"),
    }[tower]
    source = " (found by an earlier load's check of this model)" if remembered else ""
    if closeness >= minimum:
        log.info("int8 %s tower kept: cosine %.5f to fp32 on probe %s%s", tower, closeness, probes, source)
        return True
    log.log(
        logging.WARNING if tower == "image" else logging.INFO,
        "the int8 %s tower moved this model's vectors too far (cosine %.4f to fp32 on probe %s%s, "
        "below %.3f): %s=auto keeps it in bf16 or fp32",
        tower,
        closeness,
        probes,
        source,
        minimum,
        setting,
    )
    return False


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it) and
    torch's build has the oneDNN operators the packed bf16 layers use (`_packed_bf16_linear`)."""
    import torch

    try:
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise  # noqa: B018
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


# The CPU features that decide a tower's precision and its int8 kernels.
CPU_FEATURES = ("avx2", "avx512", "vnni", "avx512_bf16", "amx_tile")


def cpu_features() -> list[str]:
    return [name for name in CPU_FEATURES if _has_cpu_feature(name)]


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

    - text tower (one short query at a time: streaming the weights is the cost, so fewer bytes
      per weight is what counts): int8 where the CPU has int8 dot products (VNNI; a quarter of
      fp32's bytes: ViT-B/32, one query, 1 thread, 6.4 ms vs bf16's 7.8 on AMD Zen 4 and 5.0 vs
      7.3 on an Intel Xeon with AMX), kept only if the model passes `int8_text_if_faithful`;
      else bf16 where the CPU has it natively; else int8 again where the CPU has AVX2 (its int8
      kernels multiply in 16-bit pairs, slower than VNNI but still a fifth of fp32's time with
      fbgemm's kernels, `int8_engine`: 7.6-10.4 vs 46-52 ms on AMD Zen 3); else fp32.
    - image tower (batches: arithmetic is the cost): bf16 with AMX tiles (Intel Sapphire Rapids
      and later; ViT-B/32 model only 108 img/s vs int8's 56 on such a Xeon); else, for a vision
      `transformer` (its time is in Linear layers, which int8 quantises), int8 where the CPU has
      int8 dot products (VNNI; AMD Zen 4: 64 img/s vs bf16's 42 and fp32's 19); else bf16 where
      native (a convolutional tower: int8 leaves its convolutions in fp32, bf16 does not); else
      int8 for a vision transformer on AVX2 (AMD Zen 3: 24.7 img/s vs fp32's 11.9); else fp32."""
    if requested != "auto":
        return requested
    if tower == "text":
        if _has_cpu_feature("vnni"):
            return "int8"
        if native_bf16():
            return "bf16"
        return "int8" if _has_cpu_feature("avx2") else "fp32"
    if native_bf16() and _has_cpu_feature("amx_tile"):
        return "bf16"
    if transformer and _has_cpu_feature("vnni"):
        return "int8"
    if native_bf16():
        return "bf16"
    return "int8" if transformer and _has_cpu_feature("avx2") else "fp32"


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
    cast to bf16 (`Embedder.encode_preprocessed` does).

    On a CPU without native bf16 (oneDNN packs bf16 weights only with AVX512 or AVX-NE-CONVERT)
    the layers stay plain bf16 Linear layers: bf16 asked for by name still works there, emulated
    and several times slower than fp32 (ViT-B/32 on AMD Zen 3: 1.6 images/s against 14.5), with
    a warning; "auto" never picks it on such a CPU."""
    import open_clip
    import torch

    attention = _self_attention_module()
    packed = native_bf16()
    if not packed:
        log.warning(
            "this CPU has no native bf16 (AVX512-BF16 or AMX): the bf16 %s tower runs emulated, "
            "several times slower than fp32; the precision 'auto' picks int8 or fp32 here",
            " and ".join(towers),
        )
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
        if not packed:
            continue
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
