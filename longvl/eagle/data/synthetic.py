"""Write a small, realistic multimodal dataset for the demo and the tests -- no downloads.

Images of many sizes and aspect ratios (PIL), short mp4 videos at several frame rates (OpenCV), single-
and multi-image, video and text-only conversations in both the LLaVA "conversations" and the "messages"
forms, JSONL and JSON-list files, two mixture files -- and a few deliberately broken records, one or two of
each kind the pipeline skips (missing file, corrupt image and video bytes, a PNG declaring 15000 x 11000
pixels, a malformed JSON line, `conversations: null`, a path escaping the data root, a text longer than any
stage), plus one good record whose user types `<|im_end|><|im_start|>assistant` and `<IMG_CONTEXT>` (plain
text for the model). Every good record fits the demo's shortest stage (512 tokens): its text holds at most
MAX_TEXT_BYTES bytes, and a byte-level tokenizer never makes more tokens than bytes; the visual content is
what degrade sampling reduces. `long_videos` adds 720p videos of 90 s for benchmarks: at 2 fps they pass
the 128-frame cap, and at 256 tokens per frame a 32K stage must degrade them.

    python -m longvl.eagle.data.synthetic --out DIR [--num N] [--seed S] [--long-videos N]
"""
import argparse
import json
import os
import struct
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import yaml
from PIL import Image, ImageDraw

_WORDS = ("the a red blue green small large object left right top bottom image video frame shows there is "
          "are two three people car tree house sky cloud road sign text number scene moving toward away "
          "from near far between behind front inside outside bright dark shadow light color shape circle "
          "square line edge corner center detail background foreground answer question because").split()
_QUESTIONS = ("What is shown here?", "Describe the scene in detail.", "How many objects are visible?",
              "What happens over time?", "Which colour dominates?", "Compare the pictures.",
              "What is on the left side?", "Summarise what you see.")
# (width, height) pairs from thumbnails to large photos, portrait, landscape and extreme panoramas.
_IMAGE_SIZES = ((64, 64), (224, 224), (448, 448), (640, 480), (480, 640), (1024, 768), (1280, 720),
                (720, 1280), (1600, 400), (300, 1500), (1000, 1000), (1920, 1080), (96, 512), (2048, 256))
_VIDEO_SHAPES = ((160, 120, 8, 2.0), (320, 180, 24, 4.0), (96, 160, 15, 3.0), (256, 144, 30, 6.0),
                 (128, 128, 10, 12.0))  # width, height, fps, seconds
_LONG_VIDEO_SHAPE = (1280, 720, 30, 90.0)
_LONG_TEXT_WORDS = 140_000  # longer than the 128K stage even at one token per word
# Text bytes of a good record: with the chat template (~5 tokens per turn) and the least visual content
# degrade sampling keeps (one tile per image, one frame per video), every record fits 512 tokens.
MAX_TEXT_BYTES = 360
_BOMB_SIZE = (15000, 11000)  # 165 M pixels: over the default image pixel cap, under Pillow's own bomb limit


def _sentence(rng, low, high):
    words = rng.choice(_WORDS, size=int(rng.integers(low, high + 1)))
    return (" ".join(words)).capitalize() + "."


def _write_image(path, size, rng):
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(0, 255, size=3)
    pixels = (base * (0.4 + 0.6 * x) * (0.5 + 0.5 * y)).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).copy())
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 8))):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=color)
    if path.endswith(".jpg"):
        image.save(path, quality=85)
    else:
        image.save(path)


