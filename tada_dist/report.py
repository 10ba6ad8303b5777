"""`tada-report`: the paper-style table of an MLflow store's runs: tasks as columns, methods as rows.

    tada-report --tracking-uri sqlite:///runs/sweeps/digits/mlflow.db --experiment digits --output report/

Every finished run of the experiment counts once, under its `task` and `variant` tags (set by
tada-train from tracking.task and tracking.variant; tada-sweep sets both). A cell is the mean and
standard deviation over the seeds of the runs' final target accuracy; the last column averages the
task means. Writes report.md, report.csv (one row per method), runs.csv (one row per run) and
report.png (a bar chart with the standard deviations), and logs all four to a summary run of the
experiment (tagged kind=report, which later reports leave out).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from tada_dist.cli import fail

PROG = "tada-report"
REPORT_KIND = "report"


@dataclass(frozen=True)
class RunResult:
    task: str
    variant: str
    seed: str
    value: float
    run_id: str


def collect(tracking_uri: str, experiment: str, metric: str = "target_acc") -> list[RunResult]:
    """The final `metric` of every finished, tagged run of `experiment` (report runs left out)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ValueError(f"no experiment {experiment!r} in {tracking_uri} (experiments there: {known})")
    results = []
    for run in client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=50_000):
        tags = run.data.tags
        if tags.get("kind") == REPORT_KIND or metric not in run.data.metrics or "task" not in tags:
            continue
        results.append(RunResult(task=tags["task"], variant=tags.get("variant", tags.get("method", "?")),
                                 seed=tags.get("seed", "?"), value=run.data.metrics[metric], run_id=run.info.run_id))
    if not results:
        raise ValueError(f"experiment {experiment!r} in {tracking_uri} has no finished run with a task tag and "
                         f"a {metric} metric")
    return results


def cell(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation or 0 for one value, count)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def table(results: list[RunResult], *, variant_order: list[str] | None = None,
          task_order: list[str] | None = None) -> tuple[list[str], list[str], dict]:
    """(variants, tasks, cells): cells[(variant, task)] = (mean, std, n) and cells[(variant, "average")]
    the mean of that variant's task means over the tasks it ran. Orders: as given, then first seen."""
    def ordered(seen: list[str], given: list[str] | None) -> list[str]:
        first, given = list(dict.fromkeys(seen)), list(dict.fromkeys(given or []))
        return [name for name in given if name in first] + [name for name in first if name not in given]

    variants = ordered([r.variant for r in results], variant_order)
    tasks = ordered([r.task for r in results], task_order)
    cells = {}
    for variant in variants:
        for task in tasks:
            values = [r.value for r in results if r.variant == variant and r.task == task]
            if values:
                cells[(variant, task)] = cell(values)
        means = [cells[(variant, task)][0] for task in tasks if (variant, task) in cells]
        cells[(variant, "average")] = (statistics.mean(means), 0.0, len(means))
    return variants, tasks, cells


def markdown(variants: list[str], tasks: list[str], cells: dict, *, metric: str) -> list[str]:
    header = ["method", *tasks, "average"]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for variant in variants:
        row = [variant]
        for task in tasks:
            if (variant, task) not in cells:
                row.append("")
                continue
            mean, std, n = cells[(variant, task)]
            row.append(f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)")
        row.append(f"{cells[(variant, 'average')][0]:.2f}")
        lines.append(f"| {' | '.join(row)} |")
    lines += ["", f"Cells: mean ± standard deviation of the final {metric} over seeds (number of runs); "
                  "average: the mean of the task means."]
    return lines


def write_csvs(results: list[RunResult], variants: list[str], tasks: list[str], cells: dict, folder: Path) -> list[Path]:
    with open(folder / "report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *[f"{t}_{part}" for t in tasks for part in ("mean", "std", "runs")], "average"])
        for variant in variants:
            row = [variant]
            for task in tasks:
                mean, std, n = cells.get((variant, task), (float("nan"), float("nan"), 0))
                row += [f"{mean:.4f}", f"{std:.4f}", n]
            writer.writerow([*row, f"{cells[(variant, 'average')][0]:.4f}"])
    with open(folder / "runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "method", "seed", "value", "run_id"])
        writer.writerows([r.task, r.variant, r.seed, f"{r.value:.4f}", r.run_id] for r in results)
    return [folder / "report.csv", folder / "runs.csv"]


def bar_chart(variants: list[str], tasks: list[str], cells: dict, *, metric: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*tasks, "average"] if len(tasks) > 1 else tasks
    width = 0.8 / len(variants)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 2), 4.5), dpi=100)
    for index, variant in enumerate(variants):
        means = [cells.get((variant, c), (float("nan"),))[0] for c in columns]
        stds = [cells.get((variant, c), (0.0, 0.0))[1] for c in columns]
        axis.bar([c + (index - (len(variants) - 1) / 2) * width for c in range(len(columns))], means, width,
                 yerr=stds, capsize=2, label=variant)
    axis.set_xticks(range(len(columns)), columns, fontsize=8)
    axis.set_ylabel(metric)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(tracking_uri: str, experiment: str, output: Path, *, metric: str = "target_acc",
                 title: str | None = None, variant_order: list[str] | None = None,
                 task_order: list[str] | None = None, log: bool = True) -> list[str]:
    """Collect, tabulate and write the four files; log them to a summary run. Returns the table lines."""
    results = collect(tracking_uri, experiment, metric)
    variants, tasks, cells = table(results, variant_order=variant_order, task_order=task_order)
    lines = markdown(variants, tasks, cells, metric=metric)
    title = title or f"{experiment}: {metric}"
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.md").write_text("\n".join([f"# {title}", "", *lines, ""]))
    files = [output / "report.md", *write_csvs(results, variants, tasks, cells, output),
             bar_chart(variants, tasks, cells, metric=metric, title=title, path=output / "report.png")]
    if log:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name="report", tags={"kind": REPORT_KIND}):
            mlflow.log_params({"metric": metric, "runs": len(results)})
            for file in files:
                mlflow.log_artifact(str(file))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="the MLflow store, e.g. sqlite:///runs/x/mlflow.db")
    parser.add_argument("--experiment", default="tada-dist")
    parser.add_argument("--output", default="report", help="folder for report.md, report.csv, runs.csv, report.png")
    parser.add_argument("--metric", default="target_acc")
    parser.add_argument("--title")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to a summary run")
    args = parser.parse_args(argv)
    try:
        lines = write_report(args.tracking_uri, args.experiment, Path(args.output), metric=args.metric,
                             title=args.title, log=not args.no_log)
    except ValueError as error:
        return fail(PROG, error)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
