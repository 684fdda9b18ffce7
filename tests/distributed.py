"""Run a function in N freshly spawned processes joined in one process group, with a hard timeout.

`run_distributed(fn, world_size, *args)` starts `world_size` processes (spawn, never fork), initialises
torch.distributed in each (gloo on CPU by default) on a free localhost port, calls `fn(rank, world_size,
*args)` and returns the per-rank return values. Any exception in a rank is re-raised here with that rank's
traceback; a rank that has not finished after `timeout` seconds gets every process killed and a
`TimeoutError`, so a hung collective fails the test instead of hanging CI. `fn` must be defined at module
level in an importable module (spawned children import it by name).
"""
import datetime
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def cpu_only_env(processes: int = 2) -> dict:
    """Environment for CPU (gloo) worker processes: GPUs hidden where there are fewer than `processes`, so that a
    CPU test that starts several ranks also runs on a one-GPU machine (each rank would claim its own GPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results, collective_timeout):
    # Collectives time out later than the harness, so a hang is always reported as the harness's TimeoutError.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # report everything, including KeyboardInterrupt from a kill
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=180.0, backend="gloo"):
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return the list of results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, backend, fn, args, results, timeout + 60))
             for r in range(world_size)]
    hidden = cpu_only_env(world_size) if backend == "gloo" else {}
    saved = {key: os.environ.get(key) for key in hidden}
    os.environ.update(hidden)   # spawned children read the environment when they start
    try:
        for p in procs:
            p.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed run of {fn.__name__} on {world_size} ranks did not finish in "
                                   f"{timeout:.0f}s; ranks done: {sorted(outputs)}; failed: {sorted(errors)}")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # A rank died without reporting (segfault, OOM kill): its peers would hang forever.
                    raise RuntimeError(f"rank(s) {[procs.index(p) for p in dead]} exited with codes "
                                       f"{[p.exitcode for p in dead]} without a result")
                continue
            (outputs if status == "ok" else errors)[rank] = payload
            if errors:
                break  # peers of a failed rank may block in a collective: no need to wait for them
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [outputs[r] for r in range(world_size)]