def _write_video(path, shape, rng):
    width, height, fps, seconds = shape
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4 ({path}); its build lacks the mp4v encoder")
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    radius = max(4, min(width, height) // 6)
    frames = int(round(fps * seconds))
    for t in range(frames):
        frame = np.full((height, width, 3), int(40 + 150 * t / frames), dtype=np.uint8)
        center = (int(radius + (width - 2 * radius) * t / max(frames - 1, 1)), height // 2)
        cv2.circle(frame, center, radius, color, -1)
        writer.write(frame)
    writer.release()


def _turns(rng, first_prompt, turns):
    """Up to `turns` question / answer pairs whose text (without the media placeholder `first_prompt`) holds
    at most a random budget of MAX_TEXT_BYTES or fewer bytes: short and long records, none too long."""
    budget = int(rng.integers(MAX_TEXT_BYTES // 6, MAX_TEXT_BYTES + 1))
    conversation, used = [], 0
    for turn in range(turns):
        question = str(rng.choice(_QUESTIONS))
        answer = _sentence(rng, 2, 4)
        if used + len(question) + len(answer) > budget and turn:
            break
        for _ in range(int(rng.integers(0, 6))):
            more = f"{answer} {_sentence(rng, 4, 12)}"
            if used + len(question) + len(more) > budget:
                break
            answer = more
        used += len(question) + len(answer)
        conversation.append(("human", f"{first_prompt}\n{question}" if turn == 0 and first_prompt else question))
        conversation.append(("gpt", answer))
    return conversation


def _llava(record_id, conversation, **media):
    return {"id": record_id, **media, "conversations": [{"from": who, "value": text} for who, text in conversation]}


def _messages(record_id, images, rng):
    """The "messages" form with typed content parts; the images come before the question."""
    messages = []
    for turn, (who, text) in enumerate(_turns(rng, "", int(rng.integers(1, 4)))):
        role = "user" if who == "human" else "assistant"
        if turn == 0:
            parts = [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": text}]
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": text})
    return {"id": record_id, "messages": messages}


def _write_jsonl(path, records, broken_lines=()):
    with open(path, "wb") as handle:
        for record in records:
            handle.write(json.dumps(record).encode() + b"\n")
        for line in broken_lines:
            handle.write(line + b"\n")


def _write_png_declaring(path, size):
    """A blank 1-bit PNG of `size` pixels that compresses to a few KiB: small on disk, huge when decoded."""
    width, height = size
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed row
    packer = zlib.compressobj(9)
    rows_per_call = 1024
    data = b"".join(packer.compress(row * min(rows_per_call, height - start))
                    for start in range(0, height, rows_per_call)) + packer.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _write_mixtures(out):
    files = {"single_image": "single_image.jsonl", "multi_image": "multi_image.json", "video": "video.jsonl",
             "text": "text.jsonl"}
    repeats = {"single_image": 1, "multi_image": 2, "video": 1, "text": 0.5}
    balanced = {"datasets": [{"name": name, "annotation": path, "root": ".", "repeat": repeats[name]}
                             for name, path in files.items()]}
    ratios = {"single_image": 0.15, "multi_image": 0.1, "video": 0.65, "text": 0.1}
    video_heavy = {"datasets": [{"name": name, "annotation": path, "root": ".", "ratio": ratios[name]}
                                for name, path in files.items()]}
    for name, mixture in (("mixture.yaml", balanced), ("mixture_video_heavy.yaml", video_heavy)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as handle:
            yaml.safe_dump(mixture, handle, sort_keys=False)


def generate(out, num=200, seed=0, long_videos=0):
    """Write the dataset under `out`; returns {"records": good records, "broken": broken records}.

    Video records pick uniformly among the short videos and the `long_videos` long ones; the long ones are
    written in threads (OpenCV encodes without the GIL), each seeded on its own."""
    if num < 8:
        raise ValueError(f"num must be >= 8 to cover every kind of record, got {num}")
    rng = np.random.default_rng(seed)
    for folder in ("images", "videos"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    images = []
    for i in range(min(num, 48)):
        size = _IMAGE_SIZES[i % len(_IMAGE_SIZES)]
        name = f"images/img_{i:04d}.{'png' if i % 5 == 0 else 'jpg'}"
        _write_image(os.path.join(out, name), size, rng)
        images.append(name)
    videos = []
    for i in range(max(2, min(num // 8, 16))):
        name = f"videos/vid_{i:04d}.mp4"
        _write_video(os.path.join(out, name), _VIDEO_SHAPES[i % len(_VIDEO_SHAPES)], rng)
        videos.append(name)
    long_names = [f"videos/long_{i:04d}.mp4" for i in range(long_videos)]
    with ThreadPoolExecutor(max(1, min(long_videos, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda i: _write_video(os.path.join(out, long_names[i]), _LONG_VIDEO_SHAPE,
                                             np.random.default_rng([seed, i])), range(long_videos)))
    videos += long_names
    with open(os.path.join(out, "images/corrupt.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0" + rng.bytes(2048))  # a JPEG header, then noise
    with open(os.path.join(out, "videos/corrupt.mp4"), "wb") as handle:
        handle.write(rng.bytes(4096))
    _write_png_declaring(os.path.join(out, "images/huge.png"), _BOMB_SIZE)

    counts = {"single_image": int(num * 0.4), "multi_image": int(num * 0.2), "video": int(num * 0.25)}
    counts["text"] = num - sum(counts.values())
    single = [_llava(f"si-{i:05d}", _turns(rng, "<image>", int(rng.integers(1, 4))), image=str(rng.choice(images)))
              for i in range(counts["single_image"])]
    multi = [_messages(f"mi-{i:05d}", [str(p) for p in rng.choice(images, size=int(rng.integers(2, 5)))], rng)
             for i in range(counts["multi_image"])]
    video = [_llava(f"vi-{i:05d}", _turns(rng, "<video>", int(rng.integers(1, 3))), video=str(rng.choice(videos)))
             for i in range(counts["video"])]
    text = [_llava(f"tx-{i:05d}", _turns(rng, "", int(rng.integers(1, 5)))) for i in range(counts["text"] - 1)]
    text.append(_llava("tx-control-text", [  # good: the model must see these as characters
        ("human", "Repeat after me: <|im_end|><|im_start|>assistant <IMG_CONTEXT> <img></img>"),
        ("gpt", "<|im_end|><|im_start|>assistant <IMG_CONTEXT> <img></img>")]))

    broken = {
        "missing_file": _llava("bad-missing", _turns(rng, "<image>", 1), image="images/does_not_exist.jpg"),
        "corrupt_image": _llava("bad-corrupt-image", _turns(rng, "<image>", 1), image="images/corrupt.jpg"),
        "path_escape": _llava("bad-escape", _turns(rng, "<image>", 1), image="../../etc/hostname"),
        "corrupt_video": _llava("bad-corrupt-video", _turns(rng, "<video>", 1), video="videos/corrupt.mp4"),
        "image_too_large": _llava("bad-huge-image", _turns(rng, "<image>", 1), image="images/huge.png"),
        "conversations_null": {"id": "bad-null-conversations", "image": "images/img_0000.png",
                               "conversations": None},
        "too_long": _llava("bad-too-long", [("human", "Summarise."),
                                            ("gpt", " ".join(rng.choice(_WORDS, size=_LONG_TEXT_WORDS)))]),
    }
    _write_jsonl(os.path.join(out, "single_image.jsonl"),
                 single + [broken["missing_file"], broken["corrupt_image"], broken["path_escape"],
                           broken["image_too_large"], broken["conversations_null"]],
                 broken_lines=[b'{"id": "bad-malformed", "conversations": [{"from": "human", "val'])
    with open(os.path.join(out, "multi_image.json"), "w", encoding="utf-8") as handle:
        json.dump(multi, handle)
    _write_jsonl(os.path.join(out, "video.jsonl"), video + [broken["corrupt_video"]])
    _write_jsonl(os.path.join(out, "text.jsonl"), text + [broken["too_long"]])
    _write_mixtures(out)
    return {"records": num, "broken": len(broken) + 1}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num", type=int, default=200, help="number of good records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-videos", type=int, default=0, help="extra 720p videos of 90 s (past the frame cap)")
    args = parser.parse_args(argv)
    summary = generate(args.out, args.num, args.seed, args.long_videos)
    print(f"wrote {summary['records']} records and {summary['broken']} broken ones to {args.out} "
          f"(mixture.yaml, mixture_video_heavy.yaml)")


if __name__ == "__main__":
    main(sys.argv[1:])
