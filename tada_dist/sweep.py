"""`tada-sweep`: train every task x method x seed of a sweep file, then write its report (tada-report).

    tada-sweep sweeps/digits.yaml [--no-report]

A sweep file (YAML):

    config: configs/digits/mnist_to_mnistm.yaml   # the base config of every run
    tasks:                                       # task name: its overrides
      mnist_to_mnistm: {}
      mnistm_to_mnist: {data.source: mnist_m, data.target: mnist}
    methods: [source_only, dann, tada, tada+model.attention=uncertainty]
    seeds: [0, 1, 2]
    overrides: {data.root: data/digits}          # for every run (optional)
    output: runs/sweeps/digits                   # runs in <output>/<task>/<method>-seed<seed>
    experiment: digits                           # MLflow experiment (default: the file's name)
    tracking_uri: sqlite:///runs/sweeps/digits/mlflow.db   # default: <output>/mlflow.db
    processes: 1                                 # more: each run through launch/local.sh

A method is a method name, optionally with `+key=value` overrides (`tada+model.attention=uncertainty`)
and `@seed,seed` for seeds of its own. Every run is a real tada-train process tagged with its task,
method (variant) and seed; runs one after another. A finished run is not trained again, an
unfinished one resumes from its checkpoint, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tada_dist.cli import fail

PROG = "tada-sweep"
SWEEP_KEYS = {"config", "tasks", "methods", "seeds", "overrides", "output", "experiment", "tracking_uri", "processes"}


class SweepError(ValueError):
    """The sweep file is not valid."""


@dataclass(frozen=True)
class Variant:
    """A method with its own overrides and seeds: `tada+model.attention=uncertainty@0,1`."""

    label: str
    method: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]

    @staticmethod
    def parse(text: str, default_seeds: list[int]) -> Variant:
        spec, _, seeds = str(text).partition("@")
        method, *overrides = spec.split("+")
        try:
            own_seeds = tuple(int(s) for s in seeds.split(",")) if seeds else tuple(default_seeds)
        except ValueError:
            raise SweepError(f"method {text!r}: seeds after @ must be integers, e.g. tada@0,1") from None
        return Variant(label=spec, method=method, overrides=tuple(overrides), seeds=own_seeds)

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label)


@dataclass
class Sweep:
    config: str
    tasks: dict[str, dict]
    variants: list[Variant]
    overrides: dict = field(default_factory=dict)
    output: Path = Path("runs/sweep")
    experiment: str = "sweep"
    tracking_uri: str = ""
    processes: int = 1
    task_folders: bool = True  # <output>/<task>/<method>-seed<seed>; False: <output>/<method>-seed<seed>

    @staticmethod
    def load(path: str | Path) -> Sweep:
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"sweep file not found: {path}")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SweepError(f"sweep file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        unknown = sorted(set(spec) - SWEEP_KEYS)
        if unknown:
            raise SweepError(f"sweep file {path}: unknown key(s) {', '.join(unknown)} (expected {', '.join(sorted(SWEEP_KEYS))})")
        for key in ("config", "methods"):
            if key not in spec:
                raise SweepError(f"sweep file {path} has no '{key}'")
        tasks = spec.get("tasks") or {"task": {}}
        if not isinstance(tasks, dict) or not all(isinstance(v or {}, dict) for v in tasks.values()):
            raise SweepError(f"sweep file {path}: 'tasks' maps task names to overrides, e.g. t1: {{data.source: a}}")
        seeds = spec.get("seeds", [0])
        output = Path(spec.get("output", Path("runs") / "sweeps" / path.stem))
        return Sweep(config=str(spec["config"]), tasks={name: dict(v or {}) for name, v in tasks.items()},
                     variants=[Variant.parse(m, seeds) for m in spec["methods"]], overrides=dict(spec.get("overrides") or {}),
                     output=output, experiment=str(spec.get("experiment", path.stem)),
                     tracking_uri=str(spec.get("tracking_uri") or f"sqlite:///{output.resolve() / 'mlflow.db'}"),
                     processes=int(spec.get("processes", 1)))

    def runs(self) -> list[tuple[str, Variant, int]]:
        return [(task, variant, seed) for task in self.tasks for variant in self.variants for seed in variant.seeds]

    def run_dir(self, task: str, variant: Variant, seed: int) -> Path:
        return (self.output / (task if self.task_folders else "") / f"{variant.folder}-seed{seed}").resolve()

    def overrides_of(self, task: str, variant: Variant, seed: int) -> list[str]:
        settings = {**self.overrides, **self.tasks[task]}
        return [*(f"{key}={value}" for key, value in settings.items()), f"method={variant.method}", f"seed={seed}",
                f"output_dir={self.run_dir(task, variant, seed)}", f"tracking.uri={self.tracking_uri}",
                f"tracking.experiment={self.experiment}", f"tracking.task={task}", f"tracking.variant={variant.label}",
                f"tracking.run_name={task}/{variant.folder}-seed{seed}", *variant.overrides]

    def command(self, task: str, variant: Variant, seed: int) -> list[str]:
        run = ["--config", self.config, *self.overrides_of(task, variant, seed)] if self.processes == 1 else \
            [self.config, *self.overrides_of(task, variant, seed)]
        if self.processes == 1:
            return [sys.executable, "-m", "tada_dist.train", *run]
        return [str(Path(__file__).resolve().parents[1] / "launch" / "local.sh"), *run]


def finished(run_dir: Path) -> dict | None:
    """The run's metrics.json when it completed its steps, else None."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    steps = config.get("train", {}).get("steps")
    return metrics if steps is None or metrics.get("step", 0) >= steps else None


