"""Training jobs driven by another program: the benchmarks and the end-to-end tests share this harness.

A Job is one real run, `launch/local.sh CONFIG ...` with N processes (or plain `python -m
tada_dist.train` for one), writing into its own folder and an sqlite MLflow store. It starts in the
background in a session of its own with its output in a log file, and can be waited on, signalled
and read back: checkpoints, the MLflow run's status and each metric's history.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tada_dist import checkpoint

REPO = Path(__file__).resolve().parents[1]
LOCAL_LAUNCHER = REPO / "launch" / "local.sh"


def job_environment(**extra: str) -> dict[str, str]:
    """The environment of a job: this interpreter and checkout, one torch thread per process (jobs
    share the machine's cores), no tracking URI inherited from the caller."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable  # for launch/*.sh
    env.update(extra)
    return env


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in the background in a session of its own, appending its output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd)


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str,
             process: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds; fail when `process` ends first or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def finish(process: subprocess.Popen, log: Path, *, timeout: float = 1800) -> tuple[int, str]:
    """Wait for a started job; (exit code, its log). A job past `timeout` is killed with its processes."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return code, log.read_text(errors="replace")


def metric_history(db: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) of metric `key` of an MLflow run, in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@dataclass
class Job:
    """One run writing into `run_dir` and MLflow at `db`; processes > 1 goes through launch/local.sh."""

    run_dir: Path
    db: Path
    config: str | Path
    overrides: list[str]
    processes: int = 2
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    def command(self) -> list[str]:
        run = [f"output_dir={self.run_dir}", f"tracking.uri=sqlite:///{self.db}", *self.overrides]
        if self.processes == 1:
            return [sys.executable, "-m", "tada_dist.train", "--config", str(self.config), *run]
        return [str(LOCAL_LAUNCHER), str(self.config), *run]

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        return job_environment(NPROC_PER_NODE=str(self.processes), **self.env, **extra)

    def start(self, log: Path, **extra_env: str) -> subprocess.Popen:
        """Start in the background, appending stdout and stderr to `log`."""
        return start(self.command(), log, self.environment(extra_env), self.cwd)

    def run(self, log: Path, *, timeout: float = 1800, **extra_env: str) -> int:
        return finish(self.start(log, **extra_env), log, timeout=timeout)[0]

    def latest_checkpoint_step(self) -> int:
        return checkpoint.latest_step(self.run_dir)

    def states_file(self, step: int) -> Path:
        return checkpoint.checkpoint_dir(self.run_dir) / checkpoint.step_tag(step) / checkpoint.MODEL_STATES_FILE

    def wait_for_checkpoint(self, step: int, process: subprocess.Popen, timeout: float = 1800) -> None:
        try:
            wait_for(lambda: self.latest_checkpoint_step() >= step, timeout=timeout,
                     what=f"the checkpoint of step {step} in {self.run_dir}", process=process)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            raise

    def mlflow_run(self):
        """The one MLflow run that logged into run_dir."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.db}")
        experiment = client.get_experiment_by_name("tada-dist")
        runs = [] if experiment is None else [
            r for r in client.search_runs([experiment.experiment_id]) if r.data.params.get("output_dir") == str(self.run_dir)
        ]
        if len(runs) != 1:
            raise RuntimeError(f"{len(runs)} MLflow runs write to {self.run_dir}, expected one")
        return runs[0]

    def history(self, key: str) -> list[tuple[int, float]]:
        """Every (step, value) of metric `key` in the run's MLflow record, in step order."""
        return metric_history(self.db, self.mlflow_run().info.run_id, key)

    def status(self) -> str:
        return self.mlflow_run().info.status
