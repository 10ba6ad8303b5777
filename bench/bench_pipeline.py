"""Throughput of tada-train against what a user would run instead, on the same model, data and batch.

    python bench/bench_pipeline.py --data-root data/digits --steps 300

For each backbone (the textbook LeNet of the digits config, and the small CNN), method (source_only,
tada) and process count (1, 2), three ways of training the same model for the same steps:

    (a) tada-train as users run it: the digits config (DALI or the in-memory cache, DeepSpeed, MLflow,
        checkpoints at the end), launch/local.sh for two processes; images/s is the median of the
        rates it logs (the first window, with start-up effects, left out)
    (b) bench/plain_loop.py --data dataloader: a plain PyTorch loop over torchvision ImageFolder +
        DataLoader with the same transforms, the way tllib's examples do it (DDP for two processes)
    (c) bench/plain_loop.py --data memory --retain-host-memory: the same loop over tensors decoded in
        memory, in the channels-last layout tada-train uses, with freed host memory kept in the process
        as tada-train keeps it (train.retain_host_memory): the bound

and the ratios a/b (goal >= 1.0) and a/c (goal >= 0.9). The speed of these small CPU steps drifts by
tens of percent over minutes on a shared machine, so each row runs a, b and c in turn --repeats times
and reports the medians: drift then hits the three ways alike. Writes a markdown report and a CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from report import write_report

from tada_dist.jobs import REPO, Job, job_environment

SMALL_CNN = ["model.backbone=small_cnn", "model.pooling=avg", "model.bottleneck_layers=1", "model.bottleneck_dim=256",
             "model.classifier_layers=0", "model.global_hidden=1024", "model.global_layers=2", "model.region_hidden=64"]
BACKBONES = {"lenet": [], "small_cnn": SMALL_CNN}


def plain_loop(args, data: str, processes: int, overrides: list[str]) -> float:
    script = [str(REPO / "bench" / "plain_loop.py"), "--config", args.config, "--data", data,
              "--steps", str(args.steps), "--warmup", str(args.warmup),
              *(["--retain-host-memory"] if data == "memory" else []), *overrides]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *script]
    print("+", shlex.join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=job_environment(OMP_NUM_THREADS=str(
        max(1, args.threads // processes))))
    if result.returncode != 0:
        sys.exit(f"bench_pipeline.py: {shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_sec"]


def tada_train(args, name: str, processes: int, overrides: list[str]) -> float:
    output = Path(args.output).resolve()
    job = Job(output / name, output / "mlflow.db", args.config,
              [*overrides, f"train.steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
               "train.eval_every=0", "checkpoint.every=0", "checkpoint.resume=false"],
              processes=processes, env={"OMP_NUM_THREADS": str(max(1, args.threads // processes))})
    print("+", shlex.join(job.command()), flush=True)
    log = output / "logs" / f"{name}.log"
    if job.run(log) != 0:
        sys.exit(f"bench_pipeline.py: tada-train failed; see {log}")
    windows = [value for step, value in job.history("images_per_sec") if step > args.warmup]
    return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="the folder holding mnist/ and mnist_m/")
    parser.add_argument("--config", default="configs/digits/mnist_to_mnistm.yaml")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=50, help="steps before the timing starts")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way per row, taken in turn")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per machine, split over processes")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--methods", nargs="+", default=["source_only", "tada"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--output", default="runs/bench_pipeline")
    parser.add_argument("--report", default="bench/results/pipeline_cpu.md")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run of every way")
    args = parser.parse_args()
    # The output folder is this benchmark's scratch space: emptied first, so that every run starts fresh
    # and its MLflow store holds this invocation's runs only.
    shutil.rmtree(args.output, ignore_errors=True)

    rows = []
    for backbone in args.backbones:
        for method in args.methods:
            for processes in args.processes:
                overrides = [f"data.root={Path(args.data_root).resolve()}", f"method={method}",
                             *BACKBONES[backbone], *args.overrides]
                runs = {"tada_train": [], "dataloader": [], "memory": []}
                for repeat in range(args.repeats):
                    name = f"{backbone}-{method}-{processes}proc-{repeat}"
                    runs["tada_train"].append(tada_train(args, name, processes, overrides))
                    runs["dataloader"].append(plain_loop(args, "dataloader", processes, overrides))
                    runs["memory"].append(plain_loop(args, "memory", processes, overrides))
                a, b, c = (statistics.median(runs[way]) for way in ("tada_train", "dataloader", "memory"))
                rows.append(dict(backbone=backbone, method=method, processes=processes, tada_train=a,
                                 dataloader=b, memory=c, a_over_b=a / b, a_over_c=a / c,
                                 **{f"{way}_runs": " ".join(f"{value:.0f}" for value in values)
                                    for way, values in runs.items()}))
                print(json.dumps(rows[-1]), flush=True)

    csv_path = Path(args.report).with_suffix(".csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    goal = lambda ok: "yes" if ok else "no"  # noqa: E731
    lines = [
        "# Training pipeline throughput on the CPU", "",
        f"`{args.config}` (data.root {args.data_root}), {args.steps} timed steps after {args.warmup} warm-up steps, "
        f"{args.threads} torch threads split over the processes. images/s counts source and target images "
        "through the network, over all processes. (a) tada-train as users run it, (b) a plain PyTorch loop "
        "over torchvision ImageFolder + DataLoader (2 workers, the same transforms, PyTorch's default NCHW layout), "
        "(c) the same loop over tensors decoded in memory, channels-last like tada-train, with freed host memory "
        f"kept in the process as tada-train keeps it. Each figure is the median of {args.repeats} runs, the three "
        "ways taken in turn (every run is in the CSV). Goals: a/b >= 1.0 and a/c >= 0.9.", "",
        "| backbone | method | processes | (a) tada-train | (b) DataLoader loop | (c) in-memory loop | a/b | a/c "
        "| goals met |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['backbone']} | {r['method']} | {r['processes']} | {r['tada_train']:.0f} | {r['dataloader']:.0f} "
          f"| {r['memory']:.0f} | {r['a_over_b']:.2f} | {r['a_over_c']:.2f} "
          f"| {goal(r['a_over_b'] >= 1.0 and r['a_over_c'] >= 0.9)} |" for r in rows], "",
        f"Rows also in [{csv_path.name}]({csv_path.name}).", "",
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
