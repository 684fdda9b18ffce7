"""Robust image loading: any common mode becomes 8-bit RGB, every failure becomes an ImageLoadError.

Conversions (documented behaviour, not errors): transparency (RGBA, LA, PA, P with a transparent colour) is
composited over white; CMYK, YCbCr, L, 1 and P convert to RGB; 16- and 32-bit integer images keep their top
8 bits of 16 (values above 65535 saturate); float images are clipped to [0, 255]. EXIF orientation is applied,
and `image_size` reports the size after it, so a plan made from headers matches the decoded pixels.

Decoded pixels are capped by what tiling can use: tiling resizes an image to its grid (at most
max_tiles x tile_size^2 pixels), so `load_image(..., min_size=grid size)` lets a JPEG decoder scale down by
1/2, 1/4 or 1/8 while decoding (never below min_size), and no decode may exceed `max_pixels`: an image
declaring more pixels than its format can be reduced to within the cap raises ImageTooLargeError from
`image_size` already, from the header alone. A small PNG can declare 15000 x 11000 pixels (495 MB of RGB,
under Pillow's own bomb limit); it is refused, never decoded.
"""
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from longvl.eagle.processing.errors import ImageLoadError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotations by 90 or 270 degrees swap width and height
MAX_IMAGE_PIXELS = 40_000_000  # default cap on decoded pixels per image (120 MB of RGB)
_DRAFT_FORMATS = {"JPEG": 8, "MPO": 8}  # formats whose decoder can scale down while decoding, by up to 8 per side


class ImageTooLargeError(ImageLoadError):
    """The image would decode to more pixels than the cap allows, even at its format's smallest decode size."""


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    try:
        with warnings.catch_warnings():  # the pixel cap below replaces Pillow's warning (its error stays)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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


def _transposed(image: Image.Image) -> bool:
    try:
        return image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS
    except Exception:  # a broken EXIF block must not make a readable image unusable
        return False


def _undecoded(image: Image.Image) -> bool:
    """An image opened from a file or bytes whose pixels are not decoded yet."""
    return isinstance(image, ImageFile.ImageFile) and bool(image.tile)


def _check_pixels(image: Image.Image, source, max_pixels: int | None):
    """Refuse an image that cannot be decoded within max_pixels even at its smallest decode size."""
    if max_pixels is None or not _undecoded(image):  # no cap, or already decoded: nothing left to save
        return
    width, height = image.size
    reduction = _DRAFT_FORMATS.get(image.format, 1)
    smallest = -(-width // reduction) * -(-height // reduction)
    if smallest > max_pixels:
        least = f" (at least {smallest} when decoded at 1/{reduction} scale)" if reduction > 1 else ""
        raise ImageTooLargeError(f"image {_name(source)} declares {width}x{height} = {width * height} pixels"
                                 f"{least}, more than max_pixels={max_pixels}")


def image_size(source, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the header only, after EXIF orientation: no pixel is decoded. Raises
    ImageTooLargeError when the image cannot be decoded within `max_pixels`."""
    image = _open(source)
    width, height = image.size
    _check_size(width, height, source)
    _check_pixels(image, source, max_pixels)
    return (height, width) if _transposed(image) else (width, height)


def decoded_from(decoded: tuple[int, int], declared: tuple[int, int]) -> bool:
    """Whether `decoded` is `declared` or a reduced decode of it (each side ceil(side / k), k in 1, 2, 4, 8)."""
    return any(decoded == (-(-declared[0] // k), -(-declared[1] // k)) for k in (1, 2, 4, 8))


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


def load_image(source, min_size: tuple[int, int] | None = None,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Path, bytes or PIL image -> decoded 8-bit RGB PIL image, or ImageLoadError naming the problem.

    With `min_size` (width, height after EXIF orientation: what tiling will resize to), a JPEG is decoded
    at the smallest of 1, 1/2, 1/4, 1/8 scale that still covers min_size (`decoded_from` tells the sizes
    apart); the decoded pixel count never exceeds `max_pixels` (ImageTooLargeError otherwise).
    """
    image = _open(source)
    _check_size(*image.size, source)
    _check_pixels(image, source, max_pixels)
    try:
        if min_size is not None and image.format in _DRAFT_FORMATS and _undecoded(image):
            width, height = min_size
            image.draft(image.mode, (height, width) if _transposed(image) else (width, height))
        if max_pixels is not None and _undecoded(image) and image.size[0] * image.size[1] > max_pixels:
            raise ImageTooLargeError(f"image {_name(source)} would decode to {image.size[0]}x{image.size[1]} "
                                     f"pixels, more than max_pixels={max_pixels}")
        image = ImageOps.exif_transpose(image)
        image.load()
        return _to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as err:  # truncated data, bad EXIF, unsupported mode
        raise ImageLoadError(f"cannot decode image {_name(source)} (mode {image.mode}): {err}") from err
