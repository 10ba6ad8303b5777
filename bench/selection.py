"""Do the label-free selection scores pick good checkpoints? Measured on the checkpoints runs kept.

    python bench/selection.py --runs runs/bench_mnist_to_mnistm --report bench/results/selection_digits.md

For every run folder under --runs and every complete checkpoint it kept (checkpoint.keep, the last
ones of the run), the target accuracy and the scores of tada_dist.selection that need no label
(entropy, IM, SND; DEV needs a held-out source split, which these runs did not keep). For each run
and score: the checkpoint the score picks, its accuracy, and the regret (best accuracy among the
checkpoints minus the pick's). The summary gives each score's mean regret and how often it picked
the best checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from report import write_report

from tada_dist import checkpoint
from tada_dist.build import create_evaluation_loader, model_from_config, resolve_domains
from tada_dist.config import load_saved_config
from tada_dist.distributed import init_distributed
from tada_dist.evaluation import evaluate
from tada_dist.selection import HIGHER_IS_BETTER, Pick, picks, target_scores


def score_checkpoints(run_dir: Path, dist_info) -> list[dict]:
    config = load_saved_config(run_dir / "config.yaml")
    source, target = resolve_domains(config, dist_info)
    loader = create_evaluation_loader(config, target, dist_info)
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    history = []
    for tag in sorted(checkpoint.complete_tags(ckpt_dir)):
        if checkpoint.verify(ckpt_dir / tag) is not None:
            continue
        weights, step = checkpoint.module_weights(ckpt_dir / tag)
        model = model_from_config(config, len(source.classes), load_pretrained=False)
        model.load_state_dict(weights)
        accuracy, predictions = evaluate(model, loader, len(source.classes), device=dist_info.device,
                                         dtype=torch.float32, keep_predictions=True)
        history.append({"step": step, "target_acc": accuracy.overall,
                        **target_scores(predictions.logits)})
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="folders holding finished run folders (or run folders); unfinished runs are left out")
    parser.add_argument("--report", default="bench/results/selection_digits.md")
    parser.add_argument("--title", default="Label-free checkpoint selection on the digits runs")
    args = parser.parse_args()

    dist_info = init_distributed("auto")
    run_dirs = sorted({p.parent for folder in args.runs for p in Path(folder).glob("**/config.yaml")
                       if (p.parent / "checkpoints").is_dir() and (p.parent / "metrics.json").is_file()})
    scores = [name for name in HIGHER_IS_BETTER if name != "dev"]
    # "last" is what a user does without any score: keep the final checkpoint; a score earns its place
    # only where it beats that.
    columns = [*scores, "last"]
    labels = {**{s: f"{s} ({'higher' if HIGHER_IS_BETTER[s] else 'lower'} is better)" for s in scores},
              "last": "last (no score: the final checkpoint)"}
    rows, regrets, hits = [], {s: [] for s in columns}, {s: 0 for s in columns}
    for run_dir in run_dirs:
        history = score_checkpoints(run_dir, dist_info)
        if len(history) < 2:
            continue
        chosen = picks(history)
        chosen["last"] = Pick("last", history[-1]["step"], history[-1]["target_acc"])
        best = chosen["oracle"].accuracy
        cells = []
        for score in columns:
            pick = chosen[score]
            regrets[score].append(best - pick.accuracy)
            hits[score] += pick.accuracy == best
            cells.append(f"{pick.step} ({pick.accuracy:.2f})")
        steps = ", ".join(f"{e['step']}: {e['target_acc']:.2f}" for e in history)
        rows.append(f"| {run_dir.parent.name}/{run_dir.name} | {steps} | {chosen['oracle'].step} ({best:.2f}) | "
                    + " | ".join(cells) + " |")
    lines = [
        f"# {args.title}", "",
        "Each run's kept checkpoints, scored on its whole target domain. A cell is the checkpoint (step) a score "
        "picks and that checkpoint's target accuracy; best: the oracle, which reads the target labels.", "",
        "| run | target accuracy at each kept step | best | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns), *rows, "",
        "| score | mean regret (accuracy points below the best) | picked the best |", "|---|---|---|",
        *[f"| {labels[s]} | {statistics.mean(regrets[s]):.2f} | {hits[s]} of {len(rows)} runs |"
          for s in columns if regrets[s]], "",
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
