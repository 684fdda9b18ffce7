"""Console scripts for the benchmark suite, which lives in the source checkout's `bench/` folder.

`longvl-bench` and `longvl-bench-report` are `python -m bench` and `python -m bench.report` run from the
checkout that this package was installed from (an editable install, as `install.sh` makes). The trainer, the
indexer and the synthetic-data generator are plain module entry points (see setup.py).
"""
import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def _run_bench_module(module: str, argv=None) -> int:
    if not (CHECKOUT / "bench" / "__main__.py").is_file():
        print(f"{Path(sys.argv[0]).name}: the benchmark suite ships with the source checkout, not the installed "
              f"package; clone the repository and run `bash install.sh` there", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])))
    args = sys.argv[1:] if argv is None else list(argv)
    return subprocess.call([sys.executable, "-m", module, *args], cwd=CHECKOUT, env=env)


def bench(argv=None) -> int:
    """`longvl-bench [--quick] [--out DIR] [pytest args]`: the whole suite on the GPUs present."""
    return _run_bench_module("bench", argv)


def bench_report(argv=None) -> int:
    """`longvl-bench-report`: README table, bench/REPORT.md and plots from bench/results/*.json."""
    return _run_bench_module("bench.report", argv)
