"""Video metadata, frame sampling, decord and OpenCV decoding, fallbacks and timeouts."""
import sys
import time

import cv2
import numpy as np
import pytest

from longvl.eagle.processing import video
from longvl.eagle.processing.errors import VideoLoadError, VideoTimeoutError
from longvl.eagle.processing.video import decode_frames, read_video_meta, sample_frame_indices

HAS_DECORD = video.has_decord()


STEP, BASE = 20, 12  # grey levels 20 apart survive compression and colour conversion


def write_video(path, frames: int, fps: float = 10.0, size=(64, 48)) -> str:
    """An mp4 whose frame k shows k in base 12 as two flat grey halves, so decoded frames can be identified."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    half = size[0] // 2
    for index in range(frames):
        frame = np.empty((size[1], size[0], 3), np.uint8)
        frame[:, :half] = index % BASE * STEP
        frame[:, half:] = index // BASE % BASE * STEP
        writer.write(frame)
    writer.release()
    return str(path)


def frame_numbers(frames: np.ndarray) -> list[int]:
    """Read back the frame numbers written by write_video (modulo 144), from the halves' interiors."""
    width = frames.shape[2]
    left = frames[:, 4:-4, 4:width // 2 - 4].reshape(len(frames), -1).mean(1)
    right = frames[:, 4:-4, width // 2 + 4:-4].reshape(len(frames), -1).mean(1)
    return (np.round(left / STEP) + BASE * np.round(right / STEP)).astype(int).tolist()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=37, fps=10.0)


@pytest.mark.parametrize("backend", ["decord", "opencv"])
def test_metadata_and_decoded_frames(clip, backend):
    if backend == "decord" and not HAS_DECORD:
        pytest.skip("decord is not installed")
    meta = read_video_meta(clip, backend=backend)
    assert (meta.num_frames, meta.fps, meta.backend, meta.fps_assumed) == (37, 10.0, backend, False)
    assert meta.duration == pytest.approx(3.7)
    indices = [0, 5, 6, 17, 17, 36]
    frames, used = decode_frames(clip, indices, backend=backend)
    assert used == backend and frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == indices


def test_sampling_rule():
    # 3.7 s at 10 fps, 2 fps sampling -> 7 frames, raised to min_frames=8, at round(linspace(0, 36, 8)).
    assert sample_frame_indices(37, 10.0) == [0, 5, 10, 15, 21, 26, 31, 36]
    assert sample_frame_indices(37, 10.0, min_frames=2) == [0, 6, 12, 18, 24, 30, 36]
    assert sample_frame_indices(5, 30.0) == [0, 1, 2, 3, 4]          # few frames: all of them
    assert sample_frame_indices(1, 25.0) == [0]                       # one-frame video
    assert len(sample_frame_indices(3000, 30.0)) == 128               # 100 s * 2 fps = 200 -> max_frames
    assert len(sample_frame_indices(3000, 30.0, max_frames=512)) == 200
    assert len(sample_frame_indices(30000, 30.0, max_frames=512)) == 512
    assert len(sample_frame_indices(300, 1.0)) == 128                 # native 1 fps < 2 fps: 300 s * 1 fps
    long = sample_frame_indices(100000, 25.0, max_frames=512)
    assert long == np.round(np.linspace(0, 99999, 512)).astype(int).tolist()
    with pytest.raises(ValueError, match="512"):
        sample_frame_indices(100, 25.0, max_frames=513)
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 25.0)


def test_one_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", frames=1)
    meta = read_video_meta(path)
    assert meta.num_frames == 1
    frames, _ = decode_frames(path, sample_frame_indices(meta.num_frames, meta.fps))
    assert frames.shape[0] == 1 and frame_numbers(frames) == [0]


def test_missing_fps_falls_back_to_assumed_rate(clip, monkeypatch):
    monkeypatch.setattr(video, "_opencv_meta", lambda path: (37, video._clean_fps(float("nan"))))
    meta = read_video_meta(clip, backend="opencv")
    assert meta.fps == video.ASSUMED_FPS and meta.fps_assumed


def test_decord_missing_or_failing_falls_back_to_opencv(clip, monkeypatch):
    monkeypatch.setattr(video, "has_decord", lambda: False)
    assert read_video_meta(clip).backend == "opencv"
    assert decode_frames(clip, [3])[1] == "opencv"
    monkeypatch.setattr(video, "has_decord", lambda: True)

    def broken(*args):
        raise RuntimeError("decord cannot read this file")

    monkeypatch.setattr(video, "_decord_frames", broken)
    frames, used = decode_frames(clip, [3, 4])
    assert used == "opencv" and frame_numbers(frames) == [3, 4]