def adopt(metrics: dict, tracking_uri: str, *, task: str, variant: str) -> None:
    """Give a finished run trained before it had them the task and variant tags the report groups by."""
    from mlflow.tracking import MlflowClient

    if not metrics.get("mlflow_run_id"):
        return
    client = MlflowClient(tracking_uri=tracking_uri)
    tags = client.get_run(metrics["mlflow_run_id"]).data.tags
    for key, value in (("task", task), ("variant", variant)):
        if key not in tags:
            client.set_tag(metrics["mlflow_run_id"], key, value)


def run_sweep(sweep: Sweep, *, log=print) -> list[dict]:
    """Train every run not finished yet, one after another; the metrics of each (failed ones marked)."""
    import os

    results = []
    runs = sweep.runs()
    for index, (task, variant, seed) in enumerate(runs, start=1):
        run_dir = sweep.run_dir(task, variant, seed)
        done = finished(run_dir)
        if done is None:
            command = sweep.command(task, variant, seed)
            log(f"[{index}/{len(runs)}] {task} {variant.label} seed {seed}: {shlex.join(command)}")
            environment = {**os.environ, "NPROC_PER_NODE": str(sweep.processes)}
            outcome = subprocess.run(command, env=environment, stderr=subprocess.PIPE, text=True)
            sys.stderr.write(outcome.stderr[-4000:])
            done = finished(run_dir)
            if outcome.returncode != 0 or done is None:
                errors = [line for line in outcome.stderr.splitlines() if line.startswith("tada-train: error:")]
                done = {"failed": errors[-1].removeprefix("tada-train: error: ") if errors else
                        f"exit {outcome.returncode}"}
        else:
            log(f"[{index}/{len(runs)}] {task} {variant.label} seed {seed}: finished earlier")
            adopt(done, sweep.tracking_uri, task=task, variant=variant.label)
        results.append({"task": task, "variant": variant.label, "seed": seed, **done})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file (YAML)")
    parser.add_argument("--no-report", action="store_true", help="train only; do not write the report")
    args = parser.parse_args(argv)
    try:
        sweep = Sweep.load(args.sweep)
    except SweepError as error:
        return fail(PROG, error)
    results = run_sweep(sweep, log=lambda line: print(line, flush=True))
    failures = [r for r in results if "failed" in r]
    for r in failures:
        print(f"{PROG}: {r['task']} {r['variant']} seed {r['seed']} did not finish: {r['failed']}", file=sys.stderr)
    if not args.no_report:
        from tada_dist.report import write_report

        lines = write_report(sweep.tracking_uri, sweep.experiment, sweep.output / "report",
                             variant_order=[v.label for v in sweep.variants], task_order=list(sweep.tasks))
        print("\n".join(lines))
        print(f"report: {sweep.output / 'report'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
