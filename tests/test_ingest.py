import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import text

from clipgallery.gallery import count_images, delete_images, get_image, vector_to_numpy
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


def test_a_small_light_jpeg_is_its_own_thumbnail(session, embedder, storage):
    """Thumbnails here are 64 px: a 60 x 48 JPEG is shown as uploaded (one file, not a re-encoded
    copy), and deleting it removes that one file."""
    data = jpeg(14, (60, 48))
    record = get_image(session, ingest_image(session, embedder, storage, data, "small.jpg").image_id)
    assert record.thumbnail_path == record.stored_path and record.stored_path.startswith("originals/")
    assert storage.path(record.thumbnail_path).read_bytes() == data
    assert files_on_disk(storage) == {record.stored_path}
    delete_images(session, storage, [record.id])
    assert files_on_disk(storage) == set()


def _exif_rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize(
    "case, data",
    [
        ("larger than the thumbnail", jpeg(15, (80, 48))),
        ("PNG", encode(picture(16, (60, 48)), "PNG")),
        ("EXIF rotation", _exif_rotated(picture(17, (60, 48)))),
        ("CMYK", encode(picture(18, (60, 48)).convert("CMYK"), "JPEG", quality=90)),
        ("heavy", encode(Image.effect_noise((60, 48), 120).convert("RGB"), "JPEG", quality=100)),
    ],
)
def test_other_small_images_get_a_thumbnail_of_their_own(case, data, session, embedder, storage):
    record = get_image(session, ingest_image(session, embedder, storage, data, "x.img").image_id)
    assert record.thumbnail_path.startswith("thumbs/"), case
    assert files_on_disk(storage) == {record.stored_path, record.thumbnail_path}
    with Image.open(storage.path(record.thumbnail_path)) as thumb:
        assert thumb.format == "JPEG" and thumb.mode == "RGB" and not thumb.getexif().get(0x0112)
        assert thumb.size == (
            (48, 60) if case == "EXIF rotation" else (64, 38) if case.startswith("larger") else (60, 48)
        )


def _profile(colour_space: bytes) -> bytes:
    """An ICC profile (sRGB's, standing in for a phone's Display P3) whose header names `colour_space`."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile[:16] + colour_space + profile[20:]


@pytest.mark.parametrize("colour_space, copied", [(b"RGB ", True), (b"GRAY", False)])
def test_a_thumbnail_keeps_the_colour_profile_of_its_pixels(colour_space, copied, session, embedder, storage):
    """Without its profile a wide-gamut photo's thumbnail is shown as if its values were sRGB
    (washed out); a profile of other pixels (grey, CMYK) is not pinned on the RGB thumbnail."""
    profile = _profile(colour_space)
    data = encode(picture(19, (160, 120)), "JPEG", quality=90, icc_profile=profile)
    record = get_image(session, ingest_image(session, embedder, storage, data, "p3.jpg").image_id)
    assert record.thumbnail_path.startswith("thumbs/")
    with Image.open(storage.path(record.thumbnail_path)) as thumb:
        assert thumb.info.get("icc_profile") == (profile if copied else None)


def test_same_bytes_twice_returns_the_existing_image(session, embedder, storage):
    data = jpeg(11)
    first = ingest_image(session, embedder, storage, data, "a.jpg")
    second = ingest_image(session, embedder, storage, data, "b.jpg", "other name")
    assert (first.status, second.status) == ("added", "duplicate")
    assert second.image_id == first.image_id
    assert _rows(session) == (1, 1)
    assert len(files_on_disk(storage)) == 2


def _located(orientation: int | None) -> Image.Exif:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise when shown
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(0x8769)[0x829A] = 0.01  # exposure time, in the camera-settings directory
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 22.0, 12.0)
    return exif


def _scan(data: bytes) -> bytes:
    """A JPEG's compressed pixels: everything from the start-of-scan marker."""
    return data[data.index(b"\xff\xda") :]


