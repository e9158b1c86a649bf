"""CLIPGALLERY_PRECISION: int8 dynamic quantisation and bf16 stay close to fp32; "auto" picks per CPU.
CLIPGALLERY_TEXT_PRECISION: the bf16 text tower stays close to fp32 and leaves images alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipgallery.config import ConfigError, Settings, load_settings
from clipgallery.embedding import Embedder
from clipgallery.towers import (
    _self_attention_module,
    encode_text_to_end_token,
    fused_tensor_conversion,
    native_bf16,
    probe_pictures,
    quantize_int8,
    resolve_precision,
    to_bf16,
)
from tests.conftest import picture

needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")


def test_auto_is_the_default_and_the_setting_is_parsed(monkeypatch):
    monkeypatch.delenv("CLIPGALLERY_PRECISION", raising=False)
    assert Settings().precision == "auto"
    assert load_settings().precision == "auto"
    monkeypatch.setenv("CLIPGALLERY_PRECISION", "INT8")
    assert load_settings().precision == "int8"
    monkeypatch.setenv("CLIPGALLERY_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="CLIPGALLERY_PRECISION"):
        load_settings()
    assert ("precision", "auto") in Settings().describe()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_self_attention_equals_multihead_attention(batch_first, causal):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 64) if batch_first else torch.randn(7, 3, 64)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    ours = _self_attention_module()(mha).eval()
    with torch.inference_mode():
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        got = ours(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(got, expected, atol=1e-5)


def test_quantize_int8_reaches_every_linear_layer(tiny_model_dir):
    engine = torch.backends.quantized.engine
    embedder = Embedder(Settings(model_name=str(tiny_model_dir), precision="int8", text_precision="fp32"))
    embedder.load_image_tower()
    # Packed for each tower's kernels (int8_engine) without changing the process-wide engine.
    assert torch.backends.quantized.engine == engine
    model = embedder._model
    visual = model.visual
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in visual.modules())
    assert [name for name, m in visual.named_modules() if type(m) is torch.nn.Linear] == []
    # The patch embedding too: a convolution before, an int8 Linear over the patches now.
    assert not any(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    # The text tower stays fp32 (query vectors exactly as before) unless asked for.
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in model.transformer.modules())
    quantize_int8(model, towers=("text",))
    assert not any(type(m) is torch.nn.Linear for m in model.modules())


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_engine_per_tower(monkeypatch, vnni):
    """oneDNN everywhere but for a text tower on a CPU without VNNI, where its kernels take 3x
    fbgemm's time on a query's few rows; either way the vectors are the same."""
    import clipgallery.towers as towers

    monkeypatch.setattr(towers, "_has_cpu_feature", lambda name: vnni if name == "vnni" else True)
    assert towers.int8_engine("image") == "onednn"
    assert towers.int8_engine("text") == ("onednn" if vnni else "fbgemm")


def test_int8_text_tower_on_either_engine_gives_the_same_vectors(tiny_model_dir, monkeypatch):
    import clipgallery.towers as towers

    vectors = {}
    for engine in ("onednn", "fbgemm"):
        monkeypatch.setattr(towers, "int8_engine", lambda tower, engine=engine: engine)
        embedder = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32", text_precision="int8"))
        vectors[engine] = embedder.encode_texts(TEXTS)
    assert np.min(np.sum(vectors["onednn"] * vectors["fbgemm"], axis=1)) >= 0.999


@pytest.mark.parametrize("size", [(224, 224), (230, 250)])
def test_patch_embedding_as_a_linear_layer_equals_the_convolution(size):
    from clipgallery.towers import _is_patch_embedding, _patch_embedding_module

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 64, kernel_size=32, stride=32, bias=False)
    assert _is_patch_embedding(conv) and not _is_patch_embedding(torch.nn.Conv2d(3, 64, 3, padding=1))
    pixels = torch.randn(2, 3, *size)
    with torch.inference_mode():
        expected, got = conv(pixels), _patch_embedding_module()(conv)(pixels)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4)


def test_int8_vectors_are_close_to_fp32(tiny_model_dir):
    fp32 = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32", text_precision="fp32"))
    int8 = Embedder(Settings(model_name=str(tiny_model_dir), precision="int8", text_precision="fp32"))
    images = [picture(seed, (120, 90)) for seed in range(12)]
    a, b = fp32.encode_images(images), int8.encode_images(images)
    assert a.shape == b.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= 0.99
    texts = ["a dog on a beach", "red car", "an old photograph of a church in the snow"]
    assert np.array_equal(fp32.encode_texts(texts), int8.encode_texts(texts))
    quantize_int8(int8._model, towers=("text",))
    ta, tb = fp32.encode_texts(texts), int8.encode_texts(texts)
    assert np.min(np.sum(ta * tb, axis=1)) >= 0.99
    # Same model identity: switching precision is not a model change (no re-embed needed).
    assert fp32.identity == int8.identity


def test_text_precision_setting(monkeypatch):
    monkeypatch.delenv("CLIPGALLERY_TEXT_PRECISION", raising=False)
    assert Settings().text_precision == "auto" and load_settings().text_precision == "auto"
    monkeypatch.setenv("CLIPGALLERY_TEXT_PRECISION", "BF16")
    assert load_settings().text_precision == "bf16"
    monkeypatch.setenv("CLIPGALLERY_TEXT_PRECISION", "int8")
    assert load_settings().text_precision == "int8"
    monkeypatch.setenv("CLIPGALLERY_TEXT_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="CLIPGALLERY_TEXT_PRECISION"):
        load_settings()
    assert resolve_precision("fp32", "text") == "fp32" and resolve_precision("bf16", "text") == "bf16"
    assert resolve_precision("auto", "text") in ("fp32", "bf16", "int8")
    assert resolve_precision("auto", "image") in ("fp32", "bf16", "int8")


@pytest.mark.parametrize(
    ("bf16", "amx", "vnni", "avx2", "vit", "resnet", "text"),
    [
        (True, True, True, True, "bf16", "bf16", "int8"),  # Intel Sapphire Rapids and later
        (True, False, True, True, "int8", "bf16", "int8"),  # AMD Zen 4, Intel Cooper Lake
        (False, False, True, True, "int8", "fp32", "int8"),  # AVX512-VNNI / AVX-VNNI without bf16
        (True, False, False, True, "bf16", "bf16", "bf16"),  # bf16 without int8 dot products
        (False, False, False, True, "int8", "fp32", "int8"),  # plain AVX2: AMD Zen 2/3, Intel Haswell to Skylake
        (False, False, False, False, "fp32", "fp32", "fp32"),  # not x86
    ],
)
def test_auto_precision_follows_the_cpu_and_the_tower(monkeypatch, bf16, amx, vnni, avx2, vit, resnet, text):
    """Each tower gets what is fastest on the CPU: batches of images are arithmetic-bound (AMX bf16;
    else VNNI int8 for a ViT, whose time is in Linear layers, and bf16 for a ResNet, whose
    convolutions int8 leaves alone; on plain AVX2 int8 still halves a ViT's fp32 time), a single
    text query weight-bound (int8 streams a quarter of fp32's bytes, bf16 half; "auto" then checks
    int8 on the model: `int8_text_if_faithful`)."""
    import clipgallery.towers as towers

    features = {"amx_tile": amx, "vnni": vnni, "avx2": avx2}
    monkeypatch.setattr(towers, "native_bf16", lambda: bf16)
    monkeypatch.setattr(towers, "_has_cpu_feature", lambda name: features[name])
    assert resolve_precision("auto", "image", transformer=True) == vit
    assert resolve_precision("auto", "image", transformer=False) == resnet
    assert resolve_precision("auto", "text") == text
    assert resolve_precision("fp32", "image") == "fp32"


TEXTS = ["a dog on a beach", "red car", "", "an old photograph of a church in the snow " * 3, "sneakers"]


def _no_float_linear_left(modules) -> bool:
    """No fp32 Linear (bf16 ones are packed, or plain in a traced image tower) and no
    nn.MultiheadAttention (it wants one dtype for weights and masks)."""
    return not any(
        (type(m) is torch.nn.Linear and m.weight.dtype != torch.bfloat16) or isinstance(m, torch.nn.MultiheadAttention)
        for m in modules
    )


def _fused_blocks(modules) -> int:
    return sum(type(m).__name__ == "FusedBf16Block" for m in modules)


@needs_native_bf16
def test_bf16_towers_stay_close_to_fp32_each_on_its_own(tiny_model_dir):
    def embedder(image: str, text: str) -> Embedder:
        return Embedder(Settings(model_name=str(tiny_model_dir), precision=image, text_precision=text))

    fp32, text_bf16, image_bf16 = embedder("fp32", "fp32"), embedder("fp32", "bf16"), embedder("bf16", "fp32")
    a, b = fp32.encode_texts(TEXTS), text_bf16.encode_texts(TEXTS)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    one_by_one = np.stack([text_bf16.encode_text(t) for t in TEXTS])
    assert np.min(np.sum(one_by_one * b, axis=1)) >= 0.999
    assert np.array_equal(fp32.encode_texts(TEXTS), image_bf16.encode_texts(TEXTS))  # text tower untouched

    images = [picture(seed, (120, 90)) for seed in range(6)]
    x, y = fp32.encode_images(images), image_bf16.encode_images(images)
    assert y.dtype == np.float32 and np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(x * y, axis=1)) >= 0.999
    assert np.array_equal(x, text_bf16.encode_images(images))  # image tower untouched
    singles = np.concatenate([image_bf16.encode_images([i]) for i in images])
    assert np.min(np.sum(singles * y, axis=1)) >= 0.999

    model = text_bf16._model
    assert _no_float_linear_left(m for name, m in model.named_modules() if not name.startswith("visual"))
    assert next(model.visual.parameters()).dtype == torch.float32
    assert _no_float_linear_left(image_bf16._model.visual.modules())
    # The image tower's blocks run with GELU and residual additions fused into their Linear layers
    # (batches gain; single text queries do not, so the text tower keeps plain blocks).
    assert _fused_blocks(image_bf16._model.visual.modules()) == len(image_bf16._model.visual.transformer.resblocks)
    assert _fused_blocks(model.modules()) == 0
    assert isinstance(image_bf16._image_tower, torch.jit.ScriptModule)  # traced: no GIL per operation
    # Same model identity: precision is not a model change (no re-embed needed).
    assert fp32.identity == text_bf16.identity == image_bf16.identity


def test_bf16_by_name_runs_emulated_on_a_cpu_without_native_bf16(tiny_model_dir, monkeypatch, caplog):
    """CLIPGALLERY_PRECISION=bf16 on a CPU whose oneDNN cannot pack bf16 weights (plain AVX2, e.g.
    AMD Zen 3): the model still loads, with plain bf16 layers and a warning, instead of failing."""
    import clipgallery.towers as towers

    monkeypatch.setattr(towers, "native_bf16", lambda: False)
    fp32 = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32", text_precision="fp32"))
    bf16 = Embedder(Settings(model_name=str(tiny_model_dir), precision="bf16", text_precision="bf16"))
    with caplog.at_level("WARNING", logger="clipgallery.towers"):
        assert bf16.precisions == ("bf16", "bf16")
    assert "no native bf16" in caplog.text
    assert np.min(np.sum(fp32.encode_texts(TEXTS) * bf16.encode_texts(TEXTS), axis=1)) >= 0.999
    images = [picture(seed, (120, 90)) for seed in range(4)]
    assert np.min(np.sum(fp32.encode_images(images) * bf16.encode_images(images), axis=1)) >= 0.999
    layers = [m for m in bf16._model.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert not any(type(m).__name__ in ("PackedBf16Linear", "FusedBf16Block") for m in bf16._model.modules())


@needs_native_bf16
def test_bf16_vit_b_32_keeps_its_vectors():
    """Full-size towers (random weights, seeded): what the shipped default runs on CPUs with bf16."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    pixels = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        text_reference = torch.nn.functional.normalize(encode_text_to_end_token(model, tokens), dim=-1)
        image_reference = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        to_bf16(model)
        assert _fused_blocks(model.visual.modules()) == 12 and _fused_blocks(model.modules()) == 12
        text = torch.nn.functional.normalize(encode_text_to_end_token(model, tokens).float(), dim=-1)
        text_full = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        image = torch.nn.functional.normalize(model.encode_image(pixels.bfloat16()).float(), dim=-1)
    assert float((text_reference * text).sum(-1).min()) >= 0.9995
    assert float((text * text_full).sum(-1).min()) >= 0.9995
    assert float((image_reference * image).sum(-1).min()) >= 0.9995


@pytest.mark.parametrize(
    "precision",
    ["int8", pytest.param("bf16", marks=needs_native_bf16)],
)
def test_reduced_precision_keeps_resnet_attention_pooling_working(tmp_path, precision):
    """ResNet towers' attention pooling reads its q/k/v layers' weights directly: they stay plain."""
    from clipgallery.embedding import create_random_model_dir

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model_dir = create_random_model_dir(tmp_path / "rn", "tiny-rn", cfg, seed=3)
    fp32 = Embedder(Settings(model_name=str(model_dir), precision="fp32"))
    reduced = Embedder(Settings(model_name=str(model_dir), precision=precision))
    images = [picture(seed, (80, 80)) for seed in range(6)]
    assert np.min(np.sum(fp32.encode_images(images) * reduced.encode_images(images), axis=1)) >= 0.99


def test_towers_that_cannot_be_traced_run_eagerly(tiny_model_dir, monkeypatch, caplog):
    """Tracing is an optimisation: a tower the tracer cannot follow is run eagerly (bf16 with its
    Linear layers packed, as without tracing), with a warning, and gives the same vectors."""
    images = [picture(seed, (120, 90)) for seed in range(3)]
    texts = ["a dog", "a red dress with long sleeves", ""]
    precision = "bf16" if native_bf16() else "fp32"
    traced = Embedder(Settings(model_name=str(tiny_model_dir), precision=precision))
    expected = traced.encode_images(images)
    expected_texts = traced.encode_texts(texts)
    assert isinstance(traced._text_tower, torch.jit.ScriptModule)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported input list type")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    eager = Embedder(Settings(model_name=str(tiny_model_dir), precision=precision))
    vectors = eager.encode_images(images)
    assert eager._image_tower is eager._model.visual
    assert not isinstance(eager._text_tower, torch.jit.ScriptModule)
    assert "image tower could not be traced" in caplog.text and "text tower could not be traced" in caplog.text
    assert np.min(np.sum(expected_texts * eager.encode_texts(texts), axis=1)) >= 0.9999
    if precision == "bf16":
        assert not any(type(m) is torch.nn.Linear for m in eager._model.visual.modules())  # packed
    assert np.min(np.sum(expected * vectors, axis=1)) >= 0.9999


def test_fused_tensor_conversion_gives_torchvisions_values():
    """Preprocessing's ToTensor + Normalize done as one multiply-add: the same tensors for
    images of any size and mode (grey and RGBA are converted to RGB before it), and pipelines of
    any other shape are left as they are."""
    import open_clip
    from PIL import Image
    from torchvision import transforms

    preprocess = open_clip.image_transform(224, is_train=False)
    fused = fused_tensor_conversion(preprocess)
    assert fused is not preprocess
    rng = np.random.default_rng(0)
    for (width, height), mode in [((300, 200), "RGB"), ((224, 224), "RGB"), ((100, 400), "L"), ((50, 60), "RGBA")]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        expected, got = preprocess(image), fused(image)
        assert got.shape == expected.shape == (3, 224, 224) and got.dtype == torch.float32
        assert float((got - expected).abs().max()) < 1e-5
    other = transforms.Compose([transforms.Resize(8), transforms.PILToTensor()])
    assert fused_tensor_conversion(other) is other


@needs_native_bf16
@pytest.mark.parametrize(
    ("vision_extra", "fused"),
    [({}, 2), ({"ls_init_value": 0.1}, 0)],  # layer scale: blocks left as they are
)
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_fused_image_blocks_keep_the_vectors_of_any_activation(vision_extra, fused, quick_gelu):
    """QuickGELU (OpenAI's weights) runs beside the fused Linear layers; exact GELU inside them."""
    import open_clip

    torch.manual_seed(0)
    cfg = {
        "embed_dim": 32,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, **vision_extra},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.model.CLIP(**cfg).eval()
    pixels = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        to_bf16(model, towers=("image",))
        assert _fused_blocks(model.visual.modules()) == fused
        image = torch.nn.functional.normalize(model.encode_image(pixels.bfloat16()).float(), dim=-1)
    assert float((reference * image).sum(-1).min()) >= 0.999


def _auto_picks_int8(monkeypatch, towers: tuple[str, ...] = ("image",)) -> None:
    """The "auto" setting resolves to int8 for `towers` whatever the CPU (then checked on the model)."""
    import clipgallery.embedding as embedding

    real = embedding.resolve_precision
    monkeypatch.setattr(
        embedding,
        "resolve_precision",
        lambda requested, tower="image", transformer=True: (
            "int8" if requested == "auto" and tower in towers else real(requested, tower, transformer)
        ),
    )


def test_auto_keeps_the_int8_image_tower_only_where_it_stays_close_to_fp32(tiny_model_dir, monkeypatch, caplog):
    """Before "auto" keeps int8 it compares the tower with fp32 on probe pictures: a trained
    transformer with outlier activations can move far under int8 (MiniLM: cosine 0.91)."""
    import clipgallery.towers as towers

    _auto_picks_int8(monkeypatch)
    images = [picture(seed, (120, 90)) for seed in range(4)]
    kept = Embedder(Settings(model_name=str(tiny_model_dir)))
    assert kept.precisions[0] == "int8"
    assert not any(isinstance(m, torch.nn.Conv2d) for m in kept._model.visual.modules())

    monkeypatch.setattr(towers, "INT8_AUTO_MIN_COSINE", 1.01)  # no int8 tower can pass this
    caplog.set_level("WARNING", logger="clipgallery.towers")
    refused = Embedder(Settings(model_name=str(tiny_model_dir)))
    fallback = refused.precisions[0]
    assert fallback == ("bf16" if native_bf16() else "fp32")
    assert "the int8 image tower moved this model's vectors too far" in caplog.text
    same = Embedder(Settings(model_name=str(tiny_model_dir), precision=fallback))
    assert np.array_equal(refused.encode_images(images), same.encode_images(images))
    # Asked for by name, int8 is applied without the check.
    assert Embedder(Settings(model_name=str(tiny_model_dir), precision="int8")).precisions[0] == "int8"


def test_auto_keeps_the_int8_text_tower_only_where_it_stays_close_to_fp32(tiny_model_dir, monkeypatch, caplog):
    """Like the image tower's check, on probe queries: MiniLM's text vectors move far under int8
    (top-10 overlap with fp32 0.74), a CLIP text tower's hardly at all."""
    import clipgallery.towers as towers

    monkeypatch.setattr(towers, "_has_cpu_feature", lambda name: name == "vnni")  # auto picks int8 text
    fp32 = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32", text_precision="fp32"))
    kept = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32"))
    kept.load()
    assert kept._precisions[1] == "int8"
    text_side = [m for name, m in kept._model.named_modules() if not name.startswith("visual")]
    assert any(hasattr(m, "_packed_params") for m in text_side)  # quantised Linear layers
    assert not any(type(m) is torch.nn.Linear for m in text_side)
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in kept._model.visual.modules())
    a, b = fp32.encode_texts(TEXTS), kept.encode_texts(TEXTS)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= towers.INT8_TEXT_AUTO_MIN_COSINE
    assert isinstance(kept._text_tower, torch.jit.ScriptModule)  # the int8 tower is traced too
    images = [picture(seed, (120, 90)) for seed in range(3)]
    assert np.array_equal(fp32.encode_images(images), kept.encode_images(images))  # image tower untouched

    monkeypatch.setattr(towers, "INT8_TEXT_AUTO_MIN_COSINE", 1.01)  # no int8 tower can pass this
    caplog.set_level("INFO", logger="clipgallery.towers")
    refused = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32"))
    refused.load()
    fallback = refused._precisions[1]
    assert fallback == ("bf16" if native_bf16() else "fp32")
    assert "the int8 text tower moved this model's vectors too far" in caplog.text
    same = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32", text_precision=fallback))
    assert np.array_equal(refused.encode_texts(TEXTS), same.encode_texts(TEXTS))
    assert np.array_equal(refused.encode_images(images), same.encode_images(images))
    # Asked for by name, int8 is applied without the check.
    named = Embedder(Settings(model_name=str(tiny_model_dir), precision="fp32", text_precision="int8"))
    named.load()
    assert named._precisions[1] == "int8"


