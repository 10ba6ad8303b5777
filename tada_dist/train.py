"""Entry point of `tada-train`, `python -m tada_dist.train` and `torchrun ... -m tada_dist.train`.

    tada-train [--config FILE] [key=value ...]
    torchrun --nproc_per_node=2 -m tada_dist.train --config configs/digits/mnist_to_mnistm.yaml

Running the same command again resumes from the latest checkpoint in the output directory.
"""

from __future__ import annotations

import argparse
import sys

from tada_dist.config import Config, ConfigError, build_config, valid_keys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tada-train",
        description="Train TADA (or a baseline) with DALI loaders, DeepSpeed and MLflow tracking.",
        epilog="Overrides are dotted keys, e.g. optim.lr=0.003 method=dann train.steps=2000.",
    )
    parser.add_argument("--config", help="a YAML config file (default: the embedded default config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="print every valid config key and exit")
    # The DeepSpeed launcher passes --local_rank; torchrun passes LOCAL_RANK in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    try:
        config: Config = build_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"tada-train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from tada_dist.config import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0

    from tada_dist.data import DataError
    from tada_dist.model import ModelError
    from tada_dist.trainer import NonFiniteLossError, Trainer, report

    try:
        trainer = Trainer(config)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
        print(f"tada-train: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit()
    except NonFiniteLossError as err:
        if trainer.dist.is_main:
            print(f"tada-train: error: {err}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        report(summary)
    # A run stopped by SIGTERM exits 0 too: it saved its state and the same command resumes it.
    return 0


if __name__ == "__main__":
    sys.exit(main())
