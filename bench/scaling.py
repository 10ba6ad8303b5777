"""Weak scaling: training throughput with 1, 2, 4, ... processes at a fixed per-process batch.

    python bench/scaling.py --processes 1 2 4 --steps 150

Each point is a real `launch/local.sh` run (DALI, DeepSpeed, gloo all-reduce, MLflow) on the
generated dataset. Throughput is the median of the images/s the run logged every `--log-every`
steps, leaving out the first window (start-up); efficiency is images/s per process relative to one
process. Every process gets one thread, so on a machine with fewer cores than processes the extra
processes share cores and the efficiency shows it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

from report import write_report

from tada_dist.jobs import Job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--output", default="runs/bench_scaling")
    parser.add_argument("--report", default="bench/results/scaling_cpu.md")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run (key=value)")
    args = parser.parse_args()

    output = Path(args.output).resolve()
    rows = []
    for processes in args.processes:
        job = Job(output / f"np{processes}", output / "mlflow.db", args.config,
                  [f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.eval_every=0",
                   "checkpoint.every=0", "checkpoint.resume=false", *args.overrides], processes=processes)
        log = output / "logs" / f"np{processes}.log"
        print(f"{processes} processes: {shlex.join(job.command())}", flush=True)
        if job.run(log) != 0:
            sys.exit(f"scaling.py: the run with {processes} processes failed; see {log}")
        windows = [value for _, value in job.history("images_per_sec")[1:]]
        rows.append((processes, statistics.median(windows), len(windows)))

    base = rows[0][1] / rows[0][0]
    lines = [
        "# Weak scaling on the CPU", "",
        f"`{args.config}` on the generated dataset, {args.steps} steps per run, the per-process batch fixed "
        "by the config (32 source + 32 target images), one torch thread per process (OMP_NUM_THREADS=1; "
        "DALI keeps its data.num_threads workers). These are CPU figures: they measure the data pipeline, "
        "DeepSpeed and the gloo all-reduce on this machine, not GPU scaling; with more processes than "
        f"cores ({os.cpu_count()} here) the processes share cores.", "",
        "| processes | images/s (median over windows) | windows | images/s per process | efficiency |",
        "|---|---|---|---|---|",
        *[f"| {n} | {ips:.0f} | {count} | {ips / n:.0f} | {ips / n / base:.0%} |" for n, ips, count in rows], "",
    ]
    write_report(args.report, lines)

if __name__ == "__main__":
    main()
