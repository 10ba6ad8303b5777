"""Helpers for the end-to-end tests: real tada-train / torchrun processes on generated data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def process_env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TADA_DIST_CACHE"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable  # for launch/*.sh
    env.update(extra)
    return env


def run(cmd: list[str], tmp_path: Path, *, expect: int = 0, timeout: int = 600, **extra_env: str
        ) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=tmp_path, env=process_env(tmp_path, **extra_env), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == expect, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}, expected {expect}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


def train_overrides(data_root: Path, run_dir: Path, db: Path, steps: int, *, every: int = 2) -> list[str]:
    """A tiny model that trains a step in a fraction of a second; log every step."""
    return [
        f"data.root={data_root}", f"output_dir={run_dir}", f"tracking.uri=sqlite:///{db}",
        f"train.steps={steps}", "train.log_every=1", f"train.eval_every={every}", f"checkpoint.every={every}",
        "data.batch_size=4", "data.eval_batch_size=16", "model.global_hidden=32", "model.region_hidden=16",
        "model.bottleneck_dim=32", "data.num_threads=1",
    ]


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tada_dist.train", *args]


def metric_history(db: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for(condition, *, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
