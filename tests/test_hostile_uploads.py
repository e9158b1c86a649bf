"""Hostile and unusual uploads (issue 8): each is rejected with a clear reason or stored safely
and correctly; afterwards there is no orphaned file and no half-written row."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image
from sqlalchemy import text

from clipgallery.gallery import get_image, known_file_paths
from clipgallery.ingest import ingest_image
from tests.conftest import encode, files_on_disk, jpeg, picture


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def _gif_bomb_header(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\x00\x00\x00"
        + b"\x2c"
        + b"\x00" * 9
        + b"\x02\x02\x44\x01\x00;"
    )


def _animated_gif(frames: int) -> bytes:
    base = [picture(5000 + i % 7, (32, 32)).convert("P") for i in range(frames)]
    out = io.BytesIO()
    base[0].save(out, "GIF", save_all=True, append_images=base[1:], duration=20, loop=0)
    return out.getvalue()


def _exif_rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture(5100 + orientation, (120, 60)), "JPEG", exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    return encode(Image.linear_gradient("L").resize((40, 30)).convert("I;16"), "PNG")


JPEG = jpeg(5200)
PNG = encode(picture(5201), "PNG")

# (case, bytes, file name, expected: "rejected:<words>" or "stored:<mime>")
CASES: list[tuple[str, bytes, str, str]] = [
    ("empty file", b"", "a.jpg", "rejected:empty"),
    ("one byte", b"\xff", "a.jpg", "rejected:Not a supported image"),
    ("jpeg magic only", b"\xff\xd8\xff", "a.jpg", "rejected:"),
    ("truncated jpeg header", JPEG[:200], "a.jpg", "rejected:"),
    ("truncated jpeg body", jpeg(5202, (400, 300))[:1500], "a.jpg", "rejected:damaged or incomplete"),
    ("truncated png", encode(picture(5203, (300, 200)), "PNG")[:900], "a.png", "rejected:damaged or incomplete"),
    ("png without IEND", PNG[:-12], "a.png", "stored:image/png"),
    ("plain text", b"hello world\n" * 50, "a.jpg", "rejected:Not a supported image"),
    ("html", b"<!doctype html><html><script>alert(1)</script></html>", "a.png", "rejected:Not a supported image"),
    (
        "svg with script",
        b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
        "a.svg",
        "rejected:Not a supported",
    ),
    (
        "svg named jpg",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        "a.jpg",
        "rejected:Not a supported",
    ),
    ("php in jpg name", b"<?php system($_GET['c']); ?>", "shell.php.jpg", "rejected:Not a supported image"),
    ("html after jpeg magic", b"\xff\xd8\xff\xe0<html><script>alert(1)</script>", "a.jpg", "rejected:"),
    ("gif polyglot with javascript", b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=alert(1);", "a.gif", "rejected:"),
    ("valid jpeg followed by html", JPEG + b"<html><script>alert(1)</script></html>", "a.jpg", "stored:image/jpeg"),
    ("zip appended to png", PNG + b"PK\x03\x04" + b"\x00" * 100, "a.png", "stored:image/png"),
    ("bmp", encode(picture(5204), "BMP"), "a.bmp", "rejected:Not a supported image"),
    ("tiff", encode(picture(5205), "TIFF"), "a.tif", "rejected:Not a supported image"),
    ("ico", encode(picture(5206, (32, 32)), "ICO"), "a.ico", "rejected:Not a supported image"),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "a.pdf", "rejected:Not a supported image"),
    ("png named jpg", PNG, "photo.jpg", "stored:image/png"),
    ("jpeg named png", jpeg(5207), "photo.png", "stored:image/jpeg"),
    ("webp named gif", encode(picture(5208), "WEBP"), "x.gif", "stored:image/webp"),
    ("png bomb 50000x50000", _png_claiming(50_000, 50_000), "bomb.png", "rejected:megapixels"),
    ("png bomb 1x100000000", _png_claiming(1, 100_000_000), "bomb.png", "rejected:megapixels"),
    ("gif bomb header", _gif_bomb_header(65_535, 65_535), "bomb.gif", "rejected:megapixels"),
    (
        "oversized file",
        encode(Image.effect_noise((1200, 1000), 100).convert("RGB"), "PNG"),
        "big.png",
        "rejected:limit",
    ),
    ("zero-size png", _png_claiming(0, 0), "zero.png", "rejected:"),
    ("animated gif 2000 frames", _animated_gif(2000), "anim.gif", "stored:image/gif"),
    ("animated webp", None, "anim.webp", "stored:image/webp"),
    ("cmyk jpeg", encode(picture(5209, (64, 64), "CMYK"), "JPEG"), "cmyk.jpg", "stored:image/jpeg"),
    ("16-bit png", _sixteen_bit_png(), "deep.png", "stored:image/png"),
    (
        "palette with transparency",
        encode(picture(5210).convert("P"), "PNG", transparency=3),
        "p.png",
        "stored:image/png",
    ),
    ("grey with alpha", encode(picture(5211).convert("LA"), "PNG"), "la.png", "stored:image/png"),
    ("1-bit png", encode(picture(5212).convert("1"), "PNG"), "bw.png", "stored:image/png"),
    ("exif rotated 6", _exif_rotated(6), "rot6.jpg", "stored:image/jpeg"),
    ("exif rotated 8", _exif_rotated(8), "rot8.jpg", "stored:image/jpeg"),
    ("exif orientation garbage", _exif_rotated(99), "rot99.jpg", "stored:image/jpeg"),
    ("path traversal name", jpeg(5213), "../../../../etc/passwd", "stored:image/jpeg"),
    ("windows traversal name", jpeg(5214), "..\\..\\windows\\system32\\x.jpg", "stored:image/jpeg"),
    ("absolute path name", jpeg(5215), "/etc/cron.d/evil.jpg", "stored:image/jpeg"),
    ("nul byte in name", jpeg(5216), "good.jpg\x00.php", "stored:image/jpeg"),
    ("very long name", jpeg(5217), "a" * 5000 + ".jpg", "stored:image/jpeg"),
    ("non-utf8 name", jpeg(5218), b"\xff\xfe\xfa.jpg", "stored:image/jpeg"),
    ("newlines in name", jpeg(5219), "a\r\nSet-Cookie: x=1.jpg", "stored:image/jpeg"),
    ("html in name", jpeg(5220), "<img src=x onerror=alert(1)>.jpg", "stored:image/jpeg"),
    ("empty name", jpeg(5221), "", "stored:image/jpeg"),
]


def _animated_webp() -> bytes:
    frames = [picture(5300 + i, (48, 48)) for i in range(5)]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], duration=50)
    return out.getvalue()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case,data,filename,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_upload(case, data, filename, expected, session, embedder, storage):
    if data is None:
        data = _animated_webp()
    outcome = ingest_image(session, embedder, storage, data, filename, description="<script>alert(1)</script>")
    verdict, _, detail = expected.partition(":")
    if verdict == "rejected":
        assert outcome.status == "rejected", f"{case} was stored"
        assert outcome.reason and detail in outcome.reason
        assert outcome.image_id is None
    else:
        assert outcome.status == "added", f"{case}: {outcome.reason}"
        record = get_image(session, outcome.image_id)
        assert record.mime_type == detail
        assert record.has_embedding
        assert record.width * record.height <= embedder.settings.max_image_pixels
        # Server-side names only; the client's name is display text without paths or controls.
        assert "/" not in record.original_filename and "\\" not in record.original_filename
        assert "\x00" not in record.original_filename and "\n" not in record.original_filename
        assert len(record.original_filename) <= 255
        assert record.stored_path.startswith("originals/") and record.sha256 in record.stored_path
        assert storage.path(record.stored_path).is_file() and storage.path(record.thumbnail_path).is_file()
        with Image.open(storage.path(record.thumbnail_path)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= embedder.settings.thumbnail_size
    # Never a half-written state: every row has a vector and its files; every file has a row.
    rows = session.execute(text("SELECT count(*) FROM images")).scalar_one()
    vectors = session.execute(text("SELECT count(*) FROM image_embeddings")).scalar_one()
    assert rows == vectors
    assert files_on_disk(storage) == known_file_paths(session)


def test_exif_rotation_gives_upright_dimensions(session, embedder, storage):
    for orientation, size in ((6, (60, 120)), (8, (60, 120)), (3, (120, 60))):
        outcome = ingest_image(session, embedder, storage, _exif_rotated(orientation), f"r{orientation}.jpg")
        record = get_image(session, outcome.image_id)
        assert (record.width, record.height) == size
