"""MLflow tracking, from rank 0 only.

Several processes creating one sqlite database at once corrupt it, so only rank 0 ever opens it;
every other rank gets a tracker whose methods do nothing. A resumed run passes the run id saved in
its checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DB_NAME = "mlflow.db"


def resolve_tracking_uri(configured: str | None, output_dir: Path) -> str:
    """`tracking.uri` wins, then MLFLOW_TRACKING_URI, then a sqlite file beside the output directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(output_dir.resolve().parent / DEFAULT_DB_NAME)}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on `uri`, runnable as printed: it names the mlflow program
    installed beside this Python (relative to the current folder when it lies below it, as .venv/bin does)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    try:
        shown = f"./{mlflow.relative_to(Path.cwd())}" if mlflow.is_relative_to(Path.cwd()) else str(mlflow)
    except ValueError:
        shown = str(mlflow)
    return f"{shown} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database, not into the current directory's ./mlruns."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    """Logs params, metrics and artifacts of one training run; inactive off rank 0 or when disabled.

    Metrics reach the store in batches, at most every FLUSH_SECONDS, and whenever flush() is called
    (the trainer calls it before every checkpoint, and finish() calls it): each write to the store
    costs milliseconds of the logging thread's CPU (SQLite through SQLAlchemy, about 9 ms on two busy
    CPU cores), which a step of a few milliseconds shares when it is paid at every log interval."""

    FLUSH_SECONDS = 5.0

    def __init__(self, *, active: bool, uri: str, experiment: str):
        self.active = active
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        # Per metric, the last step already in the run: a resumed run replays the steps after its
        # checkpoint, and those must not be logged twice.
        self._logged_through: dict[str, int] = {}
        self._pending: list = []  # mlflow Metric rows not yet handed to the store
        self._flushed_at = time.monotonic()

    def start(self, *, run_id: str | None, run_name: str | None, system_metrics: bool, tags: dict[str, Any]) -> None:
        """Open a new run, or reopen `run_id` when resuming."""
        if not self.active:
            return
        import mlflow

        if os.environ.get("TADA_DIST_VERBOSE") != "1":  # not "Creating initial MLflow database tables..."
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(self.uri)
        if mlflow.get_experiment_by_name(self.experiment) is None:
            mlflow.create_experiment(self.experiment, artifact_location=_artifact_root(self.uri))
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        if run_id is not None:
            client = mlflow.tracking.MlflowClient()
            self._logged_through = {
                key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics
            }
        mlflow.set_tags({"git_commit": _git_commit(), **{k: str(v) for k, v in tags.items()}})

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.log_params({key: "None" if value is None else value for key, value in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), timestamp, step) for key, value in metrics.items()
                          if step > self._logged_through.get(key, -1)]
        if time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand the pending metrics to the store in one batch. It is queued to MLflow's logging thread:
        the training loop does not wait for the write, and end_run writes out what is queued. Metrics
        lost with a killed process come after its last checkpoint (flushed before it was saved), and
        the resumed run logs those steps again."""
        self._flushed_at = time.monotonic()
        if not (self.active and self._pending):
            return
        from mlflow.tracking import MlflowClient

        MlflowClient(self.uri).log_batch(self.run_id, metrics=self._pending, synchronous=False)
        self._pending = []

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=folder)

    def log_model(self, model, config_file: Path, classes: list[str], *, register_as: str | None = None) -> None:
        """The trained model as the run's MLflow model "model", with the run's config.yaml and its class
        names beside it, so that `tada-eval --model runs:/<run id>/model` (or models:/<name>/<version>
        when registered) evaluates it without the run's folder."""
        if not self.active:
            return
        import json
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as folder:
            names = Path(folder) / "classes.json"
            names.write_text(json.dumps(classes))
            # Pickled, not traced: TADA's forward takes two batches and returns a dict. The requirement
            # is named here rather than inferred, which would re-import the model in a subprocess.
            import torch

            mlflow.pytorch.log_model(model, name="model", extra_files=[str(config_file), str(names)],
                                     registered_model_name=register_as, serialization_format="pickle",
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "tada-dist"])

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run; status is FINISHED, FAILED or KILLED."""
        if not self.active or self.run_id is None:
            return
        import mlflow

        self.flush()
        mlflow.end_run(status=status)
        self.run_id = None