REMEMBERED = "found by an earlier load's check of this model"


def test_an_int8_check_is_remembered_per_model_code_libraries_and_cpu(
    tiny_model_dir, other_model_dir, tmp_path, monkeypatch, caplog
):
    """The int8 checks' findings (least cosine to fp32) are remembered in the state directory, so
    the next load of the same weights skips the probe passes and gets the same towers: the same
    vectors, bit for bit. Another model, a damaged file or a changed threshold is handled as if
    nothing were remembered, or held against the threshold in force."""
    import json

    import clipgallery.towers as towers
    from clipgallery.precision_checks import CHECKS_FILE

    _auto_picks_int8(monkeypatch, ("image", "text"))
    caplog.set_level("INFO", logger="clipgallery.towers")
    settings = Settings(model_name=str(tiny_model_dir), state_dir=tmp_path / "state")
    images = [picture(seed, (120, 90)) for seed in range(3)]

    def loaded(settings: Settings) -> tuple[Embedder, str]:
        caplog.clear()
        embedder = Embedder(settings)
        embedder.load_image_tower()
        return embedder, caplog.text

    first, log_text = loaded(settings)
    assert first.precisions == ("int8", "int8") and REMEMBERED not in log_text
    findings = json.loads((tmp_path / "state" / CHECKS_FILE).read_text())
    assert len(findings) == 2 and all(0.99 < value <= 1.0001 for value in findings.values())

    again, log_text = loaded(settings)
    assert log_text.count(REMEMBERED) == 2  # both towers: no probe pass this time
    assert again.precisions == ("int8", "int8")
    assert np.array_equal(first.encode_images(images), again.encode_images(images))
    assert np.array_equal(first.encode_texts(TEXTS), again.encode_texts(TEXTS))

    _, log_text = loaded(settings.with_overrides(model_name=str(other_model_dir)))
    assert REMEMBERED not in log_text  # other weights: checked, and remembered beside the first
    assert len(json.loads((tmp_path / "state" / CHECKS_FILE).read_text())) == 4

    monkeypatch.setattr(towers, "INT8_AUTO_MIN_COSINE", 1.01)  # the remembered cosine is held against it
    refused, log_text = loaded(settings)
    assert refused.precisions[0] == ("bf16" if native_bf16() else "fp32")
    assert "the int8 image tower moved this model's vectors too far" in log_text and REMEMBERED in log_text
    monkeypatch.undo()

    _auto_picks_int8(monkeypatch, ("image", "text"))
    (tmp_path / "state" / CHECKS_FILE).write_text("{not json")
    damaged, log_text = loaded(settings)
    assert damaged.precisions == ("int8", "int8") and REMEMBERED not in log_text
    assert len(json.loads((tmp_path / "state" / CHECKS_FILE).read_text())) == 2  # written anew


def test_only_content_identified_weights_are_remembered(tmp_path):
    from clipgallery.precision_checks import RememberedChecks

    assert RememberedChecks.for_model(tmp_path, "laion2b_s34b_b79k", "ViT-B-32", None) is None
    assert RememberedChecks.for_model(tmp_path, "random", "ViT-B-32", None) is None
    checks = RememberedChecks.for_model(tmp_path, "sha256:" + "0" * 64, "ViT-B-32", None)
    assert checks is not None and checks.closeness("image") is None
    checks.remember("image", 0.9995)
    assert checks.closeness("image") == 0.9995 and checks.closeness("text") is None
    other = RememberedChecks.for_model(tmp_path, "sha256:" + "1" * 64, "ViT-B-32", None)
    assert other.closeness("image") is None


def test_probe_pictures_are_fixed_and_varied():
    first, again = probe_pictures(), probe_pictures()
    assert [np.asarray(p).tobytes() for p in first] == [np.asarray(p).tobytes() for p in again]
    assert len({np.asarray(p).tobytes() for p in first}) == len(first)
    assert all(np.asarray(p).std() > 20 for p in first)
