"""Atomic, verified, sharded, asynchronous checkpoints with torch.distributed.checkpoint, and HF safetensors export.

Layout under `dir`: `step-00000042/` holds the DCP shards of the model and optimizer, one `rank-K.json` per
rank (RNG states and data-sampler position: they differ per rank), `trainer.json` (stage, step, fault
counters), `manifest.json` (every file's size and SHA-256) and the `COMPLETE` marker. A checkpoint is written
into `step-00000042.tmp/`; only when every rank's data and DCP's metadata are on disk does rank 0 hash them,
write the manifest, then the marker, and rename the folder. Loading considers only folders without `.tmp`
that hold the marker, so a crash (even kill -9) mid-save never leaves a checkpoint that loads as valid; stale
`.tmp` folders are removed at start-up.

Resume checks the newest checkpoint's files against its manifest (the ranks share the hashing) before
anything is unpickled; a damaged one is renamed `step-00000042.unusable`, said so in one line, and the next
older one is used. Our own per-rank state is JSON: nothing we write is a pickle. DCP's `.metadata` and shards
are pickles, which is why the manifest is checked first (see manifest.py for what that does not cover).

A save checks free space against an estimate of its size first, and a write that fails for lack of space
(today's symptom: `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos`) is reported as
such, naming the folder and the space needed; the previous checkpoint is untouched either way.

Asynchronous saves run DCP's writer in a background thread on a dedicated gloo group (a collective issued from
two threads on one group could interleave differently on different ranks); rank 0's thread then hashes and
seals the folder. `poll()` and `wait()` are collective while a save is pending (a small all-reduce on another
gloo group), so every rank learns of a finished or failed save at the same step and a failure stops all of them
together instead of leaving the others in a collective. `close()` is the local, non-raising variant for paths
that are already failing.
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import errno
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from longvl.eagle.train.atomic_files import fsync_dir, publish_into, write_atomic
from longvl.eagle.train.manifest import (MANIFEST, ManifestError, build_manifest, check_files, read_manifest,
                                         write_manifest)

MARKER = "COMPLETE"
TRAINER_FILE = "trainer.json"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# torch.save's framing of one DCP item, measured at about 1.6 KB per tensor; the estimate allows more.
_ITEM_OVERHEAD = 4096


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the checkpoint and the file."""


class NoSpaceForCheckpoint(CheckpointError):
    """Not enough disk space for a checkpoint (before or during the write)."""


# --- per-rank state: JSON, never a pickle ---------------------------------------------------------------------
def _bytes_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every generator's state as JSON-ready values (lists, numbers, base64 text)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss},
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": _bytes_to_text(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _bytes_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_bytes(state["cuda"]))


def _rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def _read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: {name} is not readable JSON ({error})") from None


