"""Target accuracy of several methods and seeds, side by side with the textbook recipe, as a markdown table.

    python bench/accuracy.py --data-root ../shared/data/digits --config configs/digits/mnist_to_mnistm.yaml \
        --variants source_only dann tada tada+model.attention=uncertainty tada_local@0 --seeds 0 1 2 --textbook

A variant is a method, optionally followed by `+key=value` overrides and `@seed,seed` (its own seeds
instead of --seeds): `tada+model.attention=uncertainty@0,1`. Each run is a real `tada-train` process
(DALI, DeepSpeed, MLflow); runs that already finished in the output folder are reused, and an
unfinished one resumes from its checkpoint, so an interrupted benchmark continues where it stopped.
--textbook adds source_only and dann rows from bench/digits_textbook.py (plain PyTorch, the published
digits recipe) on the same data, seeds and steps.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from report import write_report

from tada_dist.jobs import REPO


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]

    @staticmethod
    def parse(text: str, default_seeds: list[int]) -> Variant:
        spec, _, seeds = text.partition("@")
        method, *overrides = spec.split("+")
        return Variant(label=spec, method=method, overrides=tuple(overrides),
                       seeds=tuple(int(s) for s in seeds.split(",")) if seeds else tuple(default_seeds))

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label)


def run_project(args: argparse.Namespace, variant: Variant, seed: int) -> dict:
    run_dir = Path(args.output) / f"{variant.folder}-seed{seed}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if metrics["step"] >= args.steps:
            return metrics
    command = [
        sys.executable, "-m", "tada_dist.train", "--config", args.config,
        *([f"data.root={args.data_root}"] if args.data_root else []),
        f"method={variant.method}", f"seed={seed}", f"output_dir={run_dir}",
        f"train.steps={args.steps}", f"tracking.uri=sqlite:///{Path(args.output).resolve() / 'mlflow.db'}",
        f"tracking.run_name={variant.folder}-seed{seed}", *args.overrides, *variant.overrides,
    ]
    print("+", shlex.join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(result.stderr[-5000:])
    if result.returncode != 0:
        # A run that stops (say on diverging losses) is a result too: report it, keep going.
        errors = [line for line in result.stderr.splitlines() if line.startswith("tada-train: error:")]
        reason = errors[-1].removeprefix("tada-train: error: ") if errors else f"exit {result.returncode}"
        return {"failed": reason, "seed": seed}
    metrics = json.loads(metrics_file.read_text())
    metrics["process_seconds"] = round(time.perf_counter() - started, 1)
    metrics_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def run_textbook(args: argparse.Namespace, method: str, seed: int) -> dict:
    result_file = Path(args.output) / f"textbook-{method}-seed{seed}.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result["steps"] >= args.steps:
            return result
    source, target = textbook_domains(args.config, [f"data.root={args.data_root}", *args.overrides])
    command = [sys.executable, str(REPO / "bench" / "digits_textbook.py"), "--data-root", args.data_root,
               "--source", source, "--target", target, "--method", method, "--seed", str(seed),
               "--steps", str(args.steps)]
    print("+", shlex.join(command), flush=True)
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    return result


def textbook_domains(config_file: str, overrides: list[str]) -> tuple[str, str]:
    from tada_dist.config import build_config

    config = build_config(config_file, [o for o in overrides if o.startswith("data.")])
    return config.data.source, config.data.target


def summarise(rows: dict[str, list[dict]]) -> list[str]:
    lines = ["| method | target accuracy (%) mean ± std | per seed | steps | wall time per run (s) |",
             "|---|---|---|---|---|"]
    failures = []
    for label, runs in rows.items():
        finished = [r for r in runs if "failed" not in r]
        failures += [f"- {label}, seed {r['seed']}: {r['failed']}" for r in runs if "failed" in r]
        if not finished:
            lines.append(f"| {label} | every run failed | | | |")
            continue
        accs = [r["target_acc"] for r in finished]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{r['target_acc']:.2f}" if "failed" not in r else "failed" for r in runs)
        wall = statistics.mean(r.get("process_seconds") or r.get("wall_seconds") or r["train_seconds"] for r in finished)
        steps = finished[0].get("step", finished[0].get("steps"))
        spread = f" ± {std:.2f}" if len(accs) > 1 else " (one seed)"
        lines.append(f"| {label} | {statistics.mean(accs):.2f}{spread} | {per_seed} | {steps} | {wall:.0f} |")
    if failures:
        lines += ["", "Runs that did not finish (left out of the means):", "", *failures]
    return lines


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

    rows: dict[str, list[dict]] = {}
    if args.textbook:
        for method in ("source_only", "dann"):
            rows[f"textbook {method} (plain PyTorch)"] = [run_textbook(args, method, seed) for seed in args.seeds]
    for text in args.variants:
        variant = Variant.parse(text, args.seeds)
        rows[variant.label] = [run_project(args, variant, seed) for seed in variant.seeds]
    write_report(args.report, [f"# {args.title}", "", *summarise(rows), ""])


if __name__ == "__main__":
    main()
