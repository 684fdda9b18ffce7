"""EagleProcessor: a ChatML conversation with images and videos -> model inputs, with ADS against a max length.

Input: `messages` = [{"role": "system" | "user" | "assistant", "content": str}, ...] where `<image>` and
`<video>` in the content mark where the k-th image / video goes (without placeholders, media go first in the
first user turn); `images` = paths, bytes or PIL images; `videos` = paths, or VideoMeta from an earlier
plan (e.g. kept in the data index), which skips re-reading the container.

`processor(messages, images, videos, max_length=None, add_generation_prompt=False)` returns a dict:
- `input_ids`  LongTensor (L,): the tokens, visual blocks expanded (`<img>` + `<IMG_CONTEXT>` x 256 x tiles
  + `</img>`; video frames as "Frame k at t.tts: <img>...</img>\\n").
- `labels`  LongTensor (L,): token ids on assistant text and its `<|im_end|>`, -100 elsewhere (unshifted).
- `pixel_values`  (N, 3, s, s), contiguous: every tile in token order (an image's grid row-major, then its
  thumbnail; one tile per frame), normalised with mean 0.5 / std 0.5 in `pixel_dtype` (float32 by
  default), or raw 0..255 when `pixel_dtype=torch.uint8` (the model normalises those). N may be 0.
- `num_tiles`  LongTensor (blocks,): tiles per `<img>` block in token order (an image's tiles, 1 per frame);
  `num_tiles.sum() * tokens_per_tile == (input_ids == image_token_id).sum()` always.
- `plan`  SamplePlan: the token count, per-image grids and tiles, per-video frame indices and timestamps,
  and `degraded` (what ADS reduced, before -> after).

`processor.plan(...)` returns the same SamplePlan without decoding any pixel (image headers and video
metadata only): the data pipeline's offline index uses it to get exact lengths cheaply. When the sample
cannot fit, both raise SampleTooLongError; bad media raise ImageLoadError / VideoLoadError (MediaError).
"""
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from longvl.eagle.processing.ads import DegradePlan, degrade_to_fit
from longvl.eagle.processing.errors import ImageLoadError
from longvl.eagle.processing.image_io import MAX_IMAGE_PIXELS, decoded_from, image_size, load_image
from longvl.eagle.processing.template import ChatTemplate
from longvl.eagle.processing.tiling import candidate_grids, cut_tiles, normalize, select_grid
from longvl.eagle.processing.tokenizer import IMG_CONTEXT
from longvl.eagle.processing.video import (DEFAULT_TIMEOUT_S, VideoMeta, check_frame_range, decode_frames, read_video_meta,
                                   sample_frame_indices)


@dataclasses.dataclass
class SamplePlan:
    num_tokens: int
    text_tokens: int
    image_sizes: list           # (width, height) per image
    image_grids: list           # (cols, rows) per image, after ADS
    image_tiles: list           # tiles per image incl. thumbnail, after ADS
    video_meta: list            # VideoMeta per video
    frame_indices: list         # per video: decoded frame indices, after ADS
    timestamps: list            # per video: seconds of each frame
    degrade: DegradePlan
    degraded: dict              # {"images": [(i, tiles_before, tiles_after)], "videos": [(v, frames_before, after)]}

    @property
    def num_image_tiles(self) -> int:
        return sum(self.image_tiles) + sum(len(f) for f in self.frame_indices)


