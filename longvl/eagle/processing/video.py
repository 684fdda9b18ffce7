"""Video metadata, frame sampling and decoding: decord first, OpenCV when decord is missing or fails.

Every decoder call runs under a time limit in a daemon thread: some files make decoders hang, and a hung
native call cannot be interrupted, so the caller gets a VideoTimeoutError and moves on (the stuck thread
never blocks interpreter exit). decord deadlocks in forked processes: data loaders should spawn workers.

Without fps metadata (fps missing, zero or NaN) the documented fallback is to assume ASSUMED_FPS for
sampling and timestamps; `VideoMeta.fps_assumed` says so.

Decoded frames are the requested ones or an error, never others in their place: OpenCV's seek is trusted
only when it is confirmed (some files' indexes are broken: the seek fails or lands nowhere), else frames
are read in order; an index past the real end of the stream reads the last frame only when it is at most
END_SLACK_FRAMES past it (containers overstate their frame count by a frame or two).

Decoders write their complaints about a bad file ("ERROR opening ...", "moov atom not found") straight to
the process's stderr from C code. While a decoder runs, file descriptor 2 goes to a temporary file: when
the video fails, what they wrote becomes part of the VideoLoadError (the bad-sample report says it once);
otherwise it is written to stderr as it would have been. The redirection is per process, so decoder calls
of one process take turns (data workers decode one video at a time anyway).
"""
import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading

import numpy as np

from longvl.eagle.processing.errors import VideoLoadError, VideoTimeoutError
from longvl.eagle.timeouts import run_with_timeout

ASSUMED_FPS = 30.0
MAX_VIDEO_FRAMES = 512  # the most frames per video the model supports
DEFAULT_TIMEOUT_S = 120.0
BACKENDS = ("decord", "opencv")
END_SLACK_FRAMES = 2  # how far past the last decodable frame an index may ask and get the last frame
_NATIVE_STDERR = threading.Lock()
_NOISE = re.compile(r"^\[\d\d:\d\d:\d\d\] | @ 0x[0-9a-f]+")  # clock times and addresses in decoder messages


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


def _past_end(path, index, last, decoder):
    return VideoLoadError(f"{decoder} decodes {last + 1} frames of {path}, frame {index} was asked for "
                          f"(more than {END_SLACK_FRAMES} past the end)")


def _decord_frames(path, indices, num_threads):
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    last = len(reader) - 1
    if last < 0:
        raise VideoLoadError(f"decord found no frames in {path}")
    if max(indices) - last > END_SLACK_FRAMES:
        raise _past_end(path, max(indices), last, "decord")
    return reader.get_batch([min(i, last) for i in indices]).asnumpy()


class _OpenCVReader:
    """Frame by index through cv2.VideoCapture, reading forward, grabbing (not converting) skipped frames,
    seeking across gaps longer than `seek_gap` only while seeks prove to work."""

    def __init__(self, path, seek_gap):
        self.path, self.seek_gap, self.seeking = path, seek_gap, True
        self.capture, self.position = None, 0  # position: the index the next grab() returns
        self._open()

    def _open(self):
        import cv2

        if self.capture is not None:
            self.capture.release()
        self.capture, self.position = cv2.VideoCapture(self.path), 0
        if not self.capture.isOpened():
            raise VideoLoadError(f"OpenCV cannot open video {self.path}")

    def _seek(self, index):
        """Seek to `index`; on a failed or unconfirmed seek, turn seeking off and start over from frame 0."""
        import cv2

        if self.capture.set(cv2.CAP_PROP_POS_FRAMES, index) and \
                int(self.capture.get(cv2.CAP_PROP_POS_FRAMES)) == index:
            self.position = index
            return True
        self.seeking = False
        self._open()
        return False

    def read(self, index):
        """The RGB frame at `index`, or None when the stream ends before it."""
        import cv2

        if index < self.position:  # asked for an earlier frame: start over
            self._open()
        seeked = self.seeking and index - self.position > self.seek_gap and self._seek(index)
        while self.position <= index:
            if not self.capture.grab():
                if seeked and self.position == index:  # the seek "worked" but nothing can be read there
                    self.seeking = False
                    self._open()
                    return self.read(index)
                return None
            self.position += 1
        ok, frame = self.capture.retrieve()
        if not ok:
            raise VideoLoadError(f"OpenCV could not decode frame {index} of {self.path}")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def release(self):
        self.capture.release()


def _opencv_frames(path, indices, seek_gap=64):
    """Frames at `indices` (any order, repeats allowed), each decoded once, in increasing index order."""
    reader = _OpenCVReader(path, seek_gap)
    try:
        frames = {}
        for index in sorted(set(indices)):
            frame = reader.read(index)
            if frame is None:  # the stream ends before `index`: it has reader.position frames
                last = reader.position - 1
                if last < 0:
                    raise VideoLoadError(f"OpenCV decodes no frame of {path}")
                if index - last > END_SLACK_FRAMES:
                    raise _past_end(path, index, last, "OpenCV")
                if last not in frames:
                    frames[last] = reader.read(last)
                frame = frames[last]
            frames[index] = frame
        return np.stack([frames[i] for i in indices])
    finally:
        reader.release()


@contextlib.contextmanager
def _native_stderr_captured():
    """Send file descriptor 2 to a temporary file for the duration; yields a list that receives its text."""
    captured = []
    with _NATIVE_STDERR, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to redirect
            yield captured
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _pass_on(text):
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def _order(backend: str) -> tuple[str, ...]:
    if backend == "auto":
        return BACKENDS if has_decord() else ("opencv",)
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    return (backend,)


def _try_backends(backend, path, what, calls, timeout_s):
    errors = {}
    with _native_stderr_captured() as native:
        for name in _order(backend):
            try:
                label = f"{name} {what} {path}"
                result = run_with_timeout(
                    calls[name], timeout_s, lambda: VideoTimeoutError(f"{label}: no answer within {timeout_s:g} s"),
                    name=f"video-decode:{label}")
                break
            except Exception as err:  # this decoder failed: note why and try the next one
                errors[name] = err
        else:
            name = None
    timed_out = all(isinstance(err, VideoTimeoutError) for err in errors.values())
    if name is not None or timed_out:
        _pass_on(native[0])
    if name is not None:
        return name, result
    reasons = "; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in errors.items())
    said = " | ".join(dict.fromkeys(_NOISE.sub("", line).strip() for line in native[0].splitlines() if line.strip()))
    reasons += f"; the decoders said: {said}" if said and not timed_out else ""
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
    """Frames at `indices` as uint8 (n, H, W, 3) RGB, and the backend that decoded them. Indices at most
    END_SLACK_FRAMES past the decoder's own frame count (containers disagree by a frame or two) read the last
    frame; further ones raise VideoLoadError."""
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
