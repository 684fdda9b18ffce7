"""The default backend: `EagleProcessor` behind the data pipeline's plan / process interface.

It translates a validated `Record` into the processor's messages, its SamplePlan into the index fields,
and its typed errors into bad-sample reasons (too long after degrading, unreadable media, an image over the
pixel cap, decoder timeout).
"""
import dataclasses

from longvl.eagle.processing.errors import MediaError, SampleTooLongError, VideoTimeoutError
from longvl.eagle.processing.image_io import ImageTooLargeError
from longvl.eagle.processing.tokenizer import load_tokenizer, tiny_tokenizer
from longvl.eagle.processing.video import VideoMeta
from longvl.eagle.processor import EagleProcessor

from .backend import ProcessorBackend
from .bad_samples import BadSample


def _describe(degraded):
    """One readable line of what degrade sampling reduced, e.g. "image 0: 13->5 tiles; video 0: 64->20 frames"."""
    parts = [f"image {i}: {a}->{b} tiles" for i, a, b in degraded["images"]]
    parts += [f"video {v}: {a}->{b} frames" for v, a, b in degraded["videos"]]
    return "; ".join(parts)


class EagleBackend(ProcessorBackend):
    """Builds the tokenizer (a local folder, or the small built-in one) and an `EagleProcessor`.

    `processor_options` go to EagleProcessor (tile_size, tokens_per_tile, max_tiles, sample_fps,
    max_image_pixels, ...).
    """

    def __init__(self, tokenizer=None, **processor_options):
        self.processor = EagleProcessor(load_tokenizer(tokenizer) if tokenizer else tiny_tokenizer(),
                                        **processor_options)

    @staticmethod
    def _messages(record):
        return [{"role": turn.role, "content": turn.text} for turn in record.turns]

    def _guarded(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SampleTooLongError as error:
            raise BadSample("too_long", str(error)) from error
        except VideoTimeoutError as error:
            raise BadSample("timeout", str(error)) from error
        except ImageTooLargeError as error:
            raise BadSample("image_too_large", str(error)) from error
        except MediaError as error:
            raise BadSample("corrupt_media", str(error)) from error

    def plan(self, record, max_length):
        plan = self._guarded(self.processor.plan, self._messages(record), record.images, record.videos, max_length)
        return {
            "length": plan.num_tokens,
            "images": len(record.images),
            "frames": sum(len(indices) for indices in plan.frame_indices),
            "tiles": plan.num_image_tiles,
            "degraded": _describe(plan.degraded),
            # The path is left out: the index must stay valid when the data folder moves.
            "video_meta": [{k: v for k, v in dataclasses.asdict(meta).items() if k != "path"}
                           for meta in plan.video_meta],
        }

    @staticmethod
    def _stored_videos(record, video_meta):
        """The record's videos as the index's stored VideoMeta, so processing does not open each file twice."""
        if not video_meta:  # an index entry without metadata: the processor reads the containers itself
            return record.videos
        if len(video_meta) != len(record.videos):
            raise ValueError(f"index holds metadata for {len(video_meta)} videos but record {record.id!r} has "
                             f"{len(record.videos)}: rebuild the index")
        return [VideoMeta(path=str(path), **meta) for path, meta in zip(record.videos, video_meta)]

    def process(self, record, max_length, video_meta):
        """Tokens, labels and pixels, sampling frames from `video_meta` (the index's per-video metadata)."""
        videos = self._stored_videos(record, video_meta)
        out = self._guarded(self.processor.process, self._messages(record), record.images, videos, max_length)
        plan = out.plan
        return {
            "input_ids": out.input_ids,
            "labels": out.labels,
            "pixel_values": out.pixel_values,
            "num_tiles": out.num_tiles.tolist(),
            "frames": sum(len(indices) for indices in plan.frame_indices),
            "degraded": _describe(plan.degraded),
        }
