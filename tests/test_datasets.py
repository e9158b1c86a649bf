"""Dataset loaders and splits, on tiny generated sets and on the shared fashion set."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from clipgallery.datasets import (
    LabelledImage,
    load_captions_csv,
    load_class_folders,
    load_dataset,
    load_labels_csv,
    read_split,
    select,
    stratified_split,
    write_split,
)

SHARED = Path(os.environ.get("CLIPGALLERY_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def _image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def labelled_csv(tmp_path) -> Path:
    for name in ("a.jpg", "b.jpg", "sub/c.png"):
        _image(tmp_path / "images" / name)
    return _csv(
        tmp_path / "labels.csv",
        ["id", "filename", "kind", "colour"],
        [["1", "a.jpg", "shoe", "red"], ["2", "b.jpg", "bag", "blue"], ["3", "sub/c.png", "shoe", "green"]],
    )


def test_labels_csv(labelled_csv):
    items = load_labels_csv(labelled_csv, "kind")
    assert [i.key for i in items] == ["a.jpg", "b.jpg", "sub/c.png"]
    assert [i.label for i in items] == ["shoe", "bag", "shoe"]
    assert items[2].path == (labelled_csv.parent / "images" / "sub" / "c.png").resolve()
    assert items[0].captions == ()
    assert items[1].metadata == {"id": "2", "filename": "b.jpg", "kind": "bag", "colour": "blue"}
    # Another label column of the same file, through the dispatcher.
    assert [i.label for i in load_dataset(labelled_csv, label_column="colour")] == ["red", "blue", "green"]


def test_labels_csv_explicit_dir_and_column(tmp_path):
    _image(tmp_path / "pics" / "x.jpg")
    csv_path = _csv(tmp_path / "l.csv", ["path", "pic", "y"], [["ignored", "x.jpg", "cat"]])
    items = load_labels_csv(csv_path, "y", images_dir=tmp_path / "pics", file_column="pic")
    assert items[0].key == "x.jpg" and items[0].label == "cat"


@pytest.mark.parametrize(
    ("header", "rows", "kwargs", "message"),
    [
        (["filename", "kind"], [["a.jpg", "shoe"]], {"label_column": "type"}, "no label column 'type'"),
        (["name", "kind"], [["a.jpg", "shoe"]], {"label_column": "kind"}, "no file column"),
        (["filename", "kind"], [["a.jpg", "shoe"]], {"label_column": "kind", "file_column": "f"}, "no column 'f'"),
        (["filename", "kind"], [["missing.jpg", "shoe"]], {"label_column": "kind"}, "1 image file(s) missing"),
        (["filename", "kind"], [["a.jpg", ""]], {"label_column": "kind"}, "line 2: empty 'kind'"),
        (["filename", "kind"], [["a.jpg", "x"], ["a.jpg", "y"]], {"label_column": "kind"}, "listed twice"),
        (["filename", "kind"], [["../a.jpg", "x"]], {"label_column": "kind"}, "points outside"),
        (["filename", "kind"], [], {"label_column": "kind"}, "no rows"),
    ],
)
def test_labels_csv_errors(tmp_path, header, rows, kwargs, message):
    _image(tmp_path / "images" / "a.jpg")
    _image(tmp_path / "a.jpg")
    csv_path = _csv(tmp_path / "labels.csv", header, rows)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_labels_csv(csv_path, **kwargs)


def test_class_folders(tmp_path):
    _image(tmp_path / "cats" / "1.jpg")
    _image(tmp_path / "cats" / "deep" / "2.png")
    _image(tmp_path / "dogs" / "3.jpeg")
    _image(tmp_path / "loose.jpg")  # no class: ignored
    _image(tmp_path / ".hidden" / "4.jpg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    items = load_dataset(tmp_path)
    assert [(i.key, i.label) for i in items] == [
        ("cats/1.jpg", "cats"),
        ("cats/deep/2.png", "cats"),
        ("dogs/3.jpeg", "dogs"),
    ]
    assert all(i.metadata == {} and i.path.is_absolute() for i in items)


def test_class_folders_empty(tmp_path):
    with pytest.raises(ValueError, match="no images in class folders"):
        load_class_folders(tmp_path)


def test_captions_csv(tmp_path):
    _image(tmp_path / "images" / "a.jpg")
    _image(tmp_path / "images" / "b.jpg")
    csv_path = _csv(
        tmp_path / "captions.csv",
        ["image", "caption"],
        [["b.jpg", "a blue bag"], ["a.jpg", "red shoes"], ["b.jpg", "handbag, blue"]],
    )
    items = load_dataset(csv_path, captions=True)
    assert [(i.key, i.label, i.captions) for i in items] == [
        ("b.jpg", None, ("a blue bag", "handbag, blue")),
        ("a.jpg", None, ("red shoes",)),
    ]
    assert items[0].metadata == {"image": "b.jpg"}
    assert load_captions_csv(csv_path, images_dir=tmp_path / "images") == items


def test_load_dataset_errors(tmp_path, labelled_csv):
    with pytest.raises(ValueError, match="needs a label column"):
        load_dataset(labelled_csv)
    with pytest.raises(ValueError, match="no 'caption' column"):
        load_dataset(labelled_csv, captions=True)
    with pytest.raises(ValueError, match="no such file or folder"):
        load_dataset(tmp_path / "nope.csv", label_column="x")
    with pytest.raises(ValueError, match="captions need a CSV"):
        load_dataset(tmp_path, captions=True)


def _items(sizes: dict[str, int]) -> list[LabelledImage]:
    return [
        LabelledImage(key=f"{label}/{i:03d}.jpg", path=Path(f"/x/{label}/{i:03d}.jpg"), label=label)
        for label, n in sizes.items()
        for i in range(n)
    ]


def test_stratified_split_proportions_and_guarantees():
    items = _items({"big": 100, "mid": 10, "pair": 2, "three": 3, "single": 1})
    split = stratified_split(items, test_fraction=0.2, seed=0)
    assert set(split) == {i.key for i in items}
    test_counts = Counter(key.split("/")[0] for key, side in split.items() if side == "test")
    assert test_counts == {"big": 20, "mid": 2, "pair": 1, "three": 1}
    assert split["single/000.jpg"] == "train"
    # Even a tiny fraction leaves at least one test item per class with two or more items,
    # and a large one at least one training item.
    assert Counter(k.split("/")[0] for k, s in stratified_split(items, 0.01).items() if s == "test")["mid"] == 1
    assert Counter(k.split("/")[0] for k, s in stratified_split(items, 0.99).items() if s == "train")["mid"] == 1


def test_stratified_split_seeded_and_order_independent():
    items = _items({"a": 30, "b": 30})
    first = stratified_split(items, seed=3)
    assert stratified_split(list(reversed(items)), seed=3) == first
    assert stratified_split(items, seed=4) != first
    # One class's split does not move when another class is added.
    more = stratified_split(_items({"a": 30, "b": 30, "c": 7}), seed=3)
    assert {k: v for k, v in more.items() if not k.startswith("c/")} == first


def test_stratified_split_rejects_bad_input():
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(_items({"a": 3}), test_fraction=1.0)
    with pytest.raises(ValueError, match="duplicate key"):
        stratified_split(_items({"a": 2}) * 2)


def test_unlabelled_items_split_as_one_group():
    items = [LabelledImage(key=f"{i}.jpg", path=Path(f"/x/{i}.jpg"), label=None, captions=("c",)) for i in range(10)]
    assert Counter(stratified_split(items, 0.3).values()) == {"train": 7, "test": 3}


def test_split_file_round_trip_and_select(tmp_path):
    items = _items({"a": 5, "b": 5})
    split = stratified_split(items, 0.4, seed=1)
    path = tmp_path / "splits" / "s.csv"
    write_split(split, path)
    assert path.read_text().splitlines()[0] == "key,split"
    assert read_split(path) == split
    test = select(items, split, "test")
    train = select(items, split, "train")
    assert len(test) == 4 and len(train) == 6
    assert {i.key for i in test} | {i.key for i in train} == {i.key for i in items}
    assert [i.key for i in test] == sorted(i.key for i in test)  # original order kept
    with pytest.raises(ValueError, match="side must be"):
        select(items, split, "val")
    with pytest.raises(ValueError, match="not in the split"):
        select([*items, *_items({"z": 1})], split, "test")


def test_read_split_errors(tmp_path):
    bad_header = _csv(tmp_path / "a.csv", ["file", "side"], [["x", "test"]])
    with pytest.raises(ValueError, match="header 'key,split'"):
        read_split(bad_header)
    bad_side = _csv(tmp_path / "b.csv", ["key", "split"], [["x", "val"]])
    with pytest.raises(ValueError, match="line 2: split must be"):
        read_split(bad_side)
    with pytest.raises(ValueError, match="sides must be"):
        write_split({"x": "val"}, tmp_path / "c.csv")


def test_real_fashion_labels():
    labels = SHARED / "evaldata" / "fashion_products" / "labels.csv"
    assert labels.is_file(), (
        f"{labels} not found: set CLIPGALLERY_SHARED_DIR to the folder holding evaldata/ (default ../shared)"
    )
    items = load_labels_csv(labels, label_column="articleType")
    assert len(items) == 3287
    assert len({i.label for i in items}) == 48
    assert items[0].key == "10000.jpg" and items[0].label == "Skirts"
    assert items[0].metadata["baseColour"] == "White"
