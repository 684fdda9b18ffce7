"""Run every benchmark on whatever GPUs are present: `python -m bench [--quick] [--out DIR]`.

Single-GPU kernel benchmarks run under pytest-benchmark (bench/bench_*.py); with 2 or more GPUs the
multi-process ones (context-parallel attention, training throughput) run under torchrun at every GPU count
up to what is present. Results land as JSON in --out (default bench/results/); then
`python -m bench.report` renders the README table and plots, and `python -m bench.compare NEW.json` guards
against regressions. Without a GPU the suite runs at tiny shapes on the CPU, which exercises the code but
measures nothing worth reporting (those records are labelled `cpu`).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Multi-process benchmarks and the arguments that make them quick.
MULTI_GPU_SCRIPTS = {"bench_cp.py": ["--tokens", "8192"],
                     "bench_train.py": ["--parts", "ladder", "--ladder", "32768"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="one model and one size per benchmark")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k rms_norm)")
    args = parser.parse_args(argv)
    env = dict(os.environ, BENCH_OUT=str(args.out), BENCH_QUICK="1" if args.quick else "0",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    status = subprocess.call([sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:xdist",
                              f"--benchmark-json={args.out / 'pytest-benchmark.json'}", *args.pytest_args],
                             env=env, cwd=HERE.parent)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for script, quick_args in MULTI_GPU_SCRIPTS.items():
        for n in (2, 4, 8):
            if n <= gpus:
                status |= subprocess.call([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                                           str(HERE / script)] + (quick_args if args.quick else []), env=env)
    return status


if __name__ == "__main__":
    sys.exit(main())
