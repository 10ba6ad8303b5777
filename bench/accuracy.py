"""Target accuracy of several methods and seeds, side by side with the textbook recipe, as a markdown table.

    python bench/accuracy.py --data-root data/digits --config configs/digits/mnist_to_mnistm.yaml \
        --variants source_only dann tada tada+model.attention=uncertainty tada_local@0 --seeds 0 1 2 --textbook

The runs are a tada-sweep (see tada_dist/sweep.py) of one task: a variant is a method, optionally
with `+key=value` overrides and `@seed,seed` for its own seeds. Each run is a real tada-train process
(DALI, DeepSpeed, MLflow); finished runs are reused and unfinished ones resume, so an interrupted
benchmark continues where it stopped. --textbook adds source_only and dann rows from
bench/digits_textbook.py (plain PyTorch, the published digits recipe) on the same data, seeds and
steps, logged to the same MLflow store. The table is tada-report's; a second table gives each run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from report import write_report

from tada_dist.config import build_config
from tada_dist.data.domain import load_domain
from tada_dist.jobs import REPO
from tada_dist.paths import task_name
from tada_dist.report import collect, markdown, table
from tada_dist.sweep import Sweep, Variant, run_sweep

EXPERIMENT = "tada-dist"


def protocol(config) -> str:
    """The data the numbers were measured on, in the unsupervised protocol every run follows."""
    root = Path(config.data.root)
    source, target = (load_domain(root / name) for name in (config.data.source, config.data.target))
    return (f"Protocol: unsupervised domain adaptation. Source `{config.data.source}`: all {len(source.files):,} "
            f"images, labelled, for training. Target `{config.data.target}`: all {len(target.files):,} images, "
            f"unlabelled in training; their labels give only the reported target accuracy (all of them, "
            f"after the last step). {len(source.classes)} classes.")


def run_textbook(args, method: str, seed: int, task: str, source: str, target: str, tracking_uri: str) -> dict:
    result_file = Path(args.output) / f"textbook-{method}-seed{seed}.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is None or result["steps"] < args.steps:
        command = [sys.executable, str(REPO / "bench" / "digits_textbook.py"), "--data-root", args.data_root,
                   "--source", source, "--target", target, "--method", method, "--seed", str(seed),
                   "--steps", str(args.steps)]
        print("+", shlex.join(command), flush=True)
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
    if "mlflow_run_id" not in result:  # recorded in the store beside the project's runs, for the report
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(EXPERIMENT)
        variant = f"textbook {method} (plain PyTorch)"
        with mlflow.start_run(run_name=f"textbook-{method}-seed{seed}",
                              tags={"task": task, "variant": variant, "seed": str(seed), "method": method}) as run:
            mlflow.log_params({"steps": result["steps"], "script": "bench/digits_textbook.py"})
            mlflow.log_metrics({"target_acc": result["target_acc"], "images_per_sec": result["images_per_sec"]})
            result["mlflow_run_id"] = run.info.run_id
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding the config's domains (default: the generated dataset)")
    parser.add_argument("--config", default="configs/digits/mnist_to_mnistm.yaml")
    parser.add_argument("--variants", nargs="+", default=["source_only", "dann", "tada"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--textbook", action="store_true", help="add the plain PyTorch textbook rows (digits only)")
    parser.add_argument("--output", default="runs/bench_accuracy")
    parser.add_argument("--report", default="bench/results/digits_mnist_to_mnistm.md")
    parser.add_argument("--title", default="MNIST -> MNIST-M target accuracy")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run (key=value)")
    args = parser.parse_args()
    if args.textbook and not args.data_root:
        parser.error("--textbook needs --data-root (the textbook script reads the digits folders)")

    overrides = dict(item.split("=", 1) for item in args.overrides)
    overrides["train.steps"] = str(args.steps)
    if args.data_root:
        overrides["data.root"] = args.data_root
    config = build_config(args.config, [f"{k}={v}" for k, v in overrides.items()])
    task = task_name(config.data.source, config.data.target)
    output = Path(args.output)
    sweep = Sweep(config=args.config, tasks={task: {}}, variants=[Variant.parse(v, args.seeds) for v in args.variants],
                  overrides=overrides, output=output, experiment=EXPERIMENT,
                  tracking_uri=f"sqlite:///{output.resolve() / 'mlflow.db'}", task_folders=False)

    textbook = []
    if args.textbook:
        for method in ("source_only", "dann"):
            textbook += [{"variant": f"textbook {method} (plain PyTorch)", "seed": seed,
                          **run_textbook(args, method, seed, task, config.data.source, config.data.target,
                                         sweep.tracking_uri)} for seed in args.seeds]
    runs = run_sweep(sweep, log=lambda line: print(line, flush=True))

    variant_order = [row["variant"] for row in textbook] + [v.label for v in sweep.variants]
    variants, tasks, cells = table(collect(sweep.tracking_uri, EXPERIMENT), variant_order=variant_order)
    lines = [f"# {args.title}", "", protocol(config), "", *markdown(variants, tasks, cells, metric="target_acc"), "",
             "Every run:", "", "| method | seed | target accuracy (%) | steps | training time (s) |",
             "|---|---|---|---|---|"]
    for row in [*textbook, *runs]:
        if "failed" in row:
            lines.append(f"| {row['variant']} | {row['seed']} | did not finish: {row['failed']} | | |")
            continue
        seconds = row.get("train_seconds") or row.get("wall_seconds") or 0.0
        lines.append(f"| {row['variant']} | {row['seed']} | {row['target_acc']:.2f} | {row.get('step', row.get('steps'))} "
                     f"| {seconds:.0f} |")
    finished = [row for row in runs if "failed" not in row]
    if finished:
        lines += ["", f"Median training time of a tada-train run: "
                      f"{statistics.median(r.get('train_seconds') or r.get('wall_seconds') for r in finished):.0f} s."]
    write_report(args.report, [*lines, ""])


if __name__ == "__main__":
    main()
