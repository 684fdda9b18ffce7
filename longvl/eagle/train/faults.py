"""Fault handling: skip steps whose loss or gradients are not finite, stop after too many in a row, name OOMs.

Every rank must take the same decision (a rank skipping backward while another runs it would deadlock the
FSDP collectives), so finiteness is agreed with an all-reduce before acting on it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist


class NonFiniteStop(RuntimeError):
    """Raised when `max_consecutive` steps in a row had a non-finite loss or gradient."""


def all_finite(value: torch.Tensor, group=None) -> bool:
    """True when `value` is finite on every rank of `group` (one all-reduce)."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1)   # on value's device: nccl or gloo
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() == 1.0)


class NonFiniteGuard:
    """Counts skipped steps; raises NonFiniteStop after `max_consecutive` of them in a row."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, finite: bool, *, step: int, stage: str, what: str) -> bool:
        """Register one step's outcome; returns `finite` (True: apply the step)."""
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStop(
                f"stopping: {self.consecutive} consecutive steps with a non-finite {what} (last at step {step}, "
                f"stage {stage!r}; {self.total} skipped in total). Lower the learning rate, check the data, or "
                f"raise faults.max_consecutive_nonfinite.")
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


@contextlib.contextmanager
def report_oom(stage: str, max_length: int, tokens: int, cp: int):
    """Re-raise an out-of-memory error with the stage, length and parallel layout that caused it."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan
        raise torch.OutOfMemoryError(
            f"out of memory in stage {stage!r} (max_length {max_length}, this pack {tokens} tokens, "
            f"{math.ceil(tokens / cp)} per rank with cp={cp}; peak {peak:.1f} GiB allocated). Try a higher "
            f"context-parallel degree, memory.offload_activations=true or activation_checkpointing=full. "
            f"Original error: {error}") from error