def test_a_located_jpeg_is_served_with_its_pixels_untouched_and_without_gps(session, embedder, storage):
    image = picture(12, (120, 80))
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><exif:GPSLatitude>52,22N</exif:GPSLatitude></x:xmpmeta>'
    data = encode(image, "JPEG", exif=_located(6).tobytes(), xmp=xmp)
    with Image.open(io.BytesIO(data)) as check:
        assert 0x8825 in check.getexif() and "xmp" in check.info

    outcome = ingest_image(session, embedder, storage, data, "phone.jpg")
    record = get_image(session, outcome.image_id)
    assert (record.width, record.height) == (80, 120)  # upright
    served_bytes = storage.path(record.stored_path).read_bytes()
    # Not re-encoded: the same compressed pixels, the camera's orientation tag (browsers apply it).
    assert _scan(served_bytes) == _scan(data) and len(served_bytes) < len(data)
    with Image.open(io.BytesIO(served_bytes)) as served:
        exif = served.getexif()
        assert 0x8825 not in exif and "xmp" not in served.info
        assert exif[0x0112] == 6 and exif[0x010F] == "PhoneMaker"
        assert exif.get_ifd(0x8769)[0x829A] == pytest.approx(0.01)
        assert ImageOps.exif_transpose(served).size == (80, 120)
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    with Image.open(storage.path(record.thumbnail_path)) as thumb:
        assert thumb.width < thumb.height  # made from the upright pixels


def test_re_embedding_a_served_phone_photo_gives_the_vector_of_its_upload(session, embedder, storage):
    # The served copy keeps the upload's pixels and orientation, so re-embedding (which reads the
    # stored file) sees exactly what the upload saw: the vector does not drift.
    from clipgallery.ingest import reembed_images

    data = _big((1600, 1200), "JPEG", exif=_located(6).tobytes())
    image_id = ingest_image(session, embedder, storage, data, "phone.jpg").image_id

    def vector() -> np.ndarray:
        stored = session.execute(text("SELECT embedding FROM image_embeddings WHERE image_id = :i"), {"i": image_id})
        return vector_to_numpy(stored.scalar_one())

    before = vector()
    assert reembed_images(session, embedder, storage, [image_id], progress=False) == 1
    np.testing.assert_allclose(vector(), before, atol=1e-6)


def test_a_rotated_jpeg_without_location_is_served_as_uploaded(session, embedder, storage):
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(picture(13, (120, 80)), "JPEG", exif=exif.tobytes())
    record = get_image(session, ingest_image(session, embedder, storage, data, "r.jpg").image_id)
    assert (record.width, record.height) == (80, 120)
    assert storage.path(record.stored_path).read_bytes() == data


@pytest.mark.parametrize("kind", ["PNG", "WEBP"])
def test_other_formats_with_a_rotation_or_location_are_served_re_encoded_upright(kind, session, embedder, storage):
    data = encode(picture(14, (120, 80)), kind, exif=_located(6).tobytes())
    record = get_image(session, ingest_image(session, embedder, storage, data, f"x.{kind.lower()}").image_id)
    with Image.open(storage.path(record.stored_path)) as served:
        assert served.size == (80, 120) and served.format == kind
        assert 0x8825 not in served.getexif() and served.getexif().get(0x0112, 1) == 1


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


def test_a_rotated_located_photo_is_decoded_reduced_and_upright():
    data = _big((1600, 1200), "JPEG", exif=_located(6).tobytes())
    decoded = decode_image(data, 1 << 30, 1 << 30, working_size_for(384))
    assert (decoded.width, decoded.height) == (1200, 1600)
    assert decoded.rgb.size == (600, 800) and not decoded.served_is_original
    assert _scan(decoded.served_bytes) == _scan(data)
    # A PNG is re-encoded upright from the whole pixels; the model still gets reduced ones.
    png = decode_image(_big((1600, 1200), "PNG", exif=_located(6).tobytes()), 1 << 30, 1 << 30, 512)
    assert png.rgb.size == (600, 800)
    with Image.open(io.BytesIO(png.served_bytes)) as served:
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
