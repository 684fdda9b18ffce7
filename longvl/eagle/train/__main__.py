"""`python -m longvl.eagle.train --config demo [--section.key=value ...]`, alone or under torchrun.

Without torchrun it trains as a world of one process (gloo on CPU, nccl on GPU).
"""
import argparse
import sys

from longvl import kernels  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA before any kernel is defined)
import torch.distributed as dist

from longvl.eagle.train.config import load_config
from longvl.eagle.train.trainer import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longvl.eagle.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name (demo, eagle25-8b) or a YAML file")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    try:
        train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