# --- finding checkpoints --------------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (incomplete or temporary ones are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer can still put on `folder`'s file system."""
    return shutil.disk_usage(folder).free


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def estimate_local_bytes(state) -> int:
    """Upper estimate of the bytes DCP writes for this rank's part of `state` (local shards plus framing)."""
    if isinstance(state, dict):
        return sum(estimate_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(estimate_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size() + _ITEM_OVERHEAD
    return _ITEM_OVERHEAD


def _exceptions(error: BaseException):
    """`error`, what it was raised from, and the per-rank errors of a DCP CheckpointException."""
    todo, seen = [error], set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            todo += [exc for exc, _ in current.failures.values()]


def _is_out_of_space(error: BaseException) -> bool:
    for exc in _exceptions(error):
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
    return False


def _first_line(error: BaseException) -> str:
    for exc in _exceptions(error):
        if not isinstance(exc, CheckpointException):
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return type(error).__name__


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    except OSError:
        return 0


@dataclasses.dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    needed: int                                   # estimated bytes of the whole checkpoint
    job: concurrent.futures.Future | None = None  # this rank's part (rank 0: also hashing and sealing)


def _done_future(fn, *args) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    try:
        future.set_result(fn(*args))
    except BaseException as error:               # noqa: BLE001 (handed to the agreement, re-raised there)
        future.set_exception(error)
    return future


class Checkpointer:
    """Saves and restores model, optimizer, trainer counters, sampler position and RNG, atomically."""

    def __init__(self, root: str | os.PathLike, *, async_save: bool = True, keep: int = 2):
        self.root = Path(root)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.keep = keep
        self.async_save = async_save
        # DCP's background writer needs its own CPU-capable group; the agreements run on another one.
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.control = dist.new_group(backend="gloo")
        self._jobs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: _PendingSave | None = None
        self._verified: Path | None = None
        self.last_saved: Path | None = None
        self._last_step: int | None = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            for displaced in self.root.glob("step-*.old"):  # a re-save killed between its two renames
                final = displaced.with_suffix("")
                if (final / MARKER).is_file():
                    shutil.rmtree(displaced, ignore_errors=True)
                else:
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(displaced, final)
        dist.barrier()

    # --- agreement ------------------------------------------------------------------------------------------
    def _agree(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank has an error: one rank leaving alone would hang the others."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if not flag.item():
            return
        mine = None
        if error is not None:
            mine = (isinstance(error, NoSpaceForCheckpoint), str(error) if isinstance(error, CheckpointError)
                    else f"{type(error).__name__}: {error}")
        reports = [None] * self.world
        dist.all_gather_object(reports, mine, group=self.control)
        reports = [r for r in reports if r is not None]
        no_space, message = next((r for r in reports if r[0]), reports[0])   # disk full explains the rest
        raise (NoSpaceForCheckpoint if no_space else CheckpointError)(message) from error

    def _agreed_sum(self, value: int) -> int:
        total = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(total, group=self.control)
        return int(total.item())

    # --- finding and checking -------------------------------------------------------------------------------
    def _problem(self, path: Path) -> str | None:
        """Collective: None when every file of `path` matches its manifest, else the first problem found."""
        try:
            manifest = read_manifest(path)
            for required in (DCP_METADATA, TRAINER_FILE):
                if required not in manifest.files:
                    raise ManifestError(f"{MANIFEST} does not list {required}")
            mine = sorted(manifest.files)[self.rank::self.world]
            problem = check_files(path, manifest, mine)
        except ManifestError as error:
            problem = str(error)
        problems = [None] * self.world
        dist.all_gather_object(problems, problem, group=self.control)
        return next((p for p in problems if p is not None), None)

    def latest(self) -> Path | None:
        """Collective: the newest complete checkpoint whose files match its manifest; damaged newer ones are
        renamed `.unusable` and reported in one line. None when there is no complete checkpoint at all."""
        candidates = complete_checkpoints(self.root)[::-1]
        damaged = []
        for path in candidates:
            problem = self._problem(path)
            if problem is None:
                if damaged and self.rank == 0:
                    for bad, _ in damaged:
                        os.replace(bad, bad.with_name(bad.name + ".unusable"))
                    reasons = "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
                    print(f"checkpoint fallback: resuming from {path.name} because a newer checkpoint is damaged "
                          f"({reasons}); moved to *.unusable for inspection", flush=True)
                self._verified = path
                return path
            damaged.append((path, problem))
        if not damaged:
            return None
        reasons = "; ".join(f"{bad} ({why})" for bad, why in damaged)
        raise CheckpointError(f"no usable checkpoint in {self.root}: {reasons}. Move the damaged folders away, or "
                              f"set checkpoint.resume=false to start from scratch")

    # --- saving ---------------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, trainer_state: dict, rank_state) -> None:
        """Collective: start saving step `step` (again for the same step: nothing to do).

        Returns once the state is staged (async) or written and sealed (sync). `trainer_state` and `rank_state`
        must be JSON-serialisable.
        """
        if step == self._last_step:
            return
        self.wait()
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        error, rank_text, trainer_text = None, "", ""
        try:
            rank_text = json.dumps(rank_state)
            trainer_text = json.dumps(trainer_state, indent=1) if self.rank == 0 else ""
        except (TypeError, ValueError) as problem:
            error = CheckpointError(f"checkpoint step-{step:08d}: the trainer or rank state is not JSON: {problem}")
        self._agree(error)
        needed = self._agreed_sum(estimate_local_bytes(state) + len(rank_text) + len(trainer_text))
        free = free_bytes(self.root)
        self._agree(None if free >= needed else NoSpaceForCheckpoint(
            f"not saving checkpoint {final}: it needs about {_size(needed)} and {self.root} has {_size(free)} free. "
            f"{self._previous_note()}; free some space, lower checkpoint.keep or point checkpoint.dir at a larger "
            f"disk"))
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                write_atomic(tmp / TRAINER_FILE, trainer_text)
        except OSError as problem:
            error = problem
        self._agree(self._save_error(error, step, tmp, needed) if error else None)
        try:
            write_atomic(tmp / _rank_file(self.rank), rank_text)
        except OSError as problem:
            error = problem
        self._agree(self._save_error(error, step, tmp, needed) if error else None)
        pending = _PendingSave(step, tmp, final, needed)
        if self.async_save:
            try:
                writing = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            except (Exception, CheckpointException) as problem:  # staging failed here: reported like a failed write
                writing = _done_future(_reraise, problem)
            pending.job = self._jobs.submit(self._complete, writing, pending)
            self._pending = pending
        else:
            def write_and_seal():
                dcp.save(state, checkpoint_id=str(tmp))
                self._complete(None, pending)
            pending.job = _done_future(write_and_seal)
            self._pending = pending
            self.wait()
        self._last_step = step

    def _complete(self, writing: concurrent.futures.Future | None, pending: _PendingSave) -> None:
        """This rank's part of a save after staging: the write; rank 0 then seals the folder."""
        if writing is not None:
            writing.result()   # DCP raises a failed write on every rank
        if self.rank == 0:
            # DCP writes its metadata only after gathering every rank's write results, so once the write
            # returned here, all shards, rank files and trainer.json are on disk.
            names = sorted(f.name for f in pending.tmp.iterdir() if f.is_file())
            if DCP_METADATA not in names:
                raise CheckpointError(f"{pending.tmp}: DCP finished without writing {DCP_METADATA}")
            write_manifest(pending.tmp, build_manifest(pending.tmp, names))
            write_atomic(pending.tmp / MARKER, "ok\n")
            fsync_dir(pending.tmp)
            displaced = pending.final.with_name(pending.final.name + ".old")
            if pending.final.exists():
                os.replace(pending.final, displaced)
            os.replace(pending.tmp, pending.final)
            fsync_dir(self.root)
            shutil.rmtree(displaced, ignore_errors=True)
            kept = [p for p in complete_checkpoints(self.root) if checkpoint_step(p) <= pending.step]
            for old in kept[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

    def _previous_note(self) -> str:
        found = complete_checkpoints(self.root)
        if not found:
            return "There is no earlier complete checkpoint"
        return f"The previous checkpoint {found[-1]} is intact and is the one a restart resumes from"

    def _save_error(self, error: BaseException, step: int, tmp: Path, needed: int) -> CheckpointError:
        """A message for a failed save: disk full (by errno, message or free space left), or what failed."""
        free = free_bytes(self.root)
        if _is_out_of_space(error) or free < needed - _folder_bytes(tmp):
            return NoSpaceForCheckpoint(
                f"saving checkpoint step-{step:08d} failed: the disk holding {self.root} is full ({_size(free)} "
                f"free; this checkpoint needs about {_size(needed)}). {self._previous_note()}; free some space, "
                f"lower checkpoint.keep or point checkpoint.dir at a larger disk. ({_first_line(error)})")
        return CheckpointError(f"saving checkpoint step-{step:08d} into {tmp} failed: {_first_line(error)}. "
                               f"{self._previous_note()}")

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        error = pending.job.exception()
        report = self._save_error(error, pending.step, pending.tmp, pending.needed) if error else None
        try:
            self._agree(report)
        except CheckpointError:
            self._last_step = None
            if self.rank == 0:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise
        self.last_saved = pending.final

    def poll(self) -> None:
        """Collective while a save is pending: finalise it once every rank's part is done; raise on every rank
        if it failed."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending.job.done())], dtype=torch.int32)
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.control)
        if done.item():
            self._finish()

    def wait(self) -> Path | None:
        """Collective: block until the pending save (if any) is sealed; return the newest saved checkpoint."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending.job])
            self._finish()
        return self.last_saved

    def close(self) -> None:
        """Local, for error paths: let this rank's part of a pending save end (rank 0 still seals a save whose
        write succeeded), report a failure in one line instead of raising over the error being handled."""
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending.job.exception()
            if error is not None and self.rank == 0:
                print(f"checkpoint step-{pending.step:08d} was not completed: {_first_line(error)}", flush=True)
        self._jobs.shutdown(wait=True)

    # --- loading --------------------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer) -> tuple[dict, dict | None]:
        """Collective: restore model and optimizer from `path`; return (trainer state, this rank's state or None).

        The files are checked against the manifest first (unless `latest()` just did), so nothing is unpickled
        from a damaged or altered checkpoint.
        """
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} has no {MARKER} marker: it is not a complete checkpoint")
        if self._verified != path:
            problem = self._problem(path)
            if problem is not None:
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        error, trainer_state, rank_state = None, None, None
        try:
            rank_name = _rank_file(self.rank)
            trainer_state = _read_json(path, TRAINER_FILE)
            rank_state = _read_json(path, rank_name) if rank_name in read_manifest(path).files else None
        except CheckpointError as problem:
            error = problem
        except ManifestError as problem:
            error = CheckpointError(f"{path}: {problem}")
        self._agree(error)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return trainer_state, rank_state


def _reraise(error: BaseException):
    raise error


def export_hf(model, out_dir: str | os.PathLike, *, config=None, tokenizer=None,
              max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype = torch.bfloat16) -> Path | None:
    """Gather the full weights and write HF safetensors shards + index json (rank 0); collective on all ranks.

    Keys keep the model's own names (`vision_model.vision_model.*`, `mlp1.*`, `language_model.model.*`,
    `language_model.lm_head.weight` for Eagle). With the model `config` and its `tokenizer`, the folder also
    gets what transformers' Auto classes need (longvl.eagle.export.write_hf_metadata): config, generation
    config, tokenizer, processor config, chat template. Files are written into a staging folder and renamed
    into place with the umask's mode (see atomic_files.py).
    """
    from safetensors.torch import save_file

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    tensors = full
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
    with publish_into(out) as staging:
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, staging / name, metadata={"format": "pt"})
            for key, t in shard.items():
                weight_map[key] = name
                total += t.numel() * t.element_size()
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if config is not None and tokenizer is not None:
            from longvl.eagle.export import write_hf_metadata

            write_hf_metadata(staging, config, tokenizer=tokenizer)
        elif config is not None:
            config.save_pretrained(staging)
    return out
