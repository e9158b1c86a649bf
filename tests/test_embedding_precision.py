"""CLIPGALLERY_PRECISION: int8 dynamic quantisation stays close to fp32; fp32 stays the default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipgallery.config import ConfigError, Settings, load_settings
from clipgallery.embedding import Embedder, _self_attention_module, quantize_int8
from tests.conftest import picture


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
    embedder = Embedder(Settings(model_name=str(tiny_model_dir), precision="int8"))
    embedder.load()
    model = embedder._model
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == []
    # Idempotent on an already quantised model.
    quantize_int8(model)


def test_int8_vectors_are_close_to_fp32(tiny_model_dir):
    fp32 = Embedder(Settings(model_name=str(tiny_model_dir)))
    int8 = Embedder(Settings(model_name=str(tiny_model_dir), precision="int8"))
    images = [picture(seed, (120, 90)) for seed in range(12)]
    a, b = fp32.encode_images(images), int8.encode_images(images)
    assert a.shape == b.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= 0.99
    texts = ["a dog on a beach", "red car", "an old photograph of a church in the snow"]
    ta, tb = fp32.encode_texts(texts), int8.encode_texts(texts)
    assert np.min(np.sum(ta * tb, axis=1)) >= 0.99
    # Same model identity: switching precision is not a model change (no re-embed needed).
    assert fp32.identity == int8.identity
