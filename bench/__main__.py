"""Run every benchmark on whatever GPUs are present: `python -m bench [--quick] [--out DIR]` (or `longvl-bench`).

Single-GPU kernel benchmarks run under pytest-benchmark (bench/bench_*.py); with 2 or more GPUs the
multi-process ones (context-parallel attention, training throughput) run under torchrun at every GPU count
up to what is present. Results land as JSON in --out (created if missing; default bench/results/ on a GPU);
then `python -m bench.report` renders the README table and plots, and `python -m bench.compare NEW.json`
guards against regressions. Without a GPU the suite runs at tiny shapes on the CPU, which exercises the code
but measures nothing worth reporting: it says so, and writes results only where --out points.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Multi-process benchmarks and the arguments that make them quick.
MULTI_GPU_SCRIPTS = {"bench_cp.py": ["--tokens", "8192"],
                     "bench_train.py": ["--parts", "ladder", "--ladder", "32768"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the benchmark suite; other arguments go to pytest "
                                                 "(e.g. -k rms_norm).")
    parser.add_argument("--quick", action="store_true", help="one model and one size per benchmark")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results JSON (created); default bench/results/ on a GPU, none on CPU")
    args, pytest_args = parser.parse_known_args(argv)   # everything else goes to pytest, e.g. -k rms_norm
    on_gpu = torch.cuda.is_available()
    if args.out is None and on_gpu:
        args.out = HERE / "results"
    if args.out is None:
        print("no CUDA GPU: the suite runs at tiny shapes to exercise the code and writes no results "
              "(pass --out DIR to keep the CPU records)")
        json_dir = Path(tempfile.mkdtemp(prefix="longvl_bench_"))
    else:
        args.out = args.out.resolve()   # pytest runs from the checkout, not from here
        args.out.mkdir(parents=True, exist_ok=True)
        json_dir = args.out
    env = dict(os.environ, BENCH_QUICK="1" if args.quick else "0",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    if args.out is not None:
        env["BENCH_OUT"] = str(args.out)
    status = subprocess.call([sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:xdist",
                              f"--benchmark-json={json_dir / 'pytest-benchmark.json'}", *pytest_args],
                             env=env, cwd=HERE.parent)
    gpus = torch.cuda.device_count() if on_gpu else 0
    for script, quick_args in MULTI_GPU_SCRIPTS.items():
        for n in (2, 4, 8):
            if n <= gpus:
                status |= subprocess.call([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                                           str(HERE / script)] + (quick_args if args.quick else []), env=env)
    if args.out is not None:
        print(f"results in {args.out}; render the README table with: python -m bench.report")
    return status


if __name__ == "__main__":
    sys.exit(main())
