"""Automatic Degrade Sampling: fit a sample into a max length without ever cutting its text.

The visual budget is max_length - text tokens. Degradation works on two caps shared by the sample's items:
the frames per video (each video is uniformly resampled to at most that many frames) and the tiles per image
(IAP re-run with that max tile count; one tile means no thumbnail). The frame cap goes down first, to 1, and
only then the tile cap, to 1. A binary search keeps the largest cap that fits: the result always fits, and
it is the largest such cap whenever the cost never drops as a cap grows (frame timestamps are tokenised, so
the cost can wobble by a token; then a cap a little smaller may be kept). If the text alone, or the text with
the least visual content, does not fit, SampleTooLongError says which.

The function is pure: the caller supplies `visual_tokens(frame_cap, tile_cap)`, the exact token count of all
visual content (wrappers and timestamps included) under those caps.
"""
import dataclasses
from collections.abc import Callable

from longvl.eagle.processing.errors import SampleTooLongError


@dataclasses.dataclass(frozen=True)
class DegradePlan:
    frame_cap: int
    tile_cap: int
    text_tokens: int
    visual_tokens: int
    frames_degraded: bool
    tiles_degraded: bool

    @property
    def total_tokens(self) -> int:
        return self.text_tokens + self.visual_tokens

    @property
    def degraded(self) -> bool:
        return self.frames_degraded or self.tiles_degraded


def _largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int:
    """Largest cap in [low, high] with fits(cap), given fits(low)."""
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def degrade_to_fit(max_length: int | None, text_tokens: int, visual_tokens: Callable[[int, int], int],
                   max_frames: int, max_tiles: int, has_videos: bool, has_images: bool) -> DegradePlan:
    """Choose (frame_cap, tile_cap) so that text + visual tokens <= max_length, degrading frames first."""
    def plan(frames, tiles):
        return DegradePlan(frames, tiles, text_tokens, visual_tokens(frames, tiles),
                           frames < max_frames, tiles < max_tiles)

    full = plan(max_frames, max_tiles)
    if max_length is None or full.total_tokens <= max_length:
        return full
    if text_tokens > max_length:
        raise SampleTooLongError(f"the text alone is {text_tokens} tokens, more than max_length={max_length}; "
                                 "ADS never cuts text, so the sample must be dropped", text_tokens, None, max_length)
    budget = max_length - text_tokens
    least = visual_tokens(1, 1)
    if least > budget:
        raise SampleTooLongError(f"text ({text_tokens} tokens) plus the least visual content (1 frame per video, "
                                 f"1 tile per image: {least} tokens) exceeds max_length={max_length}",
                                 text_tokens, least, max_length)
    if has_videos and visual_tokens(1, max_tiles) <= budget:
        frames = _largest_fitting(1, max_frames, lambda cap: visual_tokens(cap, max_tiles) <= budget)
        return plan(frames, max_tiles)
    frames = 1 if has_videos else max_frames
    tiles = max_tiles
    if has_images:
        tiles = _largest_fitting(1, max_tiles, lambda cap: visual_tokens(frames, cap) <= budget)
    return plan(frames, tiles)
