"""Pillow work: decide what a file is from its bytes, refuse what is unsafe, and derive the
RGB pixels for the model, the thumbnail and the served original (oriented, GPS removed)."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
# Pillow names a JPEG with a multi-picture segment (many phone cameras write one) "MPO": a JPEG
# whose first picture is the photo.
PILLOW_FORMAT_MIME = {**ALLOWED_FORMATS, "MPO": "image/jpeg"}
EXIF_ORIENTATION = 0x0112
EXIF_GPS_IFD = 0x8825

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
    served_bytes: bytes  # the original as served: EXIF orientation applied and GPS removed where needed
    served_is_original: bool


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
    original's. A JPEG whose served copy must be re-encoded (rotated, or carrying a location) is
    decoded whole for that copy."""
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
            rewrite = _needs_rewrite(image)
            if image.getexif().get(EXIF_ORIENTATION, 1) in ORIENTATIONS_SWAPPING_SIDES:
                width, height = height, width
            if working_size and mime_type == "image/jpeg" and not rewrite:
                image.draft(image.mode, (working_size, working_size))
            image.load()  # first frame only for animations
            oriented = ImageOps.exif_transpose(image)
            rgb = to_rgb(_reduced(oriented, working_size) if working_size else oriented)
    except RejectedImage:
        raise
    except Exception as exc:
        raise RejectedImage(f"The image data is damaged or incomplete ({exc}).") from None

    served_bytes, served_is_original = _served_original(data, image, oriented) if rewrite else (data, True)
    return DecodedImage(
        sha256=hashlib.sha256(data).hexdigest(),
        byte_size=len(served_bytes),
        mime_type=mime_type,
        width=width,
        height=height,
        rgb=rgb,
        served_bytes=served_bytes,
        served_is_original=served_is_original,
    )


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


def _reduced(image: Image.Image, working_size: int) -> Image.Image:
    """`image` box-reduced by the largest whole factor that keeps its shorter side ≥ working_size."""
    factor = min(image.size) // working_size
    return image.reduce(factor) if factor >= 2 else image


def _needs_rewrite(image: Image.Image) -> bool:
    """Whether the served copy must be re-encoded: an EXIF rotation or a location (GIFs carry neither)."""
    if image.format == "GIF":
        return False
    return image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1) or _has_location(image)


def _served_original(data: bytes, image: Image.Image, oriented: Image.Image) -> tuple[bytes, bool]:
    """A re-encoded copy of an image that carries a location or an EXIF rotation (`_needs_rewrite`):
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
    return out.getvalue(), False


THUMBNAIL_ENCODINGS = {
    "jpeg": ("JPEG", {"quality": 82}),
    # method 2, not 4: a third of the encoding time for files 3 % larger (224 px photos here).
    "webp": ("WEBP", {"quality": 82, "method": 2}),
}


def make_thumbnail(rgb: Image.Image, size: int, thumbnail_format: str = "jpeg") -> bytes:
    """A JPEG or WebP (`THUMBNAIL_ENCODINGS`) no larger than size x size, without metadata."""
    thumb = rgb.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    encoder, options = THUMBNAIL_ENCODINGS[thumbnail_format]
    thumb.save(out, encoder, **options)
    return out.getvalue()
