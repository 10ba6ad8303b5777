"""Target accuracy of source_only, dann and tada over several seeds, written as a markdown table.

    python bench/accuracy.py --data-root ../shared/data/digits \
        --config configs/digits/mnist_to_mnistm.yaml --methods source_only dann tada --seeds 0 1 2

Each run is a real `tada-train` process (DALI, DeepSpeed, MLflow); runs that already finished in the
output folder are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jobs import write_report


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict:
    run_dir = Path(args.output) / f"{method}-seed{seed}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if metrics["step"] >= args.steps:
            return metrics
    command = [
        sys.executable, "-m", "tada_dist.train", "--config", args.config,
        *([f"data.root={args.data_root}"] if args.data_root else []),
        f"method={method}", f"seed={seed}", f"output_dir={run_dir}",
        f"train.steps={args.steps}", f"tracking.uri=sqlite:///{Path(args.output).resolve() / 'mlflow.db'}",
        *args.overrides,
    ]
    print("+", shlex.join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        # A run that stops (say on diverging losses) is a result too: report it, keep going.
        errors = [line for line in result.stderr.splitlines() if line.startswith("tada-train: error:")]
        reason = errors[-1].removeprefix("tada-train: error: ") if errors else f"exit {result.returncode}"
        return {"failed": reason, "seed": seed}
    metrics = json.loads(metrics_file.read_text())
    metrics["process_seconds"] = round(time.perf_counter() - started, 1)
    metrics_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def summarise(rows: dict[str, list[dict]]) -> list[str]:
    lines = ["| method | target accuracy (%) mean ± std | per seed | steps | wall time per run (s) |",
             "|---|---|---|---|---|"]
    failures = []
    for method, runs in rows.items():
        finished = [r for r in runs if "failed" not in r]
        failures += [f"- {method}, seed {r['seed']}: {r['failed']}" for r in runs if "failed" in r]
        if not finished:
            lines.append(f"| {method} | every run failed | | | |")
            continue
        accs = [r["target_acc"] for r in finished]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{r['target_acc']:.2f}" if "failed" not in r else "failed" for r in runs)
        wall = statistics.mean(r.get("process_seconds", r["wall_seconds"]) for r in finished)
        lines.append(f"| {method} | {statistics.mean(accs):.2f} ± {std:.2f} | {per_seed} | {finished[0]['step']} "
                     f"| {wall:.0f} |")
    if failures:
        lines += ["", "Runs that did not finish (left out of the means):", "", *failures]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding the config's domains (default: the generated dataset)")
    parser.add_argument("--config", default="configs/digits/mnist_to_mnistm.yaml")
    parser.add_argument("--methods", nargs="+", default=["source_only", "dann", "tada"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--output", default="runs/bench_accuracy")
    parser.add_argument("--report", default="bench/results/digits_mnist_to_mnistm.md")
    parser.add_argument("--title", default="MNIST -> MNIST-M target accuracy")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run (key=value)")
    args = parser.parse_args()

    rows = {method: [run_one(args, method, seed) for seed in args.seeds] for method in args.methods}
    table = summarise(rows)
    write_report(args.report, [f"# {args.title}", "", *table, ""])

if __name__ == "__main__":
    main()
