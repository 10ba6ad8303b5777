"""tada-sweep and tada-report: a real small sweep into a real sqlite MLflow store, and its table."""

import csv
import json
import sys

import pytest
import yaml
from e2e import REPO, run, train_overrides
from PIL import Image

from tada_dist.data.synthetic import ensure_synthetic_dataset
from tada_dist.report import RunResult, markdown, table
from tada_dist.sweep import Sweep, SweepError, Variant


def test_table_cells_are_means_and_stds_over_seeds_and_the_average_of_task_means():
    results = [RunResult("a", "dann", "0", 60.0, "r1"), RunResult("a", "dann", "1", 70.0, "r2"),
               RunResult("b", "dann", "0", 40.0, "r3"), RunResult("a", "tada", "0", 75.0, "r4")]
    variants, tasks, cells = table(results, variant_order=["tada", "dann"])
    assert variants == ["tada", "dann"] and tasks == ["a", "b"]
    assert table(results, variant_order=["dann", "dann", "tada", "dann"])[0] == ["dann", "tada"]  # one row each
    assert cells[("dann", "a")] == pytest.approx((65.0, 7.0710678, 2))
    assert cells[("dann", "average")][0] == pytest.approx((65.0 + 40.0) / 2)
    assert cells[("tada", "average")][0] == 75.0 and ("tada", "b") not in cells
    lines = markdown(variants, tasks, cells, metric="target_acc")
    assert lines[0] == "| method | a | b | average |"
    assert lines[3] == "| dann | 65.00 ± 7.07 (2) | 40.00 (1) | 52.50 |"


def test_sweep_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: c.yaml\nmethods: [tada]\nsteps: 3\n")
    with pytest.raises(SweepError, match="unknown key\\(s\\) steps"):
        Sweep.load(bad)
    bad.write_text("methods: [tada]\n")
    with pytest.raises(SweepError, match="has no 'config'"):
        Sweep.load(bad)
    with pytest.raises(SweepError, match="seeds after @ must be integers"):
        Variant.parse("tada@x", [0])
    assert Variant.parse("tada+model.attention=uncertainty@1,2", [0]) == Variant(
        "tada+model.attention=uncertainty", "tada", ("model.attention=uncertainty",), (1, 2))


def test_a_sweep_trains_every_run_once_and_its_report_equals_the_runs(tmp_path):
    data = ensure_synthetic_dataset(tmp_path / "data", images_per_class=9, seed=4)
    tiny = dict(item.split("=", 1) for item in train_overrides(data, tmp_path / "x", tmp_path / "x.db", steps=2)
                if not item.startswith(("output_dir", "tracking.uri", "data.root")))
    sweep_file = tmp_path / "small.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "config": str(REPO / "configs" / "default.yaml"),
        "tasks": {"forward": {}, "backward": {"data.source": "target", "data.target": "source"}},
        "methods": ["source_only", "tada+model.attention=uncertainty@0"], "seeds": [0, 1],
        "overrides": {"data.root": str(data), **tiny}, "output": str(tmp_path / "sweep"),
    }, sort_keys=False))

    first = run([sys.executable, "-m", "tada_dist.sweep", str(sweep_file)], tmp_path)
    runs = sorted((tmp_path / "sweep").glob("*/*/metrics.json"))
    assert len(runs) == 2 * 3  # 2 tasks x (2 seeds of source_only + 1 of the tada variant)
    accuracies = {}
    for path in runs:
        metrics = json.loads(path.read_text())
        accuracies.setdefault((path.parts[-3], path.parent.name.rsplit("-seed", 1)[0]), []).append(metrics["target_acc"])
    with open(tmp_path / "sweep" / "report" / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    for (task, folder), values in accuracies.items():
        method = "source_only" if folder == "source_only" else "tada+model.attention=uncertainty"
        assert float(rows[method][f"{task}_mean"]) == pytest.approx(sum(values) / len(values), abs=1e-4)
        assert int(rows[method][f"{task}_runs"]) == len(values)
    assert "| method | forward | backward | average |" in first.stdout
    with Image.open(tmp_path / "sweep" / "report" / "report.png") as image:
        image.load()

    again = run([sys.executable, "-m", "tada_dist.sweep", str(sweep_file)], tmp_path)
    assert again.stdout.count("finished earlier") == 6
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("small")
    reports = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'report'")
    assert len(reports) == 2  # one per sweep call; each report leaves the earlier report runs out
    artifacts = {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    assert artifacts == {"report.md", "report.csv", "runs.csv", "report.png"}
    again_rows = list(csv.DictReader(open(tmp_path / "sweep" / "report" / "report.csv")))
    assert [row["method"] for row in again_rows] == ["source_only", "tada+model.attention=uncertainty"]
    report = run([sys.executable, "-m", "tada_dist.report", "--tracking-uri", f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}",
                  "--experiment", "small", "--output", str(tmp_path / "r"), "--no-log"], tmp_path)
    assert "| source_only |" in report.stdout
    missing = run([sys.executable, "-m", "tada_dist.report", "--tracking-uri", f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}",
                   "--experiment", "absent"], tmp_path, expect=2)
    assert "no experiment 'absent'" in missing.stderr
