"""Balanced packing of whole documents into fixed-length sequences, and balancing packs across ranks.

Packing works on planned token lengths from the index, never on decoded media, so a whole epoch is
planned in seconds. Longest documents go first, each into the least-full pack that still fits (worst-fit
decreasing on a min-heap): packs come out evenly filled instead of a few full ones and a ragged tail.
"""
import heapq

import numpy as np

# How many candidate packs to try when the least-full one fits the length but breaks an image/frame cap.
_CAP_SEARCH = 16


def pack_documents(lengths, max_length, images=None, frames=None, max_images=None, max_frames=None):
    """Group document indices into packs of total length <= max_length; returns a list of index lists.

    `images` / `frames` give each document's image and video-frame counts for the optional per-pack caps
    (decode cost and vision-tower memory). A document that alone exceeds a cap gets a pack of its own.
    Deterministic: ties are broken by document index.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() <= 0 or lengths.max() > max_length):
        bad = int(np.flatnonzero((lengths <= 0) | (lengths > max_length))[0])
        raise ValueError(f"document {bad} has length {lengths[bad]}, outside 1..max_length={max_length}")
    images = np.zeros_like(lengths) if images is None else np.asarray(images, dtype=np.int64)
    frames = np.zeros_like(lengths) if frames is None else np.asarray(frames, dtype=np.int64)
    image_cap = np.iinfo(np.int64).max if max_images is None else max_images
    frame_cap = np.iinfo(np.int64).max if max_frames is None else max_frames

    packs, pack_images, pack_frames = [], [], []
    heap = []  # (filled tokens, pack id)
    for doc in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[doc])
        rejected, target = [], None
        while heap and len(rejected) < _CAP_SEARCH and heap[0][0] + length <= max_length:
            fill, pack = heapq.heappop(heap)
            if pack_images[pack] + images[doc] <= image_cap and pack_frames[pack] + frames[doc] <= frame_cap:
                target = (fill, pack)
                break
            rejected.append((fill, pack))
        for entry in rejected:
            heapq.heappush(heap, entry)
        if target is None:
            target = (0, len(packs))
            packs.append([])
            pack_images.append(0)
            pack_frames.append(0)
        fill, pack = target
        packs[pack].append(doc)
        pack_images[pack] += int(images[doc])
        pack_frames[pack] += int(frames[doc])
        heapq.heappush(heap, (fill + length, pack))
    return packs


def attention_cost(doc_lengths):
    """Causal attention work of a pack grows with the sum of squared document lengths."""
    return float(np.sum(np.square(np.asarray(doc_lengths, dtype=np.float64))))


def group_into_steps(costs, world_size):
    """Split packs (by position in `costs`) into steps of `world_size` packs of similar cost.

    Sorting by cost and cutting consecutive groups puts packs of like cost into the same step, so the
    ranks of a step finish together. Returns (steps, leftover): leftover holds fewer than world_size packs.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable").tolist()
    full = len(order) - len(order) % world_size
    steps = [order[i:i + world_size] for i in range(0, full, world_size)]
    return steps, order[full:]
