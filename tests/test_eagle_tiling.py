"""IAP tile selection against hand-computed cases, tiling, and robust image loading."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from longvl.eagle.data.synthetic import _write_png_declaring
from longvl.eagle.processing.errors import ImageLoadError
from longvl.eagle.processing.image_io import ImageTooLargeError, decoded_from, image_size, load_image
from longvl.eagle.processing.tiling import candidate_grids, cut_tiles, num_tiles, select_grid, tile_image

# (width, height, min_tiles, max_tiles) -> (cols, rows); the reasoning for each is in the comment.
HAND_COMPUTED = [
    # Exactly one tile's area and aspect: (1,1) already reaches the 0.6 cap with ratio 1.
    ((448, 448, 1, 12), (1, 1)),
    # 2:1 at two tiles' area: (2,1) scores 0.6 * 1; (1,1) scores 0.5 * 0.5.
    ((896, 448, 1, 12), (2, 1)),
    # 1000x1000: a = 448^2/10^6 = 0.2007; (2,2) gives min(0.803, 0.6) * 1 = 0.6, first to reach the cap.
    ((1000, 1000, 1, 12), (2, 2)),
    # 4K: a = 0.0242 per tile, never capped; (4,3) = 12a * (4/3)/(16/9) = 0.2178 beats (4,2), (5,2), (6,2)
    # = 0.172 and (3,2) = 0.1225.
    ((3840, 2160, 1, 12), (4, 3)),
    # Tie: 9 tiles at ratio 1 vs 12 tiles at ratio 3/4 score exactly 9a; the smaller grid wins.
    ((4000, 4000, 1, 12), (3, 3)),
    # 1 x 10000: area capped for every grid, ratio term j/10000 for (1, j): the tallest grid wins.
    ((1, 10000, 1, 12), (1, 12)),
    ((10000, 1, 1, 12), (12, 1)),
    # min_tiles=4 excludes (1,1): (2,2) reaches the cap with ratio 1.
    ((448, 448, 4, 6), (2, 2)),
    # max_tiles=1: a single tile whatever the image.
    ((3840, 2160, 1, 1), (1, 1)),
    # Wide 3:1 at 1344x448: (3,1) is exact (0.6 * 1).
    ((1344, 448, 1, 12), (3, 1)),
]


@pytest.mark.parametrize("case, grid", HAND_COMPUTED)
def test_iap_hand_computed(case, grid):
    assert select_grid(case[0], case[1], 448, case[2], case[3]) == grid


def float_reference(width, height, tile, min_tiles, max_tiles):
    """The IAP rule written directly in floats, with its scores (to skip near-ties)."""
    grids = sorted(((i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)
                    if min_tiles <= i * j <= max_tiles), key=lambda g: (g[0] * g[1], g[0]))
    scores = [min(i * j * tile * tile / (width * height), 0.6) * min((i / j) / (width / height),
                                                                     (width / height) / (i / j)) for i, j in grids]
    best = max(scores)
    return grids[scores.index(best)], sorted([-1.0] + scores)[-2:]


def test_iap_matches_float_formula_on_random_sizes():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        width, height = rng.randint(1, 6000), rng.randint(1, 6000)
        max_tiles = rng.randint(1, 16)
        min_tiles = rng.randint(1, max_tiles)
        expected, (second, first) = float_reference(width, height, 448, min_tiles, max_tiles)
        if first - second > 1e-9:  # exact ties are the float version's weak spot, tested above
            assert select_grid(width, height, 448, min_tiles, max_tiles) == expected, (width, height)
            checked += 1
    assert checked > 300


def test_candidates_and_thumbnail_count():
    grids = candidate_grids(1, 12)
    assert len(grids) == len(set(grids)) == sum(12 // i for i in range(1, 13))
    assert [g[0] * g[1] for g in grids] == sorted(g[0] * g[1] for g in grids)
    assert num_tiles(3840, 2160) == 13 and num_tiles(448, 448) == 1
    assert num_tiles(3840, 2160, use_thumbnail=False) == 12
    with pytest.raises(ValueError, match="positive"):
        select_grid(0, 10)


def test_tile_image_cuts_row_major_then_thumbnail():
    """A 2x2 grid of flat colours: tile k has colour k after normalisation, then the thumbnail."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    pixels = np.zeros((112, 112, 3), np.uint8)
    for k, colour in enumerate(colours):
        pixels[56 * (k // 2):56 * (k // 2 + 1), 56 * (k % 2):56 * (k % 2 + 1)] = colour
    tiles = tile_image(Image.fromarray(pixels), (2, 2), tile_size=56)
    assert tiles.shape == (5, 3, 56, 56) and tiles.dtype == torch.float32
    for k, colour in enumerate(colours):
        expected = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(tiles[k, :, 20:36, 20:36].mean((1, 2)), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiles[4].mean((1, 2)), tiles[:4].mean((0, 2, 3)), atol=0.02, rtol=0)
    assert tile_image(Image.fromarray(pixels), (1, 1), tile_size=56).shape == (1, 3, 56, 56)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))  # fully transparent -> white background
    assert load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 3), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    gray = load_image(_png(Image.new("L", (5, 2), 77)))
    assert gray.mode == "RGB" and gray.getpixel((1, 1)) == (77, 77, 77)
    deep = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.uint16))
    assert [load_image(_png(deep)).getpixel((x, 0))[0] for x in range(3)] == [0, 1, 255]
    cmyk = load_image(Image.new("CMYK", (3, 3), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (3, 3), 0)
    palette.info["transparency"] = 0
    assert load_image(palette).getpixel((0, 0)) == (255, 255, 255)


def test_bad_images_raise_typed_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(b"definitely not an image")
    truncated = _png(Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)))[:300]
    with pytest.raises(ImageLoadError):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 7)))
    with pytest.raises(ImageLoadError, match="zero size"):
        image_size(Image.new("RGB", (7, 0)))
    with pytest.raises(ImageLoadError, match="unsupported image source"):
        load_image(12345)


