"""Video metadata, frame sampling (SPEC §4) and decoding: decord first, OpenCV when decord is missing or fails.

Every decoder call runs under a time limit in a daemon thread: some files make decoders hang, and a hung
native call cannot be interrupted, so the caller gets a VideoTimeoutError and moves on (the stuck thread
never blocks interpreter exit). decord deadlocks in forked processes: data loaders should spawn workers.

Without fps metadata (fps missing, zero or NaN) the documented fallback is to assume ASSUMED_FPS for
sampling and timestamps; `VideoMeta.fps_assumed` says so.
"""
import dataclasses
import importlib.util
import math
import os

import numpy as np

from longvl.eagle.processing.errors import VideoLoadError, VideoTimeoutError
from longvl.eagle.timeouts import run_with_timeout

ASSUMED_FPS = 30.0
MAX_VIDEO_FRAMES = 512  # the most frames per video the model supports
DEFAULT_TIMEOUT_S = 120.0
BACKENDS = ("decord", "opencv")


@dataclasses.dataclass(frozen=True)
class VideoMeta:
    path: str
    num_frames: int
    fps: float
    backend: str
    fps_assumed: bool = False

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def has_decord() -> bool:
    return importlib.util.find_spec("decord") is not None


def _clean_fps(fps) -> float | None:
    return float(fps) if fps is not None and math.isfinite(fps) and fps > 0 else None


def _decord_meta(path):
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    return len(reader), _clean_fps(reader.get_avg_fps())


def _opencv_meta(path):
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise VideoLoadError(f"OpenCV cannot open video {path}")
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), _clean_fps(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()


def _decord_frames(path, indices, num_threads):
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    last = len(reader) - 1
    if last < 0:
        raise VideoLoadError(f"decord found no frames in {path}")
    return reader.get_batch([min(i, last) for i in indices]).asnumpy()


def _opencv_frames(path, indices, seek_gap=64):
    """Read forward, grabbing (not converting) skipped frames; seek only across long gaps."""
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise VideoLoadError(f"OpenCV cannot open video {path}")
        frames, position, last_frame = [], 0, None
        for index in indices:
            if index - position > seek_gap:
                capture.set(cv2.CAP_PROP_POS_FRAMES, index)
                position = index
            while position <= index:
                if not capture.grab():
                    break
                position += 1
            else:
                ok, frame = capture.retrieve()
                if ok:
                    last_frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    frames.append(last_frame)
                    continue
            if last_frame is None:  # past the real end: repeat the last good frame (index clamping)
                raise VideoLoadError(f"OpenCV could not decode frame {index} of {path}")
            frames.append(last_frame)
        return np.stack(frames)
    finally:
        capture.release()


def _order(backend: str) -> tuple[str, ...]:
    if backend == "auto":
        return BACKENDS if has_decord() else ("opencv",)
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    return (backend,)


def _try_backends(backend, path, what, calls, timeout_s):
    errors = {}
    for name in _order(backend):
        try:
            label = f"{name} {what} {path}"
            return name, run_with_timeout(
                calls[name], timeout_s, lambda: VideoTimeoutError(f"{label}: no answer within {timeout_s:g} s"),
                name=f"video-decode:{label}")
        except Exception as err:  # this decoder failed: note why and try the next one
            errors[name] = err
    timed_out = all(isinstance(err, VideoTimeoutError) for err in errors.values())
    reasons = "; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in errors.items())
    raise (VideoTimeoutError if timed_out else VideoLoadError)(f"cannot {what} video {path}: {reasons}")


def read_video_meta(path, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> VideoMeta:
    """Frame count and fps from the container, without decoding the video's frames."""
    path = str(path)
    if not path or not os.path.isfile(path):
        raise VideoLoadError(f"video file not found: {path}")
    calls = {"decord": lambda: _decord_meta(path), "opencv": lambda: _opencv_meta(path)}
    name, (count, fps) = _try_backends(backend, path, "read metadata of", calls, timeout_s)
    if count < 1:
        raise VideoLoadError(f"video {path} has no frames ({name} counts {count})")
    return VideoMeta(path, count, fps or ASSUMED_FPS, name, fps_assumed=fps is None)


def check_frame_range(min_frames: int, max_frames: int):
    if not 1 <= min_frames <= max_frames <= MAX_VIDEO_FRAMES:
        raise ValueError(f"need 1 <= min_frames <= max_frames <= {MAX_VIDEO_FRAMES}, got {min_frames}, {max_frames}")


def sample_frame_indices(num_frames: int, fps: float, sample_fps: float = 2.0, min_frames: int = 8,
                         max_frames: int = 128) -> list[int]:
    """Which frames to use: all when there are few, else duration * min(sample_fps, fps) frames clamped to
    [min_frames, max_frames], at round(linspace(0, T-1, n)) (numpy's round half to even)."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    check_frame_range(min_frames, max_frames)
    wanted = int(num_frames / fps * min(sample_fps, fps) + 1e-9)  # 14.0 must not floor to 13
    count = min(num_frames, max(min_frames, min(wanted, max_frames)))
    return np.round(np.linspace(0, num_frames - 1, count)).astype(np.int64).tolist()


def decode_frames(path, indices, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                  num_threads: int = 2) -> tuple[np.ndarray, str]:
    """Frames at `indices` as uint8 (n, H, W, 3) RGB, and the backend that decoded them. Indices past the
    decoder's own frame count (containers disagree by a frame or two) read the last frame."""
    path = str(path)
    if not os.path.isfile(path):
        raise VideoLoadError(f"video file not found: {path}")
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"frame indices must be a non-empty list of non-negative ints, got {indices[:8]}")
    calls = {"decord": lambda: _decord_frames(path, indices, num_threads),
             "opencv": lambda: _opencv_frames(path, indices)}
    name, frames = _try_backends(backend, path, "decode", calls, timeout_s)
    return frames, name
