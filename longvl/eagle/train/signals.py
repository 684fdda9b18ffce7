"""SIGTERM and SIGINT: finish the current step, save a checkpoint, exit non-zero saying where it is.

Schedulers send SIGTERM some time before SIGKILL; Ctrl-C sends SIGINT. The handler only records the signal:
the training loop asks `StopRequest.agreed()` at every step boundary, an all-reduce over a dedicated gloo group,
so all ranks stop after the same step even when only some of them received the signal (collectives stay
matched). The loop then saves and raises `TrainingStopped`, a SystemExit with code 128 + the signal number (what
a shell reports for a process killed by that signal), after rank 0 printed one line naming the checkpoint. The
delay is bounded by the rest of the current step plus one checkpoint write.

Further signals while stopping are ignored (a launcher often forwards the one the job already got); SIGKILL
still ends the run at once, and resume from the last complete checkpoint is exact after it too.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(SystemExit):
    """The run stopped on a signal after saving `checkpoint` at `step`; the exit code is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """Installs the SIGTERM / SIGINT handlers (main thread only) until `close()`; create it on every rank."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")
        self.received: int = 0
        self.received_at: float | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received:
            return
        self.received, self.received_at = signum, time.monotonic()
        if dist.get_rank() == 0:
            print(f"{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping",
                  flush=True)

    def agreed(self) -> int:
        """Collective, at a step boundary: the signal number if any rank received one (else 0)."""
        flag = torch.tensor([self.received], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        signum = int(flag.item())
        if signum and self.received_at is None:
            self.received_at = time.monotonic()   # this rank learns of it now
        return signum

    def stopped(self, signum: int, step: int, checkpoint: Path | None) -> TrainingStopped:
        """The exception to raise once `checkpoint` (complete) is saved; rank 0 prints the one line."""
        stop = TrainingStopped(signum, step, checkpoint)
        if dist.get_rank() == 0:
            print(f"stopped by {stop.signal_name} after step {step}: checkpoint {checkpoint} is complete "
                  f"({time.monotonic() - self.received_at:.1f} s after the stop reached this rank); "
                  f"run the same command to resume", flush=True)
        return stop

    def close(self) -> None:
        """Restore the handlers that were there before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