def test_exif_rotation_size_from_header_matches_pixels(tmp_path):
    image = Image.new("RGB", (40, 10), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert image_size(path) == (10, 40)
    assert load_image(path).size == (10, 40)


def test_extreme_aspect_ratio_tiles():
    image = load_image(Image.new("RGB", (1, 10000), (5, 5, 5)))
    grid = select_grid(*image.size, 56, 1, 12)
    assert grid == (1, 12)
    assert tile_image(image, grid, tile_size=56).shape == (13, 3, 56, 56)


PEAK_SCRIPT = """
import resource, sys
from longvl.eagle.processing.image_io import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image(sys.argv[1])
    outcome = "decoded"
except Exception as error:
    outcome = type(error).__name__
print(outcome, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_png_declaring_15000x11000_is_refused_from_its_header(tmp_path):
    """A 20 KiB PNG declaring 165 M pixels (under Pillow's own bomb limit) must not be decoded: the header says
    it exceeds the pixel cap, and peak memory stays far below one byte per declared pixel."""
    import subprocess
    import sys
    path = tmp_path / "huge.png"
    _write_png_declaring(str(path), (15000, 11000))
    assert path.stat().st_size < 470 * 1024 and image_size(path, max_pixels=None) == (15000, 11000)
    with pytest.raises(ImageTooLargeError, match="15000x11000"):
        image_size(path)
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        load_image(path)
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                            check=True, timeout=120)
    outcome, grown = result.stdout.split()
    assert outcome == "ImageTooLargeError" and int(grown) < 15000 * 11000 // 8, result.stdout


def test_processor_refuses_an_image_over_its_pixel_cap(tmp_path):
    from longvl.eagle.processing.tokenizer import tiny_tokenizer
    from longvl.eagle.processor import EagleProcessor
    path = tmp_path / "wide.png"
    Image.new("RGB", (3000, 400), (9, 9, 9)).save(path)
    message = [{"role": "user", "content": "<image>"}]
    assert EagleProcessor(tiny_tokenizer(), tile_size=56, tokens_per_tile=4).plan(message, [path]).image_sizes
    capped = EagleProcessor(tiny_tokenizer(), tile_size=56, tokens_per_tile=4, max_image_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match="1200000 pixels"):
        capped.plan(message, [path])


def _gradient(width, height):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.broadcast_to(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2), (height, width, 3))


def test_large_jpeg_decodes_reduced_to_what_tiling_uses(tmp_path):
    """A 4000x3000 JPEG tiled onto a 2x1 grid of 448 px tiles decodes at 1/4 scale (1000x750: the smallest that
    still covers 896x448), and its tiles match those cut from the full decode."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(_gradient(4000, 3000).astype(np.uint8)).save(path, quality=95)
    reduced = load_image(path, min_size=(896, 448))
    assert reduced.size == (1000, 750) and decoded_from(reduced.size, image_size(path))
    full = load_image(path)
    assert full.size == (4000, 3000)
    difference = np.abs(cut_tiles(reduced, (2, 1)).astype(int) - cut_tiles(full, (2, 1)).astype(int))
    assert difference.mean() < 1.0 and difference.max() <= 8
    # A cap below the full size but above the 1/8 decode: accepted from the header, decoded reduced.
    assert image_size(path, max_pixels=1_000_000) == (4000, 3000)
    assert load_image(path, min_size=(448, 300), max_pixels=1_000_000).size == (500, 375)
    with pytest.raises(ImageTooLargeError, match="would decode to 4000x3000"):
        load_image(path, max_pixels=1_000_000)  # no min_size: nothing lets it decode reduced


def test_rotated_jpeg_reduces_in_its_stored_orientation(tmp_path):
    image = Image.fromarray(_gradient(2000, 1000).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 1000 wide, 2000 high
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert image_size(path) == (1000, 2000)
    reduced = load_image(path, min_size=(448, 896))
    assert reduced.size == (500, 1000) and decoded_from(reduced.size, (1000, 2000))


def test_pillow_decompression_bomb_error_is_an_image_load_error(tmp_path):
    path = tmp_path / "bomb.png"
    _write_png_declaring(str(path), (20000, 20000))  # 400 M pixels: over twice Pillow's limit
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        image_size(path, max_pixels=None)
