"""EagleImageProcessor: images and video frames -> Eagle's square tiles, as a Hugging Face image processor.

An image becomes the grid of tiles that Image Area Preservation picks (longvl.eagle.processing.tiling), cut
row-major, plus a whole-image thumbnail when the grid has more than one tile; a video frame becomes one tile.
Pixels are scaled to [-1, 1] (mean 0.5, std 0.5 per channel), or kept as raw uint8 with
`pixel_dtype="uint8"` (the model normalises those on its own device: 4x less host memory and transfer).

`save_pretrained` / `from_pretrained` / `AutoImageProcessor` keep the options below; the processor that pairs
it with the tokenizer is longvl.eagle.processor.EagleProcessor.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from longvl.eagle.processing.image_io import MAX_IMAGE_PIXELS, image_size, load_image
from longvl.eagle.processing.tiling import candidate_grids, cut_tiles, normalize, select_grid

PIXEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "uint8": torch.uint8}
# Keys transformers itself writes into a saved image-processor config next to ours.
_HF_BOOKKEEPING_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype must be one of {sorted(PIXEL_DTYPES)}, got {dtype!r}")
    return name


class EagleImageProcessor(BaseImageProcessor):
    """IAP tiles + thumbnail per image, one tile per video frame, normalised (or raw uint8) pixels.

    Options (saved with the processor): `tile_size` (the vision tower's input side, 448 for the release),
    `min_tiles` / `max_tiles` (IAP's grid range, 1..12 in the release), `use_thumbnail`, `dynamic_image_size`
    (False: one tile per image), `pixel_dtype` ("float32", "bfloat16", "float16" or "uint8") and
    `resize_threads` (video frames resized in parallel; PIL releases the GIL).
    """

    model_input_names = ["pixel_values", "num_tiles"]

    def __init__(self, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = True,
                 dynamic_image_size: bool = True, pixel_dtype="float32", resize_threads: int = 1,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, **kwargs):
        unknown = sorted(set(kwargs) - set(_HF_BOOKKEEPING_KEYS))
        if unknown:
            raise TypeError(f"EagleImageProcessor got unknown options {unknown}")
        super().__init__(**kwargs)
        candidate_grids(min_tiles, max_tiles)  # raises on a bad tile range now rather than at the first image
        if tile_size < 1 or resize_threads < 1:
            raise ValueError(f"tile_size and resize_threads must be >= 1, got {tile_size}, {resize_threads}")
        self.tile_size = tile_size
        self.min_tiles, self.max_tiles = min_tiles, max_tiles
        self.use_thumbnail = use_thumbnail
        self.dynamic_image_size = dynamic_image_size
        self.pixel_dtype = _dtype_name(pixel_dtype)
        self.resize_threads = resize_threads
        self.max_image_pixels = max_image_pixels  # no image decodes to more pixels (ImageTooLargeError)

    # --- tile choices (a tile cap comes from Automatic Degrade Sampling) ---------------------------------------
    @property
    def tile_limit(self) -> int:
        """Most grid tiles an image may get: max_tiles, or 1 without dynamic image size."""
        return self.max_tiles if self.dynamic_image_size else 1

    def grid(self, size: tuple[int, int], tile_cap: int | None = None) -> tuple[int, int]:
        """(cols, rows) IAP picks for a (width, height) image with at most `tile_cap` grid tiles."""
        cap = self.tile_limit if tile_cap is None else min(self.tile_limit, tile_cap)
        return select_grid(*size, self.tile_size, min(self.min_tiles, cap), cap)

    def count_tiles(self, size: tuple[int, int], tile_cap: int | None = None) -> int:
        """Tiles a (width, height) image becomes: its grid's, plus the thumbnail when the grid has several."""
        cols, rows = self.grid(size, tile_cap)
        return cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)

    # --- pixels -------------------------------------------------------------------------------------------------
    def image_tiles(self, image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
        """RGB image -> uint8 (n, s, s, 3): the grid row-major, then the thumbnail."""
        return cut_tiles(image, grid, self.tile_size, self.use_thumbnail)

    def frame_tiles(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) video frames -> uint8 (n, s, s, 3), one tile per frame."""
        size = (self.tile_size, self.tile_size)
        out = np.empty((len(frames), *size, 3), np.uint8)

        def resize(k):
            out[k] = np.asarray(Image.fromarray(frames[k]).resize(size, Image.Resampling.BICUBIC))

        if self.resize_threads > 1:
            with ThreadPoolExecutor(self.resize_threads) as pool:
                list(pool.map(resize, range(len(frames))))
        else:
            for k in range(len(frames)):
                resize(k)
        return out

    def pixel_values(self, blocks: list[np.ndarray]) -> torch.Tensor:
        """uint8 tile blocks -> one contiguous (N, 3, s, s) tensor in `pixel_dtype`, each block written once."""
        out = torch.empty(sum(len(b) for b in blocks), 3, self.tile_size, self.tile_size,
                          dtype=PIXEL_DTYPES[self.pixel_dtype])
        start = 0
        for block in blocks:
            normalize(block, out=out[start:start + len(block)])
            start += len(block)
        return out

    def preprocess(self, images, max_tiles: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        """Images (paths, bytes or PIL images; one or a list) -> `pixel_values` (N, 3, s, s), every image's
        tiles in order, and `num_tiles` (tiles per image). `max_tiles` lowers the grid cap for this call."""
        if kwargs:
            raise TypeError(f"EagleImageProcessor got unknown arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"EagleImageProcessor returns torch tensors; return_tensors={return_tensors!r}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        blocks = []
        for source in images:
            cols, rows = grid = self.grid(image_size(source, self.max_image_pixels), max_tiles)
            image = load_image(source, (cols * self.tile_size, rows * self.tile_size), self.max_image_pixels)
            blocks.append(self.image_tiles(image, grid))
        return BatchFeature({"pixel_values": self.pixel_values(blocks),
                             "num_tiles": torch.tensor([len(b) for b in blocks], dtype=torch.long)})
