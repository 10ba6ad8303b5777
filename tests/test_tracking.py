from pathlib import Path

from tada_dist.tracking import Tracker, resolve_tracking_uri


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    output_dir = tmp_path / "runs" / "a_to_b" / "tada-seed0"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, output_dir) == f"sqlite:///{tmp_path / 'runs' / 'a_to_b' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from_env.db")
    assert resolve_tracking_uri(None, output_dir) == "sqlite:///from_env.db"
    assert resolve_tracking_uri("sqlite:///from_config.db", output_dir) == "sqlite:///from_config.db"


def test_inactive_tracker_never_creates_a_store(tmp_path):
    db = tmp_path / "mlflow.db"
    tracker = Tracker(active=False, uri=f"sqlite:///{db}", experiment="x")
    tracker.start(run_id=None, run_name="r", system_metrics=False, tags={})
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert not db.exists() and tracker.run_id is None


def test_resumed_tracker_continues_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(active=True, uri=uri, experiment="exp")
    first.start(run_id=None, run_name="r", system_metrics=False, tags={"world_size": 2})
    first.log_params({"optim.lr": 0.01, "model.pretrained": None})
    first.log_metrics({"loss": 2.0}, step=1)
    first.log_metrics({"loss": 1.5, "target_acc": 50.0}, step=2)
    run_id = first.run_id
    first.finish("KILLED")

    # Resumed from a checkpoint at step 1: step 2 is replayed and must not be logged twice.
    second = Tracker(active=True, uri=uri, experiment="exp")
    second.start(run_id=run_id, run_name="ignored", system_metrics=False, tags={"world_size": 2})
    second.log_metrics({"loss": 1.25, "target_acc": 50.0}, step=2)
    second.log_metrics({"loss": 1.0}, step=3)
    second.finish()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.01", "model.pretrained": "None"}
    assert run.data.tags["world_size"] == "2"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "target_acc")] == [(2, 50.0)]
    experiment = client.get_experiment_by_name("exp")
    assert Path(experiment.artifact_location.removeprefix("file://")) == tmp_path / "mlartifacts"


def test_metrics_reach_the_store_in_batches_and_all_of_them_by_flush_and_finish(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    tracker = Tracker(active=True, uri=uri, experiment="exp")
    tracker.start(run_id=None, run_name="r", system_metrics=False, tags={})

    def stored(key: str = "loss") -> list[tuple[int, float]]:
        mlflow.flush_async_logging()  # what is handed over is queued to MLflow's logging thread
        return sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))

    monkeypatch.setattr(Tracker, "FLUSH_SECONDS", 3600.0)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert stored() == []  # within the interval, nothing is written yet
    tracker.flush()  # as before a checkpoint
    assert stored() == [(1, 1.0), (2, 0.5), (3, 1 / 3)]

    monkeypatch.setattr(Tracker, "FLUSH_SECONDS", 0.0)  # past the interval: written as it is logged
    tracker.log_metrics({"loss": 0.25}, step=4)
    assert stored()[-1] == (4, 0.25)

    monkeypatch.setattr(Tracker, "FLUSH_SECONDS", 3600.0)
    tracker.log_metrics({"loss": 0.2, "target_acc": 60.0}, step=5)
    run_id = tracker.run_id
    tracker.finish()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "target_acc")] == [(5, 60.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
