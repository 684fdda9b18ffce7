"""Robust image loading: any common mode becomes 8-bit RGB, every failure becomes an ImageLoadError.

Conversions (documented behaviour, not errors): transparency (RGBA, LA, PA, P with a transparent colour) is
composited over white; CMYK, YCbCr, L, 1 and P convert to RGB; 16- and 32-bit integer images keep their top
8 bits of 16 (values above 65535 saturate); float images are clipped to [0, 255]. EXIF orientation is applied,
and `image_size` reports the size after it, so a plan made from headers matches the decoded pixels.
"""
import io
import os

import numpy as np
from PIL import Image, ImageOps

from longvl.eagle.processing.errors import ImageLoadError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotations by 90 or 270 degrees swap width and height


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    try:
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(source))
        if isinstance(source, (str, os.PathLike)):
            return Image.open(source)
    except FileNotFoundError as err:
        raise ImageLoadError(f"image file not found: {source}") from err
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise ImageLoadError(f"cannot read image {_name(source)}: {err}") from err
    raise ImageLoadError(f"unsupported image source type {type(source).__name__}; pass a path, bytes or PIL image")


def _name(source) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def _check_size(width: int, height: int, source):
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"image {_name(source)} has zero size ({width}x{height})")


def image_size(source) -> tuple[int, int]:
    """(width, height) from the header only, after EXIF orientation: no pixel is decoded."""
    image = _open(source)
    width, height = image.size
    _check_size(width, height, source)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not make a readable image unusable
        orientation = None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image)
        if mode == "F":
            gray = np.clip(values, 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """Path, bytes or PIL image -> decoded 8-bit RGB PIL image, or ImageLoadError naming the problem."""
    image = _open(source)
    _check_size(*image.size, source)
    try:
        image = ImageOps.exif_transpose(image)
        image.load()
        return _to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as err:  # truncated data, bad EXIF, unsupported mode
        raise ImageLoadError(f"cannot decode image {_name(source)} (mode {image.mode}): {err}") from err
