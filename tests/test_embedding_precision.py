"""CLIPGALLERY_PRECISION: int8 dynamic quantisation stays close to fp32; fp32 stays the default.
CLIPGALLERY_TEXT_PRECISION: the bf16 text tower stays close to fp32 and leaves images alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipgallery.config import ConfigError, Settings, load_settings
from clipgallery.embedding import (
    Embedder,
    _self_attention_module,
    encode_text_to_end_token,
    quantize_int8,
    resolve_text_precision,
    text_tower_bf16,
)
from tests.conftest import picture

needs_native_bf16 = pytest.mark.skipif(
    resolve_text_precision("auto") != "bf16", reason="this CPU has no native bf16 (the default stays fp32 there)"
)


def test_fp32_is_the_default_and_the_setting_is_parsed(monkeypatch):
    monkeypatch.delenv("CLIPGALLERY_PRECISION", raising=False)
    assert Settings().precision == "fp32"
    assert load_settings().precision == "fp32"
    monkeypatch.setenv("CLIPGALLERY_PRECISION", "INT8")
    assert load_settings().precision == "int8"
    monkeypatch.setenv("CLIPGALLERY_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="CLIPGALLERY_PRECISION"):
        load_settings()
    assert ("precision", "fp32") in Settings().describe()


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
    embedder = Embedder(Settings(model_name=str(tiny_model_dir), precision="int8", text_precision="fp32"))
    embedder.load()
    model = embedder._model
    visual = model.visual
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in visual.modules())
    assert [name for name, m in visual.named_modules() if type(m) is torch.nn.Linear] == []
    # The text tower stays fp32 (query vectors exactly as before) unless asked for.
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in model.transformer.modules())
    quantize_int8(model, towers=("text",))
    assert not any(type(m) is torch.nn.Linear for m in model.modules())


def test_int8_vectors_are_close_to_fp32(tiny_model_dir):
    fp32 = Embedder(Settings(model_name=str(tiny_model_dir), text_precision="fp32"))
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


def test_int8_keeps_resnet_attention_pooling_working(tmp_path):
    from clipgallery.embedding import create_random_model_dir

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model_dir = create_random_model_dir(tmp_path / "rn", "tiny-rn", cfg, seed=3)
    fp32 = Embedder(Settings(model_name=str(model_dir)))
    int8 = Embedder(Settings(model_name=str(model_dir), precision="int8"))
    images = [picture(seed, (80, 80)) for seed in range(6)]
    a, b = fp32.encode_images(images), int8.encode_images(images)
    assert np.min(np.sum(a * b, axis=1)) >= 0.99


def test_text_precision_setting(monkeypatch):
    monkeypatch.delenv("CLIPGALLERY_TEXT_PRECISION", raising=False)
    assert Settings().text_precision == "auto" and load_settings().text_precision == "auto"
    monkeypatch.setenv("CLIPGALLERY_TEXT_PRECISION", "BF16")
    assert load_settings().text_precision == "bf16"
    monkeypatch.setenv("CLIPGALLERY_TEXT_PRECISION", "int8")
    with pytest.raises(ConfigError, match="CLIPGALLERY_TEXT_PRECISION"):
        load_settings()
    assert resolve_text_precision("fp32") == "fp32" and resolve_text_precision("bf16") == "bf16"
    assert resolve_text_precision("auto") in ("fp32", "bf16")


TEXTS = ["a dog on a beach", "red car", "", "an old photograph of a church in the snow " * 3, "sneakers"]


@needs_native_bf16
def test_bf16_text_tower_stays_close_to_fp32_and_leaves_images_alone(tiny_model_dir):
    fp32 = Embedder(Settings(model_name=str(tiny_model_dir), text_precision="fp32"))
    bf16 = Embedder(Settings(model_name=str(tiny_model_dir), text_precision="bf16"))
    a, b = fp32.encode_texts(TEXTS), bf16.encode_texts(TEXTS)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    one_by_one = np.stack([bf16.encode_text(t) for t in TEXTS])
    assert np.min(np.sum(one_by_one * b, axis=1)) >= 0.999
    model = bf16._model
    text_side = [m for name, m in model.named_modules() if not name.startswith("visual")]
    assert not any(type(m) is torch.nn.Linear or isinstance(m, torch.nn.MultiheadAttention) for m in text_side)
    # The image tower is untouched: stored vectors do not change with the text precision.
    images = [picture(seed, (120, 90)) for seed in range(4)]
    assert np.array_equal(fp32.encode_images(images), bf16.encode_images(images))
    assert next(model.visual.parameters()).dtype == torch.float32
    assert fp32.identity == bf16.identity


@needs_native_bf16
def test_bf16_text_tower_of_vit_b_32_keeps_its_vectors():
    """Full-size tower (random weights, seeded): what the shipped default runs for every query."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tokens = tokenizer(TEXTS)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(encode_text_to_end_token(model, tokens), dim=-1)
        text_tower_bf16(model)
        ours = torch.nn.functional.normalize(encode_text_to_end_token(model, tokens).float(), dim=-1)
        also = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    assert float((reference * ours).sum(-1).min()) >= 0.9995
    assert float((ours * also).sum(-1).min()) >= 0.9995
