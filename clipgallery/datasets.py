"""Labelled image sets for evaluation and training: loaders, and seeded stratified splits.

Three layouts are understood:

- a labels CSV (one row per image, a file column and a label column), e.g.
  ``evaldata/fashion_products/labels.csv`` with ``label_column="articleType"``;
- a folder of class folders, ``root/<class>/<image>``;
- a captions CSV (columns ``image``, ``caption``; several rows per image give one item with
  several captions).

Evaluation also reads a queries CSV (`load_queries_csv`): free-text queries, each with the label
whose images it should find (e.g. ``docs/queries/fashion_label_free.csv``: ``query,class``).

Every item has a ``key``: the image's path relative to the images directory (the CSV's
``images/`` folder, or the class-folder root), with forward slashes. Keys are what split files
store, so the same split works for the CSV and the folder view of one set (imagenette's
``labels.csv`` names ``n01440764/x.JPEG``, which is also its class-folder key).

This module is deliberately light (standard library only): the trainer and the evaluator
both import it, and neither should pay for torch or SQL just to read a CSV.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Same allow-list as bulk indexing (clipgallery.bulk.IMAGE_SUFFIXES), repeated here so that
# importing this module does not import the model and database layers.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif"})
FILE_COLUMNS = ("filename", "file", "path", "image")
SIDES = ("train", "test")


@dataclass(frozen=True)
class LabelledImage:
    key: str  # path relative to the images directory, posix: the id used by split files
    path: Path  # absolute path of the image file
    label: str | None  # class (None for caption-only sets)
    captions: tuple[str, ...] = ()  # zero or more captions
    metadata: dict[str, str] = field(default_factory=dict, hash=False, compare=False)  # the CSV row


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: no such file")
    # utf-8-sig: spreadsheets often write a byte-order mark that would otherwise stick to the
    # first column name.
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise ValueError(f"{csv_path}: empty file, expected a header row")
        columns = [c.strip() for c in reader.fieldnames]
        rows = []
        for row in reader:
            # A short row leaves None values; a long one puts extras under the None key.
            rows.append({c.strip(): (v or "").strip() for c, v in row.items() if c is not None})
    return columns, rows


def _key_for(images_dir: Path, relative: str, csv_path: Path, line: int) -> tuple[str, Path]:
    relative = relative.replace("\\", "/").strip()
    if not relative:
        raise ValueError(f"{csv_path}, line {line}: empty file name")
    path = (images_dir / relative).resolve()
    root = images_dir.resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{csv_path}, line {line}: {relative!r} points outside {images_dir}")
    return path.relative_to(root).as_posix(), path


def _check_files_exist(items: list[LabelledImage], csv_path: Path, images_dir: Path) -> None:
    missing = [item.key for item in items if not item.path.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ValueError(f"{csv_path}: {len(missing)} image file(s) missing under {images_dir}: {shown}")


def _pick_file_column(columns: list[str], file_column: str | None, csv_path: Path) -> str:
    if file_column is not None:
        if file_column not in columns:
            raise ValueError(f"{csv_path}: no column {file_column!r}; columns are {', '.join(columns)}")
        return file_column
    for candidate in FILE_COLUMNS:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"{csv_path}: no file column (looked for {', '.join(FILE_COLUMNS)}); columns are {', '.join(columns)}"
    )


def load_labels_csv(
    csv_path: Path,
    label_column: str,
    images_dir: Path | None = None,
    file_column: str | None = None,
) -> list[LabelledImage]:
    """One item per CSV row, labelled by `label_column`, in file order.

    `images_dir` defaults to ``csv_path.parent / "images"``; `file_column` to the first of
    filename/file/path/image that exists. Missing columns, empty labels, duplicate files and
    missing image files raise ValueError naming the problem.
    """
    csv_path = Path(csv_path)
    images_dir = Path(images_dir) if images_dir is not None else csv_path.parent / "images"
    columns, rows = _read_csv(csv_path)
    if label_column not in columns:
        raise ValueError(f"{csv_path}: no label column {label_column!r}; columns are {', '.join(columns)}")
    file_col = _pick_file_column(columns, file_column, csv_path)
    items: list[LabelledImage] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        key, path = _key_for(images_dir, row[file_col], csv_path, line)
        label = row[label_column]
        if not label:
            raise ValueError(f"{csv_path}, line {line}: empty {label_column!r} for {key}")
        if key in seen:
            raise ValueError(f"{csv_path}, line {line}: {key} is listed twice")
        seen.add(key)
        items.append(LabelledImage(key=key, path=path, label=label, captions=(), metadata=dict(row)))
    if not items:
        raise ValueError(f"{csv_path}: no rows")
    _check_files_exist(items, csv_path, images_dir)
    return items


def load_class_folders(root: Path) -> list[LabelledImage]:
    """``root/<class>/<image>``: the folder name is the label. Sorted by key.

    Images nested deeper inside a class folder belong to that class; files directly in `root`
    and hidden files/folders are ignored (they have no class).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    items: list[LabelledImage] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            relative = path.relative_to(root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append(
                    LabelledImage(key=relative.as_posix(), path=path, label=class_dir.name, captions=(), metadata={})
                )
    if not items:
        raise ValueError(f"{root}: no images in class folders (expected {root}/<class>/<image>)")
    items.sort(key=lambda item: item.key)
    return items


def load_captions_csv(csv_path: Path, images_dir: Path | None = None) -> list[LabelledImage]:
    """Columns ``image`` and ``caption``; several rows for one image make one item with several
    captions (in file order). Items come in order of first appearance; `label` is None and
    `metadata` is the image's first row without the caption."""
    csv_path = Path(csv_path)
    images_dir = Path(images_dir) if images_dir is not None else csv_path.parent / "images"
    columns, rows = _read_csv(csv_path)
    if "caption" not in columns:
        raise ValueError(f"{csv_path}: no 'caption' column; columns are {', '.join(columns)}")
    file_col = _pick_file_column(columns, "image" if "image" in columns else None, csv_path)
    captions: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    metadata: dict[str, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        key, path = _key_for(images_dir, row[file_col], csv_path, line)
        caption = row["caption"]
        if not caption:
            raise ValueError(f"{csv_path}, line {line}: empty caption for {key}")
        if key not in captions:
            captions[key], paths[key] = [], path
            metadata[key] = {c: v for c, v in row.items() if c != "caption"}
        captions[key].append(caption)
    items = [
        LabelledImage(key=k, path=paths[k], label=None, captions=tuple(c), metadata=metadata[k])
        for k, c in captions.items()
    ]
    if not items:
        raise ValueError(f"{csv_path}: no rows")
    _check_files_exist(items, csv_path, images_dir)
    return items


def load_dataset(source: Path, label_column: str | None = None, captions: bool = False) -> list[LabelledImage]:
    """A folder is read as class folders; a CSV as a captions file (`captions=True`) or a labels
    file (then `label_column` is required)."""
    source = Path(source)
    if source.is_dir():
        if captions:
            raise ValueError(f"{source}: a folder is read as class folders; captions need a CSV (image, caption)")
        return load_class_folders(source)
    if not source.is_file():
        raise ValueError(f"{source}: no such file or folder")
    if captions:
        return load_captions_csv(source)
    if not label_column:
        raise ValueError(f"{source}: a labels CSV needs a label column (e.g. --label-column articleType)")
    return load_labels_csv(source, label_column)


QUERY_COLUMNS = ("query", "text")
QUERY_LABEL_COLUMNS = ("label", "class")


@dataclass(frozen=True)
class LabelledQuery:
    """A free-text query and the label whose images it should find (from a queries CSV)."""

    text: str
    label: str
    line: int  # in the CSV (the header is line 1)


def _pick_column(
    columns: list[str], given: str | None, candidates: Sequence[str], what: str, option: str, path: Path
) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{path}: no {what} column {given!r} ({option}); columns are {', '.join(columns)}")
        return given
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"{path}: no {what} column (looked for {', '.join(candidates)}; name it with {option}); "
        f"columns are {', '.join(columns)}"
    )


def load_query_texts(csv_path: Path, query_column: str | None = None, option: str = "--query-column") -> list[str]:
    """The distinct free-text queries of a queries CSV (the query column as `load_queries_csv`
    picks it; labels, if any, are not needed), in file order. `option`: the command-line option
    that names the column, for the error message."""
    csv_path = Path(csv_path)
    columns, rows = _read_csv(csv_path)
    q_col = _pick_column(columns, query_column, QUERY_COLUMNS, "query", option, csv_path)
    texts = dict.fromkeys(t for t in (" ".join(row[q_col].split()) for row in rows) if t)
    if not texts:
        raise ValueError(f"{csv_path}: no queries")
    return list(texts)


def load_queries_csv(
    csv_path: Path,
    query_column: str | None = None,
    label_column: str | None = None,
    extra_label_columns: Sequence[str] = (),
) -> list[LabelledQuery]:
    """Free-text queries with the label each should find, e.g. ``docs/queries/fashion_label_free.csv``
    (columns ``query,class``).

    The query column defaults to the first of query/text, the label column to the first of
    label/class and then `extra_label_columns` (the set's own label column, e.g. articleType).
    Whitespace inside a query is collapsed. Missing columns, empty cells and repeated rows raise
    ValueError naming the file and line."""
    csv_path = Path(csv_path)
    columns, rows = _read_csv(csv_path)
    q_col = _pick_column(columns, query_column, QUERY_COLUMNS, "query", "--query-column", csv_path)
    l_col = _pick_column(
        columns,
        label_column,
        [*QUERY_LABEL_COLUMNS, *(c for c in extra_label_columns if c)],
        "label",
        "--query-label-column",
        csv_path,
    )
    if q_col == l_col:
        raise ValueError(f"{csv_path}: the query and the label column are both {q_col!r}")
    queries: list[LabelledQuery] = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):
        text, label = " ".join(row[q_col].split()), row[l_col]
        if not text:
            raise ValueError(f"{csv_path}, line {line}: empty query ({q_col!r})")
        if not label:
            raise ValueError(f"{csv_path}, line {line}: empty label ({l_col!r}) for query {text!r}")
        if (text, label) in seen:
            raise ValueError(f"{csv_path}, line {line}: repeats line {seen[text, label]} ({text!r}, {label!r})")
        seen[text, label] = line
        queries.append(LabelledQuery(text, label, line))
    if not queries:
        raise ValueError(f"{csv_path}: no queries")
    return queries


