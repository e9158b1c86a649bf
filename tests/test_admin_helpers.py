"""The admin pages' pure helpers: the login redirect target, the streamed-upload limits, job progress text."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from clipgallery.pages.admin_upload import UploadRefused, receive_files
from clipgallery.pages.session import safe_next
from clipgallery.server import reflex_env


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/admin/manage", "/admin/manage"),
        ("/search?q=dogs&k=20", "/search?q=dogs&k=20"),
        (None, "/"),
        ("", "/"),
        ("admin", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/login", "/"),
        ("/login/?next=/admin", "/"),
        ("/admin\r\nSet-Cookie: x=1", "/"),
    ],
)
def test_safe_next_keeps_only_same_site_paths(target, expected):
    assert safe_next(target) == expected


@dataclass
class Chunk:
    filename: str
    offset: int
    data: bytes


async def _chunks(parts):
    for filename, blobs in parts:
        offset = 0
        for blob in blobs:
            yield Chunk(filename, offset, blob)
            offset += len(blob)


def _receive(parts, max_files=10, max_file_bytes=100, max_total_bytes=1000):
    async def run():
        return [f async for f in receive_files(_chunks(parts), max_files, max_file_bytes, max_total_bytes)]

    # In a thread of its own: Playwright's sync API may hold an event loop in this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def test_receive_files_assembles_files_in_order():
    files = _receive([("a.jpg", [b"12", b"34"]), ("b.png", [b""]), ("c.gif", [b"x"])])
    assert [(f.index, f.filename, f.data, f.problem) for f in files] == [
        (0, "a.jpg", b"1234", ""),
        (1, "b.png", b"", ""),
        (2, "c.gif", b"x", ""),
    ]


def test_receive_files_drops_an_oversized_file_but_keeps_the_others():
    files = _receive([("big.jpg", [b"x" * 60, b"x" * 60]), ("ok.jpg", [b"y" * 10])])
    assert files[0].data == b"" and files[0].size == 120 and "larger than" in files[0].problem
    assert files[1].data == b"y" * 10 and files[1].problem == ""


def test_receive_files_stops_at_too_many_files_or_bytes():
    with pytest.raises(UploadRefused, match="At most 2 files"):
        _receive([("a", [b"1"]), ("b", [b"2"]), ("c", [b"3"])], max_files=2)
    with pytest.raises(UploadRefused, match="At most"):
        _receive([("a", [b"1" * 90]), ("b", [b"2" * 90])], max_total_bytes=100)


def test_reflex_does_not_serve_the_gallery_files(tmp_path):
    """Reflex serves its upload folder at /_upload without any access check: it must not be ours."""
    from clipgallery.config import Settings

    settings = Settings(state_dir=tmp_path / "state", upload_dir=tmp_path / "uploads")
    env = reflex_env("postgresql+psycopg://x@/y", settings)
    assert env["REFLEX_UPLOADED_FILES_DIR"] != str(settings.upload_dir)
    assert not env["REFLEX_UPLOADED_FILES_DIR"].startswith(str(settings.upload_dir))


def test_the_jobs_page_says_when_a_run_is_building_the_vector_index():
    from clipgallery.bulk import IndexSummary
    from clipgallery.pages.admin_jobs import BUILDING_INDEX, _counts

    summary = IndexSummary(indexed=7, skipped=2)
    assert _counts(summary) == "indexed 7, updated 0, reused 0, skipped 2, rejected 0"
    summary.building_index = True
    assert _counts(summary).endswith("; " + BUILDING_INDEX) and "vector index" in BUILDING_INDEX