def test_hanging_decoder_times_out(clip, monkeypatch):
    monkeypatch.setattr(video, "_decord_frames", lambda *args: time.sleep(30))
    monkeypatch.setattr(video, "_opencv_frames", lambda *args: time.sleep(30))
    start = time.perf_counter()
    with pytest.raises(VideoTimeoutError, match="no answer within"):
        decode_frames(clip, [0], timeout_s=0.3)
    assert time.perf_counter() - start < 5


def test_bad_videos_raise_typed_errors(tmp_path):
    with pytest.raises(VideoLoadError, match="not found"):
        read_video_meta(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    with pytest.raises(VideoLoadError, match="cannot read metadata"):
        read_video_meta(corrupt)
    with pytest.raises(VideoLoadError):
        decode_frames(corrupt, [0])
    with pytest.raises(ValueError, match="unknown video backend"):
        read_video_meta(corrupt, backend="ffmpeg")


def test_512_frames_decode_and_sample(tmp_path):
    path = write_video(tmp_path / "long.mp4", frames=600, fps=2.0, size=(32, 32))
    meta = read_video_meta(path)
    indices = sample_frame_indices(meta.num_frames, meta.fps, max_frames=512)
    assert len(indices) == 512 and indices[-1] == 599
    frames, _ = decode_frames(path, indices)
    assert frames.shape == (512, 32, 32, 3)
    assert frame_numbers(frames) == [index % BASE ** 2 for index in indices]


class _SeekFailsCapture:
    """cv2.VideoCapture whose frame seek fails the way it does on files with a broken index.

    "refused": set() says False and leaves the position alone; "lying": set() says True and the position
    reads back as asked, but nothing can be grabbed there (OpenCV then reads past the end)."""

    real_capture = cv2.VideoCapture  # the real class, taken before the fixture replaces it
    mode = "refused"

    def __init__(self, path):
        self.real, self.seeked = self.real_capture(path), False

    def __getattr__(self, name):
        return getattr(self.real, name)

    def set(self, prop, value):
        if prop != cv2.CAP_PROP_POS_FRAMES:
            return self.real.set(prop, value)
        if self.mode == "refused":
            return False
        self.seeked, self.target = True, value
        return True

    def get(self, prop):
        if prop == cv2.CAP_PROP_POS_FRAMES and self.seeked:
            return float(self.target)
        return self.real.get(prop)

    def grab(self):
        return False if self.seeked else self.real.grab()


@pytest.fixture
def seek_fails(monkeypatch):
    capture = type("SeekFailsCapture", (_SeekFailsCapture,), {})
    monkeypatch.setattr(cv2, "VideoCapture", capture)
    return capture


@pytest.mark.parametrize("mode", ["refused", "lying"])
def test_opencv_returns_the_requested_frames_when_seeking_fails(tmp_path, seek_fails, mode):
    """Frames far apart make the OpenCV reader seek; when the seek fails, the frames must still be the requested
    ones (as a sequential decode gives them), never frame 0 or the next frame repeated in their place."""
    path = write_video(tmp_path / "long.mp4", frames=300, fps=10.0)
    indices = [0, 100, 250, 299, 120]
    seek_fails.mode = mode
    frames, used = decode_frames(path, indices, backend="opencv")
    sequential = video._opencv_frames(path, sorted(indices), seek_gap=10 ** 9)
    assert used == "opencv" and frame_numbers(frames) == [index % BASE ** 2 for index in indices]
    np.testing.assert_array_equal(frames[[0, 1, 4, 2, 3]], sequential)


def test_frames_past_the_end(clip):
    """A frame or two past the decoder's count reads the true last frame; further is an error, not a repeat."""
    for backend in (["decord"] if HAS_DECORD else []) + ["opencv"]:
        frames, _ = decode_frames(clip, [10, 37, 38], backend=backend)
        assert frame_numbers(frames) == [10, 36, 36]
        with pytest.raises(VideoLoadError, match="more than 2 past the end"):
            decode_frames(clip, [10, 60], backend=backend)


def test_decoder_complaints_go_into_the_error_not_stderr(tmp_path, capfd):
    """decord's own "ERROR opening ..." (and FFmpeg's) for a file we report: part of our error, not stray stderr."""
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    capfd.readouterr()
    with pytest.raises(VideoLoadError, match="cannot read metadata") as caught:
        read_video_meta(corrupt)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    if HAS_DECORD:
        assert "ERROR opening" in str(caught.value)
    read_video_meta(write_video(tmp_path / "good.mp4", frames=5))
    print("stderr works again", file=sys.stderr)
    assert capfd.readouterr().err == "stderr works again\n"