class EagleProcessor:
    def __init__(self, tokenizer, tile_size: int = 448, tokens_per_tile: int = 256, min_tiles: int = 1,
                 max_tiles: int = 12, use_thumbnail: bool = True, dynamic_image_size: bool = True,
                 sample_fps: float = 2.0, min_frames: int = 8, max_frames: int = 128,
                 video_backend: str = "auto", decode_timeout_s: float = DEFAULT_TIMEOUT_S,
                 pixel_dtype: torch.dtype = torch.float32, resize_threads: int = 1,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        check_frame_range(min_frames, max_frames)
        candidate_grids(min_tiles, max_tiles)  # raises on a bad tile range now rather than at the first image
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, tokens_per_tile)
        self.image_token_id = self.template.img_context
        self.tile_size, self.tokens_per_tile = tile_size, tokens_per_tile
        self.min_tiles, self.max_tiles = min_tiles, max_tiles if dynamic_image_size else 1
        self.use_thumbnail = use_thumbnail
        self.sample_fps, self.min_frames, self.max_frames = sample_fps, min_frames, max_frames
        self.video_backend, self.decode_timeout_s = video_backend, decode_timeout_s
        self.pixel_dtype = pixel_dtype
        self.resize_threads = resize_threads  # frames resized in parallel (PIL releases the GIL); 1 in loaders
        self.max_image_pixels = max_image_pixels  # no image decodes to more pixels (ImageTooLargeError)

    @classmethod
    def from_config(cls, config, tokenizer, **options):
        """Tile size, tokens per tile and tiling options from an EagleConfig; video options as keywords."""
        token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if token_id != config.image_token_index:
            raise ValueError(f"tokenizer's {IMG_CONTEXT} id is {token_id} but the model's image_token_index is "
                             f"{config.image_token_index}")
        return cls(tokenizer, tile_size=config.force_image_size, tokens_per_tile=config.tokens_per_tile,
                   min_tiles=config.min_dynamic_tiles, max_tiles=config.max_dynamic_tiles,
                   use_thumbnail=config.use_thumbnail, dynamic_image_size=config.dynamic_image_size, **options)

    # --- per-item choices under ADS caps ----------------------------------------------------------------------
    def _grid(self, size, tile_cap):
        return select_grid(*size, self.tile_size, min(self.min_tiles, tile_cap), min(self.max_tiles, tile_cap))

    def _tiles(self, size, tile_cap):
        cols, rows = self._grid(size, tile_cap)
        return cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)

    def _frames(self, meta: VideoMeta, frame_cap):
        return sample_frame_indices(meta.num_frames, meta.fps, self.sample_fps,
                                    min(self.min_frames, frame_cap), min(self.max_frames, frame_cap))

    @staticmethod
    def _timestamps(meta: VideoMeta, indices):
        return [index / meta.fps for index in indices]

    # --- planning ---------------------------------------------------------------------------------------------
    def plan(self, messages, images=(), videos=(), max_length: int | None = None,
             add_generation_prompt: bool = False) -> SamplePlan:
        """Token count and every visual choice, from image headers and video metadata only."""
        return self._plan(messages, list(images), list(videos), max_length, add_generation_prompt)[0]

    def _plan(self, messages, images, videos, max_length, add_generation_prompt):
        turns = self.template.split(messages, len(images), len(videos))
        sizes = [image_size(source, self.max_image_pixels) for source in images]
        metas = [v if isinstance(v, VideoMeta) else read_video_meta(v, self.video_backend, self.decode_timeout_s)
                 for v in videos]
        text = self.template.text_length(turns, add_generation_prompt)

        def visual_tokens(frame_cap, tile_cap):
            tokens = sum(self.template.image_length(self._tiles(size, tile_cap)) for size in sizes)
            for meta in metas:
                tokens += self.template.video_length(self._timestamps(meta, self._frames(meta, frame_cap)))
            return tokens

        degrade = degrade_to_fit(max_length, text, visual_tokens, self.max_frames, self.max_tiles,
                                 has_videos=bool(metas), has_images=bool(sizes))
        grids = [self._grid(size, degrade.tile_cap) for size in sizes]
        tiles = [self._tiles(size, degrade.tile_cap) for size in sizes]
        frames = [self._frames(meta, degrade.frame_cap) for meta in metas]
        full_tiles = [self._tiles(size, self.max_tiles) for size in sizes]
        full_frames = [len(self._frames(meta, self.max_frames)) for meta in metas]
        degraded = {
            "images": [(i, a, b) for i, (a, b) in enumerate(zip(full_tiles, tiles)) if a != b],
            "videos": [(v, a, len(b)) for v, (a, b) in enumerate(zip(full_frames, frames)) if a != len(b)],
        }
        plan = SamplePlan(num_tokens=degrade.total_tokens, text_tokens=text, image_sizes=sizes, image_grids=grids,
                          image_tiles=tiles, video_meta=metas, frame_indices=frames,
                          timestamps=[self._timestamps(m, f) for m, f in zip(metas, frames)],
                          degrade=degrade, degraded=degraded)
        return plan, turns

    # --- full processing --------------------------------------------------------------------------------------
    def __call__(self, messages, images=(), videos=(), max_length: int | None = None,
                 add_generation_prompt: bool = False) -> dict:
        images, videos = list(images), list(videos)
        plan, turns = self._plan(messages, images, videos, max_length, add_generation_prompt)
        input_ids, labels = self.template.render(turns, plan.image_tiles, plan.timestamps, add_generation_prompt)
        if len(input_ids) != plan.num_tokens:
            raise RuntimeError(f"rendered {len(input_ids)} tokens but planned {plan.num_tokens}")
        tiles, num_tiles = [], []
        for kind, index in self.template.media_order(turns):
            if kind == "image":
                tiles.append(self._image_tiles(images[index], plan, index))
                num_tiles.append(len(tiles[-1]))
            else:
                tiles.append(self._video_tiles(plan.video_meta[index], plan.frame_indices[index]))
                num_tiles += [1] * len(tiles[-1])
        pixel_values = torch.empty(sum(num_tiles), 3, self.tile_size, self.tile_size, dtype=self.pixel_dtype)
        start = 0
        for block in tiles:
            normalize(block, out=pixel_values[start:start + len(block)])
            start += len(block)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_tiles": torch.tensor(num_tiles, dtype=torch.long),
            "plan": plan,
        }

    def _image_tiles(self, source, plan: SamplePlan, index: int) -> np.ndarray:
        cols, rows = plan.image_grids[index]
        image = load_image(source, (cols * self.tile_size, rows * self.tile_size), self.max_image_pixels)
        if not decoded_from(image.size, plan.image_sizes[index]):
            raise ImageLoadError(f"image {index} decodes as {image.size} but its header says {plan.image_sizes[index]}")
        return cut_tiles(image, plan.image_grids[index], self.tile_size, self.use_thumbnail)

    def _video_tiles(self, meta: VideoMeta, indices) -> np.ndarray:
        frames, _ = decode_frames(meta.path, indices, self.video_backend, self.decode_timeout_s)
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

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)