def _group_seed(seed: int, label: str | None) -> int:
    # A stable per-label seed (not Python's salted hash()): each class's split depends only on
    # the seed, the class name and that class's keys, so adding a class elsewhere in the set
    # does not reshuffle this one.
    digest = hashlib.sha256(f"{seed}\x00{label!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def stratified_split(items: list[LabelledImage], test_fraction: float = 0.2, seed: int = 0) -> dict[str, str]:
    """key -> "train" | "test", drawn per label with a seeded shuffle.

    Each label gets round(n * test_fraction) test items, clamped so that a label with at least
    two items has at least one on each side (a one-item label stays in train). Items without a
    label (caption sets) are split as one group. The result does not depend on input order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    groups: dict[str | None, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for item in items:
        if item.key in seen:
            raise ValueError(f"duplicate key {item.key!r}")
        seen.add(item.key)
        groups[item.label].append(item.key)
    split: dict[str, str] = {}
    for label, keys in groups.items():
        keys = sorted(keys)
        random.Random(_group_seed(seed, label)).shuffle(keys)
        n = len(keys)
        n_test = 0 if n < 2 else min(max(round(n * test_fraction), 1), n - 1)
        for i, key in enumerate(keys):
            split[key] = "test" if i < n_test else "train"
    return {key: split[key] for key in sorted(split)}


def write_split(split: dict[str, str], path: Path) -> None:
    """CSV with header ``key,split``, sorted by key (diff-friendly, committed to the repo)."""
    bad = {side for side in split.values() if side not in SIDES}
    if bad:
        raise ValueError(f"split sides must be {' or '.join(SIDES)}, got {', '.join(sorted(bad))}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["key", "split"])
        for key in sorted(split):
            writer.writerow([key, split[key]])


def read_split(path: Path) -> dict[str, str]:
    path = Path(path)
    columns, rows = _read_csv(path)
    if columns[:2] != ["key", "split"]:
        raise ValueError(f"{path}: expected a header 'key,split', got {','.join(columns)}")
    split: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        if row["split"] not in SIDES:
            raise ValueError(f"{path}, line {line}: split must be {' or '.join(SIDES)}, got {row['split']!r}")
        if row["key"] in split:
            raise ValueError(f"{path}, line {line}: {row['key']} is listed twice")
        split[row["key"]] = row["split"]
    return split


def select(items: list[LabelledImage], split: dict[str, str], side: str) -> list[LabelledImage]:
    """The items on `side` of `split`, in their original order.

    Every item must appear in the split: an item the split does not know means the split was
    written for another set (or another key layout), and silently dropping it would skew results.
    Keys of the split that are not among `items` are allowed (e.g. a subset was loaded).
    """
    if side not in SIDES:
        raise ValueError(f"side must be {' or '.join(SIDES)}, got {side!r}")
    unknown = [item.key for item in items if item.key not in split]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} item(s) are not in the split (was it written for this set?): {shown}")
    return [item for item in items if split[item.key] == side]
