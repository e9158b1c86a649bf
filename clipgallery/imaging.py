"""Pillow work: decide what a file is from its bytes, refuse what is unsafe, and derive the
RGB pixels for the model and the thumbnail (oriented, no larger than they need) and the served
original (without its location)."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipgallery.config import Settings

ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
# Pillow names a JPEG with a multi-picture segment (many phone cameras write one) "MPO": a JPEG
# whose first picture is the photo.
PILLOW_FORMAT_MIME = {**ALLOWED_FORMATS, "MPO": "image/jpeg"}
EXIF_ORIENTATION = 0x0112
EXIF_GPS_IFD = 0x8825
EXIF_CAMERA_IFD = 0x8769  # exposure, lens, dates

# We check the pixel count ourselves, with our own limit and message, before decoding.
Image.MAX_IMAGE_PIXELS = None

# The smallest shorter side of the pixels decoded for the model and the thumbnail: no open_clip
# model looks at more than 512 px (ViT-B-32 224, the largest SigLIP 512), and a 12-megapixel photo
# decoded whole and then resized costs 30x the model's time per image (docs/benchmarks.md).
MIN_WORKING_SIZE = 512
ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)


class RejectedImage(ValueError):
    """The bytes are not an image clipgallery will store; str(exc) is the reason, for people.

    `kind` tells programs why: "empty", "too_large" (bytes or pixels), "unsupported" (not an
    allowed format) or "damaged"."""

    def __init__(self, message: str, kind: str = "damaged") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class DecodedImage:
    sha256: str
    byte_size: int
    mime_type: str
    width: int
    height: int
    rgb: Image.Image  # oriented, RGB, at most about twice the working size: what the model sees
    served_bytes: bytes  # the original as served: without location (JPEG: metadata only; else re-encoded upright)
    served_is_original: bool
    orientation: int = 1  # the EXIF orientation the served bytes carry (1: upright as stored)
    source_mode: str = "RGB"  # Pillow's mode of the file's pixels (a JPEG: L, RGB or CMYK)
    icc_profile: bytes | None = None  # the file's colour profile, when it describes `rgb`'s pixels


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def working_size_for(thumbnail_size: int) -> int:
    """The shorter side `decode_image` keeps for a gallery with thumbnails of `thumbnail_size`:
    upload, query and re-embedding all use it, so the same bytes give the same vector."""
    return max(MIN_WORKING_SIZE, thumbnail_size)


def decode_image(data: bytes, max_bytes: int, max_pixels: int, working_size: int | None = None) -> DecodedImage:
    """Validate bytes as an allowed image and decode them; raises RejectedImage with the reason.

    With `working_size`, `rgb` is decoded no larger than needed for a shorter side of at least
    that many pixels (less than twice it): JPEGs are decoded at 1/2, 1/4 or 1/8 scale by the
    decoder itself, other formats box-reduced after decoding. `width` and `height` stay the
    original's. An image whose served copy is re-encoded (a PNG or WebP with an EXIF rotation or a
    location, a JPEG whose metadata cannot be cleaned) is decoded whole for that copy."""
    if not data:
        raise RejectedImage("The file is empty.", "empty")
    if len(data) > max_bytes:
        raise RejectedImage(f"The file is {_megabytes(len(data))}; the limit is {_megabytes(max_bytes)}.", "too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise RejectedImage(
            "Not a supported image: clipgallery accepts JPEG, PNG, WebP and GIF files.", "unsupported"
        ) from None
    except Exception as exc:
        raise RejectedImage(f"The image could not be read: {exc}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise RejectedImage("The image has no pixels.")
    if width * height > max_pixels:
        raise RejectedImage(
            f"The image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {max_pixels / 1e6:.0f} megapixels.",
            "too_large",
        )
    mime_type = PILLOW_FORMAT_MIME[image.format]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if orientation in ORIENTATIONS_SWAPPING_SIDES:
                width, height = height, width
            located = image.format != "GIF" and _has_location(image)
            # A JPEG is served as the camera wrote it, EXIF orientation included (browsers apply
            # it), its location removed from the metadata; other formats are re-encoded upright.
            served = _jpeg_without_location(data) if located and mime_type == "image/jpeg" else None
            rotated = image.format != "GIF" and orientation not in (0, 1) and mime_type != "image/jpeg"
            reencode = served is None and (located or rotated)
            if working_size and mime_type == "image/jpeg" and not reencode:
                image.draft(image.mode, (working_size, working_size))
            image.load()  # first frame only for animations
            oriented = ImageOps.exif_transpose(image)
            rgb = to_rgb(_reduced(oriented, working_size) if working_size else oriented)
            if reencode:
                served = _reencoded_upright(image, oriented)
    except RejectedImage:
        raise
    except Exception as exc:
        raise RejectedImage(f"The image data is damaged or incomplete ({exc}).") from None

    served_bytes, served_is_original = (data, True) if served is None else (served, False)
    return DecodedImage(
        sha256=hashlib.sha256(data).hexdigest(),
        byte_size=len(served_bytes),
        mime_type=mime_type,
        width=width,
        height=height,
        rgb=rgb,
        served_bytes=served_bytes,
        served_is_original=served_is_original,
        orientation=1 if reencode else orientation,
        source_mode=image.mode,
        icc_profile=_rgb_profile(image),
    )


# The largest colour profile copied into thumbnails: display profiles (sRGB, Display P3, Adobe
# RGB) take 0.5-3 kB, while a printer's or scanner's with its lookup tables can take hundreds.
MAX_THUMBNAIL_PROFILE_BYTES = 64 * 1024
ICC_RGB_SPACE = b"RGB "  # the data colour space in an ICC profile's header, bytes 16-19


def _rgb_profile(image: Image.Image) -> bytes | None:
    """The image's ICC profile when `to_rgb` keeps the pixel values it describes: an RGB profile
    of RGB, RGBA or palette pixels (a wide-gamut phone photo's Display P3), not a CMYK or grey one."""
    profile = image.info.get("icc_profile")
    if not isinstance(profile, bytes) or len(profile) > MAX_THUMBNAIL_PROFILE_BYTES:
        return None
    if profile[16:20] != ICC_RGB_SPACE or image.mode not in ("RGB", "RGBA", "P"):
        return None
    return profile


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB for any mode Pillow decodes (palette, alpha, CMYK, 16-bit, float, 1-bit)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = array / 257.0
        else:
            low, high = float(array.min()), float(array.max())
            scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_location(image: Image.Image) -> bool:
    exif = image.getexif()
    if EXIF_GPS_IFD in exif:
        return True
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    return b"GPS" in xmp


def decode_upload(data: bytes, settings: Settings) -> DecodedImage:
    """`decode_image` with the gallery's limits and working size: what an upload and an image
    query both go through, so the same bytes give the same vector."""
    return decode_image(
        data, settings.max_upload_bytes, settings.max_image_pixels, working_size_for(settings.thumbnail_size)
    )


def _reduced(image: Image.Image, working_size: int) -> Image.Image:
    """`image` box-reduced by the largest whole factor that keeps its shorter side ≥ working_size."""
    factor = min(image.size) // working_size
    return image.reduce(factor) if factor >= 2 else image


JPEG_SOS, JPEG_EOI, JPEG_APP1 = 0xDA, 0xD9, 0xE1
EXIF_HEADER = b"Exif\x00\x00"
XMP_HEADERS = (b"http://ns.adobe.com/xap/1.0/\x00", b"http://ns.adobe.com/xmp/extension/\x00")


def _jpeg_without_location(data: bytes) -> bytes | None:
    """The JPEG's bytes with the EXIF GPS directory and any XMP packet that mentions GPS taken
    out of its metadata segments; the compressed pixels (everything from the start of scan) are
    copied untouched. None when the segments cannot be walked or the result would still carry a
    location: the caller re-encodes instead."""
    if data[:2] != b"\xff\xd8":
        return None
    parts, pos, exif_done = [data[:2]], 2, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (JPEG_SOS, JPEG_EOI):
            parts.append(data[pos:])
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        payload = data[pos + 4 : end]
        if marker == JPEG_APP1 and payload.startswith(EXIF_HEADER):
            if not exif_done:  # a second EXIF segment is dropped: readers use the first
                try:
                    exif = Image.Exif()
                    exif.load(payload)
                    exif.get_ifd(EXIF_CAMERA_IFD)  # kept: tobytes() writes the directories loaded
                    exif.pop(EXIF_GPS_IFD, None)
                    clean = exif.tobytes()
                except Exception:  # metadata Pillow cannot rewrite: the caller re-encodes
                    return None
                if len(clean) + 2 > 0xFFFF:
                    return None
                parts.append(b"\xff\xe1" + (len(clean) + 2).to_bytes(2, "big") + clean)
                exif_done = True
        elif not (marker == JPEG_APP1 and payload.startswith(XMP_HEADERS) and b"GPS" in payload):
            parts.append(data[pos:end])
        pos = end
    else:
        return None
    stripped = b"".join(parts)
    with Image.open(io.BytesIO(stripped)) as check:
        return None if _has_location(check) else stripped


def _reencoded_upright(image: Image.Image, oriented: Image.Image) -> bytes:
    """A PNG or WebP (or a JPEG whose metadata `_jpeg_without_location` could not clean), re-encoded
    upright and without GPS (other EXIF kept)."""
    clean = oriented.getexif()
    clean.pop(EXIF_GPS_IFD, None)
    clean.pop(EXIF_ORIENTATION, None)
    options: dict = {"exif": clean.tobytes()}
    if image.info.get("icc_profile"):
        options["icc_profile"] = image.info["icc_profile"]
    out = io.BytesIO()
    if image.format in ("JPEG", "MPO"):
        oriented.save(out, "JPEG", quality=95, **options)
    elif image.format == "WEBP":
        oriented.save(out, "WEBP", quality=95, **options)
    else:
        oriented.save(out, "PNG", **options)
    return out.getvalue()


THUMBNAIL_ENCODINGS = {
    "jpeg": ("JPEG", {"quality": 82}),
    # method 2, not 4: a third of the encoding time for files 3 % larger (224 px photos here).
    "webp": ("WEBP", {"quality": 82, "method": 2}),
}


# A JPEG original no larger than the thumbnail is its own thumbnail when it is at most this heavy
# (a thumbnail here is 0.2-0.25 bytes per pixel), plus room for the headers and tables a small
# file is mostly made of. Re-encoded, such an image came out slightly larger than the original
# and of lower quality (224-px photos here: 12.5 against 11.5 kB), for the cost of an encoding
# and a second file write (docs/architecture.md).
ORIGINAL_AS_THUMBNAIL_MAX_BYTES_PER_PIXEL = 0.5
ORIGINAL_AS_THUMBNAIL_HEADER_BYTES = 2048


def original_serves_as_thumbnail(decoded: DecodedImage, thumbnail_size: int) -> bool:
    """Whether the served original can be shown in the grid as it is: a JPEG (never animated)
    that fits in the thumbnail's box, is upright without its EXIF orientation, is in a colour
    mode every browser shows alike, and weighs no more than a thumbnail should."""
    return (
        decoded.mime_type == "image/jpeg"
        and decoded.width <= thumbnail_size
        and decoded.height <= thumbnail_size
        and decoded.orientation in (0, 1)
        and decoded.source_mode in ("L", "RGB")
        and decoded.byte_size
        <= ORIGINAL_AS_THUMBNAIL_HEADER_BYTES
        + ORIGINAL_AS_THUMBNAIL_MAX_BYTES_PER_PIXEL * decoded.width * decoded.height
    )


def make_thumbnail(
    rgb: Image.Image, size: int, thumbnail_format: str = "jpeg", icc_profile: bytes | None = None
) -> bytes:
    """A JPEG or WebP (`THUMBNAIL_ENCODINGS`) no larger than size x size, without metadata but
    for the colour profile of its pixels (`DecodedImage.icc_profile`): without it, browsers take
    a wide-gamut photo's values for sRGB and show it washed out."""
    thumb = rgb.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    encoder, options = THUMBNAIL_ENCODINGS[thumbnail_format]
    thumb.save(out, encoder, **options, **({"icc_profile": icc_profile} if icc_profile else {}))
    return out.getvalue()
