"""Atomic, sharded, asynchronous checkpoints with torch.distributed.checkpoint, and HF safetensors export.

Layout under `dir`: `step-00000042/` holds the DCP shards of the model and optimizer, one `rank-K.pt` per
rank (RNG states and data-sampler position: they differ per rank) and `trainer.json` (stage, step, fault
counters). A checkpoint is written into `step-00000042.tmp/`; only when every rank's data and DCP's metadata
are on disk does rank 0 write the `COMPLETE` marker, last, and rename the folder. Loading considers only
folders without `.tmp` that hold the marker, so a crash (even kill -9) mid-save never leaves a checkpoint
that loads as valid; stale `.tmp` folders are removed at start-up.

Asynchronous saves run DCP's writer in a background thread on a dedicated gloo group (a collective issued from
two threads on one group could interleave differently on different ranks); the training loop calls
`poll()` each step to finalise a finished save, and `wait()` before exiting.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (incomplete or temporary ones are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


class Checkpointer:
    """Saves and restores model, optimizer, trainer counters, sampler position and RNG, atomically."""

    def __init__(self, root: str | os.PathLike, *, async_save: bool = True, keep: int = 2):
        self.root = Path(root)
        self.rank = dist.get_rank()
        self.keep = keep
        self.async_save = async_save
        # DCP's background writer needs its own CPU-capable group.
        self.group = dist.new_group(backend="gloo") if async_save else None
        self._pending: tuple | None = None   # (future, tmp dir, final dir)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, trainer_state: dict, rank_state: dict) -> None:
        """Start saving step `step`; returns once the state is staged (async) or written (sync)."""
        self.wait()
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        dist.barrier()
        torch.save(rank_state, tmp / f"rank-{self.rank}.pt")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dist.barrier()  # every rank's own file is written before the metadata can complete
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            self._pending = (future, tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._pending = (None, tmp, final)
            self._finalize()

    def poll(self) -> None:
        """Finalise a finished asynchronous save without blocking."""
        if self._pending and (self._pending[0] is None or self._pending[0].done()):
            self._finalize()

    def wait(self) -> None:
        """Block until the pending save (if any) is complete and finalised."""
        if self._pending:
            self._finalize()

    def _finalize(self) -> None:
        future, tmp, final = self._pending
        self._pending = None
        if future is not None:
            future.result()  # re-raises a failed write: never mark a broken checkpoint complete
        # DCP writes its metadata only after gathering every rank's write results, so once rank 0's save
        # returned, all shards are on disk.
        if self.rank == 0:
            (tmp / MARKER).write_text("ok\n")
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in complete_checkpoints(self.root)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizer) -> tuple[dict, dict | None]:
        """Restore model and optimizer from `path`; return (trainer state, this rank's state or None)."""
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} has no {MARKER} marker: it is not a complete checkpoint")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer_state = json.loads((path / "trainer.json").read_text())
        rank_file = path / f"rank-{self.rank}.pt"
        rank_state = torch.load(rank_file, weights_only=False) if rank_file.exists() else None
        return trainer_state, rank_state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_hf(model, out_dir: str | os.PathLike, *, strip_prefix: str = "", config=None,
              max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype = torch.bfloat16) -> Path | None:
    """Gather the full weights and write HF safetensors shards + index json (rank 0); collective on all ranks.

    Keys keep the model's own names (`vision_model.vision_model.*`, `mlp1.*`, `language_model.model.*`,
    `language_model.lm_head.weight` for Eagle), minus `strip_prefix` (the training wrapper's attribute).
    """
    from safetensors.torch import save_file

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in full.items()}
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key]
        t = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()  # tied weights: own storage
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if config is not None:
        config.save_pretrained(out)
    return out
