"""Scores that pick a checkpoint without target labels (unsupervised model selection).

An adapted model is usually chosen by its target accuracy, which a real user cannot measure: the
target is unlabelled. These scores need no target label; the trainer logs them at each evaluation
beside the target accuracy (which it can measure only because the benchmarks are labelled), and
the run's summary says which evaluation each score would pick and how good that pick really is.

- entropy: mean prediction entropy on the target (lower is better; Grandvalet & Bengio 2005).
- im: information maximisation, H(mean prediction) - mean H(prediction) on the target (higher is
  better): confident and diverse predictions (the objective of SHOT, Liang et al. 2020).
- snd: soft neighbourhood density (Saito et al., ICCV 2021): the entropy of each target sample's
  softmax-weighted similarity to the other target samples, on L2-normalised class probabilities with
  temperature 0.05 (higher is better: dense neighbourhoods).
- dev: deep embedded validation (You et al., ICML 2019): the source validation loss of held-out
  source images, importance-weighted by a domain classifier's density ratio, with its control variate
  (lower is better). It needs a held-out source split (data.source_holdout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SND_TEMPERATURE = 0.05
SND_MAX_SAMPLES = 2000  # the similarity matrix is n x n; a fixed subset keeps it small

# For each score: whether a larger value is better.
HIGHER_IS_BETTER = {"entropy": False, "im": True, "snd": True, "dev": False}


# The scores are computed in float64: they compare evaluations by small differences.


def mean_entropy(logits: torch.Tensor) -> float:
    log_p = logits.double().log_softmax(dim=1)
    return float(-(log_p.exp() * log_p).sum(dim=1).mean())


def information_maximisation(logits: torch.Tensor) -> float:
    p = logits.double().softmax(dim=1)
    mean_p = p.mean(dim=0)
    marginal_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return float(marginal_entropy) - mean_entropy(logits)


def soft_neighbourhood_density(logits: torch.Tensor, temperature: float = SND_TEMPERATURE) -> float:
    p = F.normalize(logits.double().softmax(dim=1), dim=1)
    similarity = p @ p.t() / temperature
    similarity.fill_diagonal_(float("-inf"))  # a sample is not its own neighbour
    neighbours = similarity.softmax(dim=1)
    return float(-(neighbours * neighbours.clamp_min(1e-12).log()).sum(dim=1).mean())


def density_ratio(source_train_features: torch.Tensor, target_features: torch.Tensor,
                  query_features: torch.Tensor) -> torch.Tensor:
    """p_target(x) / p_source(x) at each query, from a logistic domain classifier on the features."""
    from sklearn.linear_model import LogisticRegression

    features = torch.cat([source_train_features, target_features]).float().numpy()
    domains = [0] * len(source_train_features) + [1] * len(target_features)
    classifier = LogisticRegression(max_iter=1000).fit(features, domains)
    p_target = torch.from_numpy(classifier.predict_proba(query_features.float().numpy())[:, 1]).double()
    return len(source_train_features) / len(target_features) * p_target / (1 - p_target).clamp_min(1e-12)


def dev_risk(weights: torch.Tensor, losses: torch.Tensor) -> float:
    """mean(w * loss) corrected by the control variate eta = -Cov(w * loss, w) / Var(w), as
    mean(w * loss) + eta * mean(w) - eta (the mean of w is 1 in expectation)."""
    weights, weighted = weights.double(), weights.double() * losses.double()
    variance = weights.var(unbiased=True)
    eta = 0.0 if variance == 0 else float(-torch.cov(torch.stack([weighted, weights]))[0, 1] / variance)
    return float(weighted.mean() + eta * weights.mean() - eta)


def deep_embedded_validation(source_val_features: torch.Tensor, source_val_losses: torch.Tensor,
                             source_train_features: torch.Tensor, target_features: torch.Tensor) -> float:
    """DEV: the held-out source images' losses, weighted by how target-like each one is."""
    weights = density_ratio(source_train_features, target_features, source_val_features)
    return dev_risk(weights, source_val_losses)


def target_scores(logits: torch.Tensor) -> dict[str, float]:
    """The scores that need only the target predictions."""
    subset = logits[_fixed_subset(len(logits), SND_MAX_SAMPLES)]
    return {"entropy": mean_entropy(logits), "im": information_maximisation(logits),
            "snd": soft_neighbourhood_density(subset)}


def _fixed_subset(n: int, at_most: int) -> torch.Tensor:
    """The same indices at every evaluation (evenly spread), so that scores compare across evaluations."""
    if n <= at_most:
        return torch.arange(n)
    return torch.linspace(0, n - 1, at_most).round().long()


@dataclass(frozen=True)
class Pick:
    score: str
    step: int  # the evaluation the score prefers
    accuracy: float  # that evaluation's target accuracy


def picks(history: list[dict]) -> dict[str, Pick]:
    """history: one dict per evaluation with "step", "target_acc" and scores. For each score that every
    evaluation has, the evaluation it picks; "oracle" picks by target accuracy itself."""
    chosen = {"oracle": max(history, key=lambda e: e["target_acc"])}
    for score, higher in HIGHER_IS_BETTER.items():
        if history and all(score in e and not math.isnan(e[score]) for e in history):
            chosen[score] = (max if higher else min)(history, key=lambda e: e[score])
    return {score: Pick(score, e["step"], e["target_acc"]) for score, e in chosen.items()}
