import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from clipgallery.gallery import count_images, delete_images, get_image
from clipgallery.imaging import decode_image, working_size_for
from clipgallery.ingest import clean_filename, ingest_image
from tests.conftest import encode, files_on_disk, jpeg, picture


def _rows(session) -> tuple[int, int]:
    images = session.execute(text("SELECT count(*) FROM images")).scalar_one()
    vectors = session.execute(text("SELECT count(*) FROM image_embeddings")).scalar_one()
    return images, vectors


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming huge dimensions, and a tiny IDAT: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


REJECTIONS = {
    "empty": (b"", "empty"),
    "text": (b"hello, I am not an image\n" * 10, "Not a supported image"),
    "html": (b"<html><body><script>alert(1)</script></body></html>", "Not a supported image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "Not a supported image"),
    "bmp": (encode(picture(1), "BMP"), "Not a supported image"),
    "tiff": (encode(picture(1), "TIFF"), "Not a supported image"),
    "truncated jpeg": (jpeg(2, (400, 300))[:1500], "damaged or incomplete"),
    "truncated png": (encode(picture(3, (300, 200)), "PNG")[:900], "damaged or incomplete"),
    "decompression bomb": (_png_header_only(50_000, 50_000), "megapixels"),
    "too many bytes": (encode(Image.effect_noise((1200, 1000), 100).convert("RGB"), "PNG"), "the limit is 2.0 MB"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_input_is_rejected_with_a_reason_and_nothing_is_stored(case, session, embedder, storage):
    data, words = REJECTIONS[case]
    outcome = ingest_image(session, embedder, storage, data, f"{case}.jpg")
    assert outcome.status == "rejected"
    assert words in outcome.reason
    assert outcome.image_id is None
    assert _rows(session) == (0, 0)
    assert files_on_disk(storage) == set()


def test_image_is_stored_with_metadata_thumbnail_and_vector(session, embedder, storage):
    data = jpeg(10, (160, 120))
    outcome = ingest_image(session, embedder, storage, data, "../../etc/passwd\x00.jpg", "Red box", " A red box. ")
    assert outcome.status == "added"
    record = get_image(session, outcome.image_id)
    assert (record.name, record.description) == ("Red box", "A red box.")
    assert (record.width, record.height, record.mime_type) == (160, 120, "image/jpeg")
    assert record.original_filename == "passwd.jpg"
    assert record.has_embedding
    # Server-side names only: content hash, never the client's name.
    assert record.stored_path == f"originals/{record.sha256[:2]}/{record.sha256[2:4]}/{record.sha256}.jpg"
    assert storage.path(record.stored_path).read_bytes() == data
    with Image.open(storage.path(record.thumbnail_path)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 64
    assert record.thumbnail_path == f"thumbs/{record.sha256[:2]}/{record.sha256[2:4]}/{record.sha256}.jpg"
    assert files_on_disk(storage) == {record.stored_path, record.thumbnail_path}


def test_thumbnails_can_be_webp(session, embedder, storage, monkeypatch):
    """CLIPGALLERY_THUMBNAIL_FORMAT=webp; anything else but jpeg is refused with the setting's name."""
    from clipgallery.config import ConfigError, load_settings

    webp = embedder.sharing_model(thumbnail_format="webp")
    record = get_image(session, ingest_image(session, webp, storage, jpeg(13, (160, 120)), "w.jpg").image_id)
    assert record.thumbnail_path.endswith(f"{record.sha256}.webp")
    with Image.open(storage.path(record.thumbnail_path)) as thumb:
        assert thumb.format == "WEBP" and max(thumb.size) == 64
    monkeypatch.setenv("CLIPGALLERY_THUMBNAIL_FORMAT", "WebP")
    assert load_settings().thumbnail_format == "webp"
    monkeypatch.setenv("CLIPGALLERY_THUMBNAIL_FORMAT", "avif")
    with pytest.raises(ConfigError, match="CLIPGALLERY_THUMBNAIL_FORMAT"):
        load_settings()


def test_same_bytes_twice_returns_the_existing_image(session, embedder, storage):
    data = jpeg(11)
    first = ingest_image(session, embedder, storage, data, "a.jpg")
    second = ingest_image(session, embedder, storage, data, "b.jpg", "other name")
    assert (first.status, second.status) == ("added", "duplicate")
    assert second.image_id == first.image_id
    assert _rows(session) == (1, 1)
    assert len(files_on_disk(storage)) == 2


def test_exif_rotation_is_applied_and_gps_removed_from_the_served_original(session, embedder, storage):
    image = picture(12, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 22.0, 12.0)
    data = encode(image, "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as check:
        assert 0x8825 in check.getexif()

    outcome = ingest_image(session, embedder, storage, data, "phone.jpg")
    record = get_image(session, outcome.image_id)
    assert (record.width, record.height) == (80, 120)
    with Image.open(storage.path(record.stored_path)) as served:
        assert served.size == (80, 120)
        served_exif = served.getexif()
        assert 0x8825 not in served_exif
        assert served_exif.get(0x0112, 1) == 1
    assert record.sha256 == __import__("hashlib").sha256(data).hexdigest()


def _big(size: tuple[int, int], kind: str, **options) -> bytes:
    return encode(picture(31, (96, 72)).resize(size, Image.Resampling.BICUBIC), kind, **options)


@pytest.mark.parametrize(
    "kind,size,working",
    [
        ("JPEG", (4000, 3000), (1000, 750)),  # decoded at 1/4 scale by the JPEG decoder
        ("JPEG", (1600, 1200), (800, 600)),  # 1/2
        ("PNG", (2400, 1300), (1200, 650)),  # box-reduced by 2 after decoding
        ("WEBP", (1000, 700), (1000, 700)),  # shorter side under twice the working size: kept
        ("JPEG", (300, 200), (300, 200)),  # small images untouched
    ],
)
def test_large_images_are_decoded_only_as_large_as_the_model_and_thumbnail_need(kind, size, working):
    data = _big(size, kind)
    decoded = decode_image(data, 1 << 30, 1 << 30, working_size_for(384))
    assert decoded.rgb.size == working and decoded.rgb.mode == "RGB"
    assert (decoded.width, decoded.height) == size and decoded.served_bytes == data
    assert working_size_for(384) == 512 and working_size_for(800) == 800
    whole = decode_image(data, 1 << 30, 1 << 30)
    assert whole.rgb.size == size
    # The reduced pixels are the same picture (a smooth one here): as the model will see it.
    a = np.asarray(whole.rgb.resize((64, 48), Image.Resampling.BOX), dtype=np.float32)
    b = np.asarray(decoded.rgb.resize((64, 48), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(a - b).mean() < 2.0


def test_a_rotated_or_located_photo_is_served_whole_and_embedded_from_reduced_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8825)[1] = "N"
    data = _big((1600, 1200), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, 1 << 30, 1 << 30, working_size_for(384))
    assert (decoded.width, decoded.height) == (1200, 1600)
    assert decoded.rgb.size == (600, 800)
    with Image.open(io.BytesIO(decoded.served_bytes)) as served:
        assert served.size == (1200, 1600) and 0x8825 not in served.getexif()


def test_a_large_photo_is_stored_whole_and_found_by_its_own_bytes(session, embedder, storage):
    from clipgallery.search import search_image_bytes

    data = _big((2000, 1500), "JPEG")  # within the test settings' 4 megapixels and 2 MB
    outcome = ingest_image(session, embedder, storage, data, "camera.jpg")
    assert outcome.status == "added", outcome
    record = get_image(session, outcome.image_id)
    assert (record.width, record.height) == (2000, 1500)
    assert storage.path(record.stored_path).read_bytes() == data
    with Image.open(storage.path(record.thumbnail_path)) as thumb:
        assert max(thumb.size) == embedder.settings.thumbnail_size
    hit = search_image_bytes(session, embedder, data, k=1).hits[0]
    assert hit.id == outcome.image_id and hit.distance == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "name,data",
    [
        ("cmyk.jpg", encode(picture(20, (64, 64), "CMYK"), "JPEG")),
        ("sixteen.png", encode(Image.linear_gradient("L").resize((64, 64)).convert("I;16"), "PNG")),
        ("palette.png", encode(picture(21).convert("P"), "PNG", transparency=0)),
        ("alpha.webp", encode(picture(22).convert("RGBA"), "WEBP")),
        ("grey.png", encode(picture(23).convert("L"), "PNG")),
        ("animated.gif", None),
        # A JPEG with a multi-picture segment, as phone cameras write: Pillow calls it "MPO".
        ("phone.jpg", encode(picture(24), "MPO", save_all=True, append_images=[picture(25)])),
    ],
)
def test_unusual_but_valid_images_are_accepted(name, data, session, embedder, storage):
    if data is None:
        frames = [picture(30 + i).convert("P") for i in range(5)]
        out = io.BytesIO()
        frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        data = out.getvalue()
    outcome = ingest_image(session, embedder, storage, data, name)
    assert outcome.status == "added", outcome.reason
    record = get_image(session, outcome.image_id)
    assert record.has_embedding
    assert storage.path(record.thumbnail_path).is_file()
    if name == "phone.jpg":
        assert record.mime_type == "image/jpeg"


def test_a_failed_database_write_leaves_no_files_and_no_rows(session, embedder, storage):
    # A real constraint violation: the uploader does not exist (foreign key).
    with pytest.raises(Exception, match=r"violates foreign key constraint"):
        ingest_image(session, embedder, storage, jpeg(40), "x.jpg", uploaded_by=987654)
    assert _rows(session) == (0, 0)
    assert files_on_disk(storage) == set()


def test_delete_removes_row_vector_and_files(session, embedder, storage):
    outcome = ingest_image(session, embedder, storage, jpeg(41), "x.jpg")
    assert delete_images(session, storage, [outcome.image_id]) == 1
    assert _rows(session) == (0, 0)
    assert count_images(session) == 0
    assert files_on_disk(storage) == set()


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        ("a\x00b\nc.jpg", "abc.jpg"),
        (b"caf\xe9.jpg", "caf\ufffd.jpg"),
        ("x" * 400 + ".jpg", "x" * 255),
        ("", "image"),
        ("...", "image"),
    ],
)
def test_client_file_names_are_cleaned(raw, expected):
    assert clean_filename(raw) == expected
