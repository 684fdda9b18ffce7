"""Image Area Preservation (IAP) tiling: choose a cols x rows grid of square tiles for an image.

Score of a grid (i cols, j rows) for a W x H image with tile side s:
    min(i*j*s*s / (W*H), 0.6) * min(r / r0, r0 / r),   r = i / j,  r0 = W / H
Candidates go in order of tile count and the first strictly best one wins, so ties keep the smaller grid.
Scores are compared as exact fractions: with floats, mathematically equal scores (e.g. 9 tiles at aspect 1
versus 12 tiles at aspect 3/4) can differ in the last bit and pick the larger grid. Among grids with the same
tile count, fewer columns come first.
"""
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

AREA_CAP = Fraction(3, 5)  # the area term stops rewarding more tiles beyond 60 % of the image's area


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_tiles <= cols*rows <= max_tiles, by tile count, then by cols."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles // i + 1)
             if min_tiles <= i * j]
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g[0])))


def iap_score(cols: int, rows: int, width: int, height: int, tile_size: int) -> Fraction:
    """The IAP objective of one grid, exactly."""
    area = min(Fraction(cols * rows * tile_size * tile_size, width * height), AREA_CAP)
    ratio = Fraction(cols * height, rows * width)  # r / r0
    return area * min(ratio, 1 / ratio)


def select_grid(width: int, height: int, tile_size: int = 448, min_tiles: int = 1,
                max_tiles: int = 12) -> tuple[int, int]:
    """The (cols, rows) grid IAP picks for a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best, best_score = None, Fraction(-1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        score = iap_score(cols, rows, width, height, tile_size)
        if score > best_score:
            best, best_score = (cols, rows), score
    return best


def num_tiles(width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
              use_thumbnail: bool = True) -> int:
    """Tiles an image becomes: the grid's, plus one thumbnail when the grid has more than one tile."""
    cols, rows = select_grid(width, height, tile_size, min_tiles, max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def normalize(tiles: np.ndarray, out: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> (n, 3, H, W) scaled to [-1, 1] (mean 0.5, std 0.5 per channel), written into
    `out` when given, so a sample's tiles are never copied twice. A uint8 `out` keeps raw pixels: the model
    normalises those on its own device (4x less host memory and transfer)."""
    source = torch.from_numpy(np.require(tiles, requirements=("W",))).permute(0, 3, 1, 2)
    if out is None:
        out = torch.empty(source.shape, dtype=dtype)
    if out.shape != source.shape:
        raise ValueError(f"normalize: out has shape {tuple(out.shape)}, tiles need {tuple(source.shape)}")
    out.copy_(source)  # layout and dtype in one pass; mixed-dtype strided arithmetic is 2x slower
    return out if out.dtype == torch.uint8 else out.mul_(1 / 127.5).sub_(1.0)


def cut_tiles(image: Image.Image, grid: tuple[int, int], tile_size: int = 448,
              use_thumbnail: bool = True) -> np.ndarray:
    """RGB image -> uint8 tiles (n, s, s, 3): the (cols, rows) grid row-major, then the thumbnail if the grid
    has more than one tile."""
    if image.mode != "RGB":
        raise ValueError(f"cut_tiles expects an RGB image, got mode {image.mode!r} (use image_io.load_image)")
    cols, rows = grid
    resized = np.asarray(image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC))
    tiles = resized.reshape(rows, tile_size, cols, tile_size, 3).swapaxes(1, 2)
    count = rows * cols + (1 if use_thumbnail and rows * cols > 1 else 0)
    out = np.empty((count, tile_size, tile_size, 3), np.uint8)
    out[:rows * cols] = tiles.reshape(rows * cols, tile_size, tile_size, 3)
    if count > rows * cols:
        out[-1] = np.asarray(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return out


def tile_image(image: Image.Image, grid: tuple[int, int], tile_size: int = 448,
               use_thumbnail: bool = True) -> torch.Tensor:
    """RGB image -> normalised float32 tiles (n, 3, s, s), in cut_tiles' order."""
    return normalize(cut_tiles(image, grid, tile_size, use_thumbnail))
