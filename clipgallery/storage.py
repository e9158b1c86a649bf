"""Files on disk: content-addressed originals and thumbnails under the upload directory.

Layout (relative to `settings.upload_dir`):
    originals/ab/cd/<sha256>.<ext>     the served original (EXIF orientation applied, GPS removed)
    thumbs/ab/cd/<sha256>.jpg|.webp    grid thumbnail (CLIPGALLERY_THUMBNAIL_FORMAT); none for an
                                       original that is its own (`imaging.original_serves_as_thumbnail`)
    .pending/<random>.json             files whose row is being written or deleted (see `pending`)
Names come from the content hash only, never from a client.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
ORIGINALS = "originals"
THUMBS = "thumbs"
PENDING = ".pending"
# A record younger than this may belong to a writer still at work (another process).
PENDING_MIN_AGE_SECONDS = 600.0


def _shard(sha256: str) -> Path:
    return Path(sha256[:2]) / sha256[2:4]


def original_relpath(sha256: str, mime_type: str) -> str:
    return str(Path(ORIGINALS) / _shard(sha256) / f"{sha256}.{EXTENSIONS[mime_type]}")


THUMBNAIL_EXTENSIONS = {"jpeg": "jpg", "webp": "webp"}


def thumbnail_relpath(sha256: str, thumbnail_format: str) -> str:
    return str(Path(THUMBS) / _shard(sha256) / f"{sha256}.{THUMBNAIL_EXTENSIONS[thumbnail_format]}")


def replace_file_text(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a small state file): written beside it and
    renamed over it, so a reader, or another process writing it at the same moment, never sees a
    mix. Raises OSError; the partial file does not outlive a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(text)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root

    @functools.cached_property
    def _resolved_root(self) -> Path:
        return self.root.resolve()

    def path(self, relpath: str) -> Path:
        resolved = (self.root / relpath).resolve()
        if self._resolved_root not in resolved.parents:
            raise ValueError(f"{relpath!r} is outside the upload directory")
        return resolved

    def write(self, relpath: str, data: bytes) -> bool:
        """Write atomically (temp file + rename). Returns False when the file was already there."""
        target = self.path(relpath)
        if target.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def is_file(self, relpath: str) -> bool:
        """Whether `relpath` is a stored file (False for a name outside the upload directory)."""
        try:
            return self.path(relpath).is_file()
        except ValueError:
            return False

    def delete(self, relpaths: Iterable[str]) -> None:
        for relpath in relpaths:
            self.path(relpath).unlink(missing_ok=True)

    @contextmanager
    def pending(self, relpaths: Iterable[str]) -> Iterator[None]:
        """Around writing files and committing the rows that refer to them, or committing a
        deletion and removing the files: the files' names are recorded on disk (flushed) first and
        the record is removed when the block ends, whether it succeeds or fails. So a record that
        outlives its process names the only files such a process can have left without a row
        (`stale_pending`), and finding them never needs a walk over every stored file."""
        relpaths = list(dict.fromkeys(relpaths))  # an original that is its own thumbnail is named twice
        if not relpaths:
            yield
            return
        folder = self.root / PENDING
        folder.mkdir(parents=True, exist_ok=True)
        record = folder / f"{secrets.token_hex(8)}.json"
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(relpaths, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            yield
        finally:
            record.unlink(missing_ok=True)

    def stale_pending(self, min_age_seconds: float = PENDING_MIN_AGE_SECONDS) -> list[tuple[Path, list[str]]]:
        """Records left by processes that ended inside `pending` (killed, or the machine lost
        power), with the files each names; those younger than `min_age_seconds` are left out."""
        folder = self.root / PENDING
        if not folder.is_dir():
            return []
        stale = []
        now = time.time()
        for record in folder.glob("*.json"):
            try:
                if now - record.stat().st_mtime < min_age_seconds:
                    continue
                relpaths = json.loads(record.read_text())
            except FileNotFoundError:
                continue
            except ValueError:  # cut short while being written: no file was written after it
                relpaths = []
            names = [p for p in relpaths if isinstance(p, str)] if isinstance(relpaths, list) else []
            stale.append((record, names))
        return stale

    def iter_files(self) -> Iterator[Path]:
        for sub in (ORIGINALS, THUMBS):
            base = self.root / sub
            if base.is_dir():
                yield from (p for p in base.rglob("*") if p.is_file())

    def sweep_orphans(self, known_relpaths: set[str], min_age_seconds: float = PENDING_MIN_AGE_SECONDS) -> list[str]:
        """Delete every stored file no database row refers to, walking them all (after restoring
        a database dump older than the files; a killed writer's files are found through
        `stale_pending` instead). Young files are spared: another process may be about to commit
        them."""
        removed = []
        now = time.time()
        for file in self.iter_files():
            relpath = str(file.relative_to(self.root))
            if relpath in known_relpaths:
                continue
            try:
                if now - file.stat().st_mtime < min_age_seconds:
                    continue
                file.unlink()
                removed.append(relpath)
            except FileNotFoundError:
                continue
        return removed
