"""Entry point of `tada-train`, `python -m tada_dist.train` and `torchrun ... -m tada_dist.train`.

    tada-train [--config FILE] [key=value ...]
    torchrun --nproc_per_node=2 -m tada_dist.train --config configs/digits/mnist_to_mnistm.yaml

Running the same command again resumes from the latest checkpoint in the output directory. `--help`,
`--list-keys`, `--print-config` and config mistakes are answered before torch is imported; the
checks of tada_dist.preflight run before anything heavy starts.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from tada_dist.cli import fail, reporting_rank, setup_logging
from tada_dist.config import ConfigError, build_config, dump_config, key_reference

PROG = "tada-train"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train TADA (or a baseline) with DALI loaders, DeepSpeed and MLflow tracking.",
        epilog="Overrides are dotted keys, e.g. optim.lr=0.003 method=dann train.steps=2000. "
               "Running the same command again resumes the run.",
    )
    parser.add_argument("--config", help="a YAML config file (default: the embedded default config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="print every config key, its default and meaning")
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's start-up messages")
    # The DeepSpeed launcher passes --local_rank; torchrun passes LOCAL_RANK in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def format_keys() -> str:
    rows = [(key, yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip(), doc)
            for key, default, doc in key_reference()]
    key_width = max(len(key) for key, _, _ in rows)
    default_width = min(24, max(len(default) for _, default, _ in rows))
    return "\n".join(f"{key:<{key_width}}  {default:<{default_width}}  {doc}".rstrip() for key, default, doc in rows)


def main(argv: list[str] | None = None, hooks=None) -> int:
    """`hooks` (a trainer.StepHooks) lets tests inject faults into the steps of a real run."""
    args = parse_args(argv)
    if args.list_keys:
        print(format_keys())
        return 0
    try:
        config = build_config(args.config, args.overrides)
    except ConfigError as err:
        return fail(PROG, err)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.verbose:
        os.environ["TADA_DIST_VERBOSE"] = "1"
    setup_logging(PROG)

    from tada_dist.preflight import check_before_training

    try:
        check_before_training(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        return fail(PROG, err)

    from tada_dist.data import DataError
    from tada_dist.model import ModelError
    from tada_dist.trainer import NonFiniteLossError, Trainer, report

    try:
        trainer = Trainer(config, hooks)
    except (ConfigError, DataError, ModelError) as err:
        return fail(PROG, err)
    try:
        summary = trainer.fit()
    except NonFiniteLossError as err:
        if reporting_rank():
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if reporting_rank():
            last = trainer.checkpointer.last_good()
            print(f"\n{PROG}: interrupted at step {trainer.step} without saving; "
                  f"{f'the last checkpoint is {last}' if last else 'no checkpoint was saved'}; "
                  "run the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    if trainer.dist.is_main:
        report(summary)
    # A run stopped by SIGTERM exits 0: it saved its state and the same command resumes it.
    return INTERRUPTED_EXIT if summary.get("stopped") == "SIGINT" else 0


if __name__ == "__main__":
    sys.exit(main())
