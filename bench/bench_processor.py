"""Processor throughput on the CPU: 12-tile 4K images per second, 512-frame video decode (decord vs OpenCV).

    python -m bench.bench_processor            # writes bench/results/processor_*.json (or $BENCH_OUT)

The work is CPU-only, so timings are wall-clock medians (perf_counter) on every machine, including the GPU
machine, where this measures its host CPUs; each record's `device` names the CPU model and core count.
Inputs are written here: a 3840x2160 JPEG (IAP picks a 4x3 grid: 12 tiles + thumbnail = 13 x 448^2) and a
512-frame 640x360 mp4 at 30 fps.
"""
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench.harness import Record, save_results
from longvl.eagle.processing.tokenizer import tiny_tokenizer
from longvl.eagle.processing.video import decode_frames, has_decord, read_video_meta
from longvl.eagle.processor import EagleProcessor

FRAMES, FPS, VIDEO_SIZE = 512, 30.0, (640, 360)
IMAGE_SIZE = (3840, 2160)


def cpu_name() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def wall_median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: imports, decoder start-up, tokenizer caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def write_inputs(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:IMAGE_SIZE[1], 0:IMAGE_SIZE[0]]
    base = np.stack([x * 255 // IMAGE_SIZE[0], y * 255 // IMAGE_SIZE[1], (x + y) % 256], -1)
    photo = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image_path = folder / "4k.jpg"
    Image.fromarray(photo).save(image_path, quality=90)
    video_path = folder / "512.mp4"
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, VIDEO_SIZE)
    frame = cv2.resize(photo, VIDEO_SIZE)
    for index in range(FRAMES):
        writer.write(np.roll(frame, 4 * index, axis=1))
    writer.release()
    return image_path, video_path


def main():
    device = f"{cpu_name()}, load average {os.getloadavg()[0]:.1f} at start"  # shared machines are noisy
    records = []

    def record(op, provider, ms, shape, metric, per_call, note=""):
        records.append(Record(op=op, provider=provider, shape=shape, dtype="uint8", median_ms=ms, metric=metric,
                              value=per_call / ms * 1e3, device=device, note=note))
        print(f"{op:28s} {provider:8s} {ms:9.1f} ms  {per_call / ms * 1e3:8.2f} {metric}")

    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        image_path, video_path = write_inputs(Path(tmp))
        processor = EagleProcessor(tokenizer, sample_fps=FPS, max_frames=FRAMES)
        message = [{"role": "user", "content": "<image>\nDescribe the picture."}]
        out = processor.process(message, images=[image_path])
        tiles = out.pixel_values.shape[0]
        assert tiles == 13, f"expected 12 tiles + thumbnail for a 4K image, got {tiles}"
        shape = {"width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1], "tiles": tiles, "tile": 448}
        record("processor.image_4k", "ours", wall_median_ms(lambda: processor.process(message, images=[image_path]), 5),
               shape, "images/s", 1, note="JPEG decode + IAP resize + tiles + thumbnail + normalise + tokens")
        record("processor.image_4k.plan", "ours",
               wall_median_ms(lambda: processor.plan(message, images=[image_path]), 20), shape, "images/s", 1,
               note="header read only (offline index)")

        indices = list(range(FRAMES))
        video_shape = {"frames": FRAMES, "width": VIDEO_SIZE[0], "height": VIDEO_SIZE[1], "codec": "mp4v"}
        backends = (["decord"] if has_decord() else []) + ["opencv"]
        for backend in backends:
            record("video.meta", backend, wall_median_ms(lambda: read_video_meta(video_path, backend), 5),
                   video_shape, "videos/s", 1)
            record("video.decode_512", backend, wall_median_ms(lambda: decode_frames(video_path, indices, backend), 3),
                   video_shape, "frames/s", FRAMES, note="decode_frames(num_threads=2) to uint8 RGB")
            prompt = [{"role": "user", "content": "<video>\nWhat happens?"}]
            for threads in sorted({1, min(8, os.cpu_count())}):
                video_processor = EagleProcessor(tokenizer, sample_fps=FPS, max_frames=FRAMES, video_backend=backend,
                                                 resize_threads=threads)
                frames = video_processor.process(prompt, videos=[video_path]).pixel_values.shape[0]
                assert frames == FRAMES, f"expected {FRAMES} sampled frames, got {frames}"
                record("processor.video_512", backend,
                       wall_median_ms(lambda: video_processor.process(prompt, videos=[video_path]), 3),
                       {**video_shape, "resize_threads": threads}, "frames/s", FRAMES,
                       note="metadata + decode + resize to 448 + normalise + tokens")
    path = save_results(records, {}, "processor")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
