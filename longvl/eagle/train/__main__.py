"""Train Eagle 2.5 progressively: `python -m longvl.eagle.train --config demo [--section.key=value ...]`.

The same command runs alone (a world of one process: gloo on CPU, nccl on a GPU) or under torchrun:
    torchrun --nproc-per-node 8 -m longvl.eagle.train --config eagle25-8b --stages.2.cp=8
`longvl-train` is the same entry point as a console script. --config takes a preset (demo, eagle25-8b) or a
YAML file; every key below can be overridden with --key=value (stage keys as --stages.N.key=value).
"""
import argparse
import os
import sys

from longvl.eagle.train.config import ConfigError, describe_keys, describe_plan, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longvl.eagle.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys:\n" + describe_keys())
    parser.add_argument("--config", default="demo", help="preset name (demo, eagle25-8b, eagle25-8b-1gpu) or a YAML file")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration for this launch (torchrun's world size), print the stages "
                             "it would train and exit, building nothing")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"{parser.prog}: config error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(describe_plan(config, int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
    import torch.distributed as dist

    from longvl.eagle.train.trainer import train  # after validation: nothing heavy is built for a bad config

    try:
        train(config)
    finally:   # process groups left to interpreter exit can abort it ("terminate called without an active exception")
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
