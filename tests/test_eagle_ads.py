"""Automatic Degrade Sampling as a pure function: order (frames, then tiles), largest caps that fit, errors."""
import pytest

from longvl.eagle.processing.ads import degrade_to_fit
from longvl.eagle.processing.errors import SampleTooLongError

TEXT = 100


def cost(frame_cap, tile_cap, videos=(40, 7), images=(12, 3)):
    """Two videos (40 and 7 frames, 11 tokens each) and two images (tiles capped, 5 tokens each + thumb)."""
    frames = sum(min(n, frame_cap) for n in videos) * 11
    tiles = 0
    for n in images:
        chosen = min(n, tile_cap)
        tiles += (chosen + (chosen > 1)) * 5
    return frames + tiles


def fit(max_length, **kw):
    return degrade_to_fit(max_length, TEXT, lambda f, t: cost(f, t, **kw), max_frames=64, max_tiles=12,
                          has_videos=True, has_images=True)


def test_no_degradation_when_it_fits():
    full = TEXT + cost(64, 12)
    for max_length in (None, full, full + 50):
        plan = fit(max_length)
        assert (plan.frame_cap, plan.tile_cap, plan.degraded) == (64, 12, False)
        assert plan.total_tokens == full


def test_frames_first_with_the_largest_cap_that_fits():
    full = TEXT + cost(64, 12)
    for max_length in range(full - 1, TEXT + cost(1, 12) - 1, -3):
        plan = fit(max_length)
        assert plan.tile_cap == 12 and plan.frames_degraded and not plan.tiles_degraded
        assert plan.total_tokens <= max_length < TEXT + cost(plan.frame_cap + 1, 12)


def test_then_tiles_down_to_one():
    for max_length in range(TEXT + cost(1, 12) - 1, TEXT + cost(1, 1) - 1, -2):
        plan = fit(max_length)
        assert plan.frame_cap == 1 and plan.tiles_degraded
        assert plan.total_tokens <= max_length < TEXT + cost(1, plan.tile_cap + 1)
    assert fit(TEXT + cost(1, 1)).tile_cap == 1


def test_images_only_and_videos_only():
    only_images = degrade_to_fit(TEXT + cost(0, 4, videos=()), TEXT, lambda f, t: cost(f, t, videos=()),
                                 max_frames=64, max_tiles=12, has_videos=False, has_images=True)
    assert (only_images.frame_cap, only_images.tile_cap, only_images.frames_degraded) == (64, 4, False)
    only_videos = degrade_to_fit(TEXT + 11 * 20, TEXT, lambda f, t: cost(f, t, images=()),
                                 max_frames=64, max_tiles=12, has_videos=True, has_images=False)
    assert (only_videos.frame_cap, only_videos.tile_cap, only_videos.tiles_degraded) == (13, 12, False)


def test_errors_name_the_reason():
    with pytest.raises(SampleTooLongError, match="text alone is 100 tokens") as err:
        fit(TEXT - 1)
    assert (err.value.text_tokens, err.value.max_length) == (TEXT, TEXT - 1)
    with pytest.raises(SampleTooLongError, match="least visual content") as err:
        fit(TEXT + cost(1, 1) - 1)
    assert err.value.min_visual_tokens == cost(1, 1)
