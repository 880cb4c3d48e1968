"""Decode caller bytes into a fully loaded RGB image, safely.

Whatever the caller claimed the bytes were, only a fixed list of Pillow formats is tried; the
pixel count is checked from the header before any pixel is decoded; frame 0 of animations;
EXIF orientation applied; transparency flattened on white; 16-bit and float images scaled. Every
failure is an :class:`~captioning.errors.ImageInputError` whose message names the source with
the contract's prefix (:data:`BODY_ERROR`, :data:`FILE_ERROR`, :data:`URL_ERROR`).
"""

from __future__ import annotations

import io
import logging
import math

from PIL import Image, ImageOps

from captioning.errors import ImageInputError

log = logging.getLogger(__name__)

# Client-facing message prefixes (CONTRACT.md "How /analyze picks its input").
URL_ERROR = "Failed to download image"
FILE_ERROR = "Failed to load image"
BODY_ERROR = "Invalid image"

#: Pillow formats we are willing to decode; anything else is refused without touching other
#: (rarely used, historically fragile or external-tool backed) Pillow decoders.
DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def decode_image(data: bytes, *, max_pixels: int, error_prefix: str = BODY_ERROR) -> Image.Image:
    """Decode `data` (whatever the caller claimed it was) into a fully loaded RGB image.

    The pixel count is checked after reading the header and before any pixel is decoded, with
    the limit passed in (Pillow's process-wide ``MAX_IMAGE_PIXELS`` stays as a second fence but
    is not relied on). `error_prefix` picks the contract's wording for the source:
    :data:`BODY_ERROR` for uploads, :data:`FILE_ERROR` for ``file=``, :data:`URL_ERROR` for
    ``url=``.
    """
    if not data:
        raise ImageInputError(f"{error_prefix}: empty image data")
    try:
        img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError:
        raise _bomb_error(None, max_pixels) from None
    except Exception as exc:  # Pillow raises many types for garbage input
        log.debug("image header rejected: %r", exc)
        raise ImageInputError(f"{error_prefix}: not a supported image format") from None
    try:
        rgb = _load_rgb(img, max_pixels, error_prefix)
    except BaseException:
        img.close()
        raise
    if rgb is not img:
        img.close()  # the decoded source; the returned image stays usable
    return rgb


def _load_rgb(img: Image.Image, max_pixels: int, error_prefix: str) -> Image.Image:
    """Size check, pixel decode (frame 0), EXIF orientation, then conversion to RGB."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{error_prefix}: invalid image dimensions")
    if width * height > max_pixels:
        raise _bomb_error((width, height), max_pixels)
    try:
        img.load()  # frame 0 for animated GIF/WEBP/PNG and multi-page TIFF
    except Image.DecompressionBombError:
        raise _bomb_error(None, max_pixels) from None
    except Exception as exc:
        log.debug("image data rejected: %r", exc)
        raise ImageInputError(f"{error_prefix}: truncated or corrupt image data") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # a broken EXIF block should not cost the caller the image
        log.debug("ignoring unreadable EXIF orientation: %r", exc)
    try:
        rgb = _to_rgb(img)
        rgb.load()
    except Exception as exc:
        log.debug("colour conversion failed for mode %s: %r", img.mode, exc)
        raise ImageInputError(f"{error_prefix}: unsupported colour mode") from None
    return rgb


def _bomb_error(size: tuple[int, int] | None, max_pixels: int) -> ImageInputError:
    if size is None:  # Pillow's own process-wide fence fired first; it does not give the size
        fence = Image.MAX_IMAGE_PIXELS
        limit = min(max_pixels, 2 * fence) if fence else max_pixels
        return ImageInputError(f"Image too large: exceeds the limit of {limit} pixels")
    w, h = size
    return ImageInputError(
        f"Image too large: {w}\u00d7{h} pixels exceeds the limit of {max_pixels}"
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way a photo viewer shows it: transparency on white, high bit depths scaled."""
    mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        # Pillow's I;16 -> L conversion clips at 255 instead of scaling.
        img = img.convert("I").point(lambda v: v * (1 / 257) + 0.5)
        return img.convert("L").convert("RGB")
    if mode in ("I", "F"):
        return _scale_to_l(img).convert("RGB")
    return img.convert("RGB")


def _scale_to_l(img: Image.Image) -> Image.Image:
    """Map 32-bit integer or float samples to 8 bits by their plausible range."""
    lo, hi = img.getextrema()
    lo, hi = float(lo), float(hi)  # type: ignore[arg-type]
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535:
        scale, offset = 1 / 257, 0.0
    elif hi > lo and math.isfinite(hi - lo):
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
    else:
        scale, offset = 0.0, 0.0
    if img.mode == "I":
        offset += 0.5  # round rather than truncate
    return img.point(lambda v: v * scale + offset).convert("L")
