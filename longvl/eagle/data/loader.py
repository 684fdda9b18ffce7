"""The training loader: spawn workers, prefetching, exact resume and a running bad-sample account.

Workers are started with spawn, not fork: decord (and CUDA) deadlock in forked children. Because the
DataLoader prefetches, the sampler runs ahead of training; the resume state therefore travels inside each
batch and the loader remembers the state of the last batch handed out, which is what state_dict() saves.

Bad samples are reported for people once, not one log line each: `summary()` is one line (records the
index excluded and samples skipped while loading, counted by reason, and packs left without any usable
document), `write_bad_samples(path)` writes every one with its file, position and reason as JSON lines.
A pack whose documents all failed still comes out (every rank must get a batch), but holds nothing to
learn from: `is_empty_pack(batch)` says so, and the trainer must skip its optimizer step on every rank.
"""
import argparse
import atexit
import functools
import json
import logging
import os
import sys
import time

import torch

from .backend import BackendError, BackendSpec
from .bad_samples import BadSampleLog, write_details
from .collate import collate_pack
from .dataset import DatasetSource, PackDataset
from .index import load_index
from .mixture import load_mixture
from .sampler import PackSampler

logger = logging.getLogger("longvl.eagle.data")


def _exit_worker_without_native_teardown():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init_worker(_worker_id):
    """Let a spawned worker end like a forked one, with os._exit, skipping C++ static destructors.

    A worker told to stop while decord is decoding aborts in those destructors ("terminate called without
    an active exception", worker killed by SIGABRT). Nothing a worker holds needs teardown: its batches
    are already queued or no longer wanted.
    """
    atexit.register(_exit_worker_without_native_teardown)


def is_empty_pack(batch):
    """True when a collated pack holds no supervised token: every document in it failed to load, and what
    remains is padding with zero loss weights. Training on it would still move the weights (weight decay,
    optimizer moments), so its step must be skipped -- by every rank together (see the module docstring)."""
    return batch.stats.supervised_tokens == 0


class ResumableLoader:
    """Iterates batches of one epoch per `for` loop; state_dict() / load_state_dict() resume exactly."""

    def __init__(self, dataset, sampler, *, image_token_id, tokens_per_tile, num_workers=2, prefetch_factor=4,
                 pin_memory=False, pad_token_id=0, pad_to_multiple_of=1, image_size=448):
        self.sampler = sampler
        self.bad_samples = BadSampleLog()  # skipped while loading
        self.index_excluded = BadSampleLog()  # excluded by the index: never drawn
        for index in sampler.indexes:
            for event in index.excluded:
                self.index_excluded.add(event)
        self.empty_packs = 0
        collate = functools.partial(collate_pack, image_token_id=image_token_id, tokens_per_tile=tokens_per_tile,
                                    pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                                    image_size=image_size)
        options = {}
        if num_workers > 0:
            options = {"multiprocessing_context": "spawn", "persistent_workers": True,
                       "prefetch_factor": prefetch_factor, "worker_init_fn": _init_worker}
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=collate,
                                                  num_workers=num_workers, pin_memory=pin_memory, **options)
        self._state = sampler.state_dict()

    def __len__(self):
        self.sampler.load_state_dict(self._state)  # the sampler itself may have run ahead (prefetch)
        return len(self.sampler)

    def __iter__(self):
        self.sampler.load_state_dict(self._state)
        for batch in self.loader:
            self._state, batch.resume_state = batch.resume_state, None
            for event in batch.stats.bad_samples:
                self.bad_samples.add(event)
            self.empty_packs += is_empty_pack(batch)
            yield batch
        logger.info("epoch done; %s", self.summary())

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def summary(self):
        """One line for people: what the index excluded and what loading skipped, by reason."""
        return (f"bad samples: {self.index_excluded.counts()} excluded by the index, "
                f"{self.bad_samples.counts()} skipped while loading, {self.empty_packs} packs without a usable "
                f"document")

    def write_bad_samples(self, path):
        """Every excluded and skipped sample as JSON lines {when: index | load, dataset, id, reason, detail,
        file, position}; returns path. The file is replaced as a whole (call it as often as you like)."""
        return write_details(path, self.index_excluded.details("index") + self.bad_samples.details("load"))


def build_loader(mixture_path, max_length, backend_spec=None, rank=0, world_size=1, seed=0, num_workers=2,
                 prefetch_factor=4, timeout_s=60.0, max_images=None, max_frames=None, pad_token_id=0,
                 pad_to_multiple_of=1, image_size=448, pin_memory=False, cache_dir=None, *, image_token_id,
                 tokens_per_tile):
    """Loader for one training stage: reads the mixture's indexes (built by `python -m longvl.eagle.data.index`,
    in the mixture's folder or in `cache_dir`). `image_token_id` and `tokens_per_tile` say where each tile's
    features go in the token sequence (the model's `<IMG_CONTEXT>` id and its tokens per tile)."""
    mixture = load_mixture(mixture_path, cache_dir)
    backend_spec = (backend_spec or BackendSpec()).check()
    indexes = [load_index(spec, max_length, backend_spec) for spec in mixture.datasets]
    sampler = PackSampler(indexes, mixture, max_length, rank, world_size, seed, max_images, max_frames)
    sources = [DatasetSource(spec.name, spec.annotation, spec.root) for spec in mixture.datasets]
    dataset = PackDataset(sources, backend_spec, max_length, timeout_s)
    return ResumableLoader(dataset, sampler, image_token_id=image_token_id, tokens_per_tile=tokens_per_tile,
                           num_workers=num_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                           pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, image_size=image_size)


def measure(loader, steps, step_seconds):
    """Wait per batch while a simulated training step of `step_seconds` runs: the share of step time lost to data.

    The first batch is timed apart: it includes starting the workers.
    """
    batches = iter(loader)
    start = time.perf_counter()
    batch = next(batches)
    first = time.perf_counter() - start
    waits, tokens, tiles = [], batch.stats.tokens, batch.stats.tiles
    for _ in range(steps - 1):
        time.sleep(step_seconds)
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        waits.append(time.perf_counter() - start)
        tokens += batch.stats.tokens
        tiles += batch.stats.tiles
    waited = sum(waits)
    return {"first_batch_s": first, "batches": len(waits) + 1, "mean_wait_s": waited / max(len(waits), 1),
            "data_share": waited / max(waited + step_seconds * len(waits), 1e-9), "tokens": tokens, "tiles": tiles}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure how much of a training step the loader would cost.")
    parser.add_argument("--data", required=True, help="mixture file, already indexed for --max-length")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=1.0, help="simulated compute time per step")
    parser.add_argument("--backend", default=BackendSpec().factory)
    parser.add_argument("--backend-kwargs", default="{}", help="JSON keyword arguments for the backend")
    parser.add_argument("--cache-dir", default=None, help="the index folder given to the indexer, if any")
    args = parser.parse_args(argv)
    try:
        spec = BackendSpec(args.backend, json.loads(args.backend_kwargs)).check()
    except (BackendError, json.JSONDecodeError) as error:
        parser.error(f"--backend / --backend-kwargs: {error}")
    processor = spec.build().processor
    loader = build_loader(args.data, args.max_length, spec, num_workers=args.workers,
                          prefetch_factor=args.prefetch, cache_dir=args.cache_dir,
                          image_token_id=processor.image_token_id, tokens_per_tile=processor.tokens_per_tile)
    result = measure(loader, args.steps, args.step_seconds)
    print(json.dumps(result))
    print(loader.summary())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
