"""What a run learned: attention maps, t-SNE, A-distance, confusion matrix, selection scores and the
MLflow model, from real short runs against a real sqlite MLflow store; the pieces on fixed inputs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from e2e import metric_history, run, train_overrides
from PIL import Image

from tada_dist import analysis
from tada_dist.data import Domain
from tada_dist.data.synthetic import ensure_synthetic_dataset


def test_proxy_a_distance_is_two_for_separable_domains_and_near_zero_for_one_domain():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(400, 4, generator=g)
    assert analysis.proxy_a_distance(source, source + 10.0) == pytest.approx(2.0)
    assert abs(analysis.proxy_a_distance(source, torch.randn(400, 4, generator=g))) < 0.4


def test_confusion_matrix_by_hand(tmp_path):
    counts = analysis.confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    files = analysis.write_confusion(counts, ["a", "b", "c"], title="t", folder=tmp_path)
    assert (tmp_path / "per_class_accuracy.csv").read_text().splitlines()[1:] == [
        "a,2,1,50.00", "b,1,1,100.00", "c,2,1,50.00"]
    with Image.open(files[0]) as image:
        image.verify()


def test_shown_images_are_the_same_for_a_domain_whatever_else_changes():
    domain = Domain("d", [f"f{i}.png" for i in range(50)], [i % 5 for i in range(50)], list("abcde"))
    chosen = analysis.shown_images(domain, 6)
    assert chosen == analysis.shown_images(domain, 6) and len(set(chosen)) == 6
    assert analysis.shown_images(domain, 80) == list(range(50))


def test_the_held_out_source_images_are_the_same_in_every_run():
    from tada_dist.build import split_holdout

    domain = Domain("d", [f"/data/d/{c}/{i}.png" for c in "abc" for i in range(200)], [k // 200 for k in range(600)],
                    list("abc"))
    train, held = split_holdout(domain, 0.1)
    again, held_again = split_holdout(Domain(domain.name, list(domain.files), domain.labels, domain.classes), 0.1)
    assert held.files == held_again.files and 30 < len(held.files) < 90
    assert sorted(train.files + held.files) == sorted(domain.files) and set(train.files).isdisjoint(held.files)
    assert split_holdout(domain, 0.0) == (domain, None)


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory):
    """A short TADA run with every analysis on and its model registered."""
    tmp_path = tmp_path_factory.mktemp("analysed")
    data = ensure_synthetic_dataset(tmp_path / "data", images_per_class=9, seed=3)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [*train_overrides(data, run_dir, db, steps=4, every=2, analysis=True), "analysis.attention_images=3",
                 "tracking.register_model=tada-digits", "data.source_holdout=0.2"]
    run([sys.executable, "-m", "tada_dist.train", *overrides], tmp_path)
    return tmp_path, run_dir, db, json.loads((run_dir / "metrics.json").read_text())


def test_artifacts_are_valid_images_of_the_expected_size(analysed_run):
    from mlflow.tracking import MlflowClient

    _, run_dir, db, metrics = analysed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    attention = {Path(a.path).name for a in client.list_artifacts(metrics["mlflow_run_id"], "attention")}
    assert attention == {f"attention_{role}_step{step:08d}.png" for role in ("source", "target") for step in (2, 4)}
    finals = {Path(a.path).name for a in client.list_artifacts(metrics["mlflow_run_id"], "analysis")}
    assert finals == {"tsne.png", "confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.csv"}
    expected = {"attention_target_step00000004.png": (int(3 * 1.6 * 100), int((1.6 * 3 + 0.5) * 100)),
                "tsne.png": (1000, 500)}
    for name, size in expected.items():
        with Image.open(run_dir / "analysis" / name) as image:
            assert image.size == size and image.mode == "RGBA"
            image.load()  # decodes the whole file


def test_selection_scores_are_logged_per_evaluation_and_the_picks_match_them(analysed_run):
    _, _, db, metrics = analysed_run
    run_id = metrics["mlflow_run_id"]
    accuracy = dict(metric_history(db, run_id, "target_acc"))
    assert sorted(accuracy) == [2, 4]
    for score in ("entropy", "im", "snd", "dev"):  # dev: data.source_holdout held images out
        assert [step for step, _ in metric_history(db, run_id, f"selection/{score}")] == [2, 4], score
    for name, pick in metrics["selection"].items():
        assert pick["target_acc"] == pytest.approx(accuracy[pick["step"]]), name
    entropy = dict(metric_history(db, run_id, "selection/entropy"))
    assert metrics["selection"]["entropy"]["step"] == min(entropy, key=entropy.get)
    assert metrics["selection"]["oracle"]["target_acc"] == pytest.approx(max(accuracy.values()))
    [(_, a_distance)] = metric_history(db, run_id, "a_distance")
    assert a_distance == pytest.approx(metrics["a_distance"]) and -2.0 <= a_distance <= 2.0


def test_the_logged_model_evaluates_like_its_checkpoint(analysed_run):
    tmp_path, run_dir, db, metrics = analysed_run
    uri = f"sqlite:///{db}"

    def evaluate(*source: str) -> dict:
        result = run([sys.executable, "-m", "tada_dist.evaluate", *source, "--json"], tmp_path)
        return json.loads(result.stdout)

    from_checkpoint = evaluate("--checkpoint", str(run_dir))
    for model in (f"runs:/{metrics['mlflow_run_id']}/model", "models:/tada-digits/1"):
        assert evaluate("--model", model, "--tracking-uri", uri)["accuracy"] == pytest.approx(from_checkpoint["accuracy"])
    failed = run([sys.executable, "-m", "tada_dist.evaluate", "--model", "models:/absent/1", "--tracking-uri", uri],
                 tmp_path, expect=2)
    assert failed.stderr.strip().splitlines()[-1].startswith("tada-eval: error: cannot load MLflow model models:/absent/1")


def test_eval_draws_attention_and_features_for_a_finished_run(analysed_run):
    tmp_path, run_dir, _, _ = analysed_run
    result = run([sys.executable, "-m", "tada_dist.evaluate", "--checkpoint", str(run_dir), "--attention", "2",
                  "--features", "--out", str(tmp_path / "eval"), "--json"], tmp_path)
    report = json.loads(result.stdout)
    assert -2.0 <= report["a_distance"] <= 2.0
    for path in (*report["attention"], report["tsne"]):
        with Image.open(path) as image:
            image.load()
    with Image.open(tmp_path / "eval" / "attention_source.png") as image:
        assert image.size == (int(2 * 1.6 * 100), int((1.6 * 3 + 0.5) * 100))
