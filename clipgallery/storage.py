"""Files on disk: content-addressed originals and thumbnails under the upload directory.

Layout (relative to `settings.upload_dir`):
    originals/ab/cd/<sha256>.<ext>     the served original (EXIF orientation applied, GPS removed)
    thumbs/ab/cd/<sha256>.jpg|.webp    grid thumbnail (CLIPGALLERY_THUMBNAIL_FORMAT)
Names come from the content hash only, never from a client.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
ORIGINALS = "originals"
THUMBS = "thumbs"


def _shard(sha256: str) -> Path:
    return Path(sha256[:2]) / sha256[2:4]


def original_relpath(sha256: str, mime_type: str) -> str:
    return str(Path(ORIGINALS) / _shard(sha256) / f"{sha256}.{EXTENSIONS[mime_type]}")


THUMBNAIL_EXTENSIONS = {"jpeg": "jpg", "webp": "webp"}


def thumbnail_relpath(sha256: str, thumbnail_format: str) -> str:
    return str(Path(THUMBS) / _shard(sha256) / f"{sha256}.{THUMBNAIL_EXTENSIONS[thumbnail_format]}")


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

    def delete(self, relpaths: Iterable[str]) -> None:
        for relpath in relpaths:
            self.path(relpath).unlink(missing_ok=True)

    def iter_files(self) -> Iterator[Path]:
        for sub in (ORIGINALS, THUMBS):
            base = self.root / sub
            if base.is_dir():
                yield from (p for p in base.rglob("*") if p.is_file())

    def sweep_orphans(self, known_relpaths: set[str], min_age_seconds: float = 600.0) -> list[str]:
        """Delete stored files no database row refers to (left by a process killed between
        writing a file and committing its row). Young files are spared: another process may be
        about to commit them."""
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
