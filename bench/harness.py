"""Timing, memory and result-file helpers shared by every benchmark.

GPU times are medians of CUDA-event timings after warm-up (`triton.testing.do_bench`): a wall-clock timer
around asynchronous GPU work measures the launch, not the kernel. For short ops whose host-side launch cost
exceeds their GPU time, `cuda_graph=True` replays a captured CUDA graph instead, so the figure is the GPU's
(every provider of a comparison is timed the same way; the record's `timing` says which). On CPU the same code runs at tiny shapes
with a wall-clock median so CI exercises it; those records say `cpu` and are not performance figures.
"""
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"
ON_GPU = torch.cuda.is_available()


@dataclasses.dataclass
class Record:
    op: str                      # e.g. "rms_norm.fwd_bwd"
    provider: str                # ours / eager / torch.compile / liger / cce / ...
    shape: dict                  # named sizes, e.g. {"tokens": 16384, "hidden": 3584}
    dtype: str
    median_ms: float
    metric: str | None = None    # "TB/s" or "TFLOP/s"
    value: float | None = None   # achieved rate in `metric`
    fraction_of_ceiling: float | None = None
    peak_extra_mib: float | None = None
    rel_error: dict | None = None  # e.g. {"dx": ..., "dw": ...}: relative Frobenius error against float64
    device: str = "cpu"
    timing: str = "wall_clock"   # cuda_events / cuda_graph / wall_clock (CPU)
    note: str = ""


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 200, cuda_graph: bool = False) -> float:
    """Median run time of `fn` in milliseconds (CUDA events or graph replay on GPU, wall clock on CPU)."""
    if ON_GPU:
        import triton.testing

        if cuda_graph:
            # do_bench_cudagraph warms up and captures on its own side stream; a first call on the default
            # stream here would bind autograd's gradient accumulation to the wrong stream for the capture.
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn) -> float | None:
    """Peak device memory allocated by one call of `fn` above what was allocated before it, in MiB."""
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_of(nbytes: int, device) -> callable:
    """A streaming kernel on the SMs that moves `nbytes` (half read, half written): the floor for a
    bandwidth-bound op of that size, as small ops never reach the 1 GiB copy ceiling. It is a bitwise NOT of
    int32 words rather than copy_(), which a CUDA graph turns into a DMA memcpy node with another speed."""
    src = torch.randint(-2**31, 2**31 - 1, (nbytes // 8,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    return lambda: torch.bitwise_not(src, out=dst)


def measure_copy_floor(measure, op: str, nbytes: int, *, shape: dict, dtype, device, timing: str):
    """Record `copy_of(nbytes)` as provider "copy_floor" of `op`; graph-timed only, like the ops it is a floor for."""
    import pytest

    if timing != "cuda_graph":
        pytest.skip("the copy floor is graph-timed only")
    measure(op, "copy_floor", copy_of(nbytes, device), shape=shape, dtype=dtype, bytes=nbytes, cuda_graph=True,
            memory=False)


def device_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 GEMM rate measured now: what figures are judged by."""
    if not ON_GPU:
        return {}
    src = torch.randn(2**30 // 4, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_tb_s": 2 * 2**30 / copy_ms / 1e9, "bf16_gemm_tflop_s": 2 * n**3 / gemm_ms / 1e9}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "gpu_count": torch.cuda.device_count() if ON_GPU else 0,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    for dist in ("transformers", "liger-kernel", "cut-cross-entropy", "flash-attn"):
        env[dist] = _version(dist)
    return env


def save_results(records, ceilings: dict, name: str, out_dir=None) -> Path | None:
    """Write one results JSON (environment, ceilings, records) and return its path.

    Without a GPU nothing goes to bench/results/ (CPU runs exercise the code, they measure nothing worth
    committing): then only an explicit `out_dir` / $BENCH_OUT is written, else None is returned."""
    env = environment()
    out_dir = out_dir or os.environ.get("BENCH_OUT")
    if out_dir is None and not ON_GPU:
        print("no CUDA GPU: results are not written to bench/results/ (set BENCH_OUT or --out to keep them)")
        return None
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = env["device"].replace(" ", "-").lower()
    path = out_dir / f"{name}_{gpu}x{max(env['gpu_count'], 1)}_{env['date'][:10]}.json"
    payload = {"suite": name, "env": env, "ceilings": ceilings,
               "records": [dataclasses.asdict(r) for r in records]}
    path.write_text(json.dumps(payload, indent=1))
    return path
