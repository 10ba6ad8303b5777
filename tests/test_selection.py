"""Model-selection scores against hand computations on small fixed inputs."""

import math

import pytest
import torch

from tada_dist.selection import (
    dev_risk,
    deep_embedded_validation,
    information_maximisation,
    mean_entropy,
    picks,
    soft_neighbourhood_density,
)

LN2 = math.log(2.0)


def h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


LOGITS = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2) and (3/4, 1/4)


def test_mean_entropy_and_information_maximisation_by_hand():
    assert mean_entropy(LOGITS) == pytest.approx((LN2 + h(0.75, 0.25)) / 2, rel=1e-6)
    marginal = h(0.625, 0.375)  # the mean prediction
    assert information_maximisation(LOGITS) == pytest.approx(marginal - (LN2 + h(0.75, 0.25)) / 2, rel=1e-6)
    # Confident and diverse predictions score higher than uncertain ones.
    assert information_maximisation(torch.tensor([[9.0, 0.0], [0.0, 9.0]])) > information_maximisation(LOGITS)


def test_soft_neighbourhood_density_by_hand():
    # Two samples of class 0 and one of class 1, with one-hot predictions: each class-0 sample's
    # neighbours are (the other class-0 sample, the class-1 sample) with similarities (1, 0) / 0.05;
    # the class-1 sample is equally far from both.
    logits = torch.tensor([[100.0, -100.0], [100.0, -100.0], [-100.0, 100.0]])
    near = 1 / (1 + math.exp(-20.0))
    expected = (2 * h(near, 1 - near) + LN2) / 3
    assert soft_neighbourhood_density(logits) == pytest.approx(expected, rel=1e-5)


def test_dev_risk_control_variate_by_hand():
    # w = (1, 2, 3), loss 1 everywhere: Cov(wL, w) = Var(w) = 1, eta = -1, risk = 2 - 2 + 1 = 1,
    # the true loss, where the plain weighted mean would say 2.
    assert dev_risk(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3)) == pytest.approx(1.0)
    assert dev_risk(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 3.0])) == pytest.approx(4.0)  # Var(w) = 0: plain mean


def test_dev_weights_source_images_by_how_target_like_they_are():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(400, 2, generator=g)
    target = torch.randn(400, 2, generator=g) + torch.tensor([2.0, 0.0])
    validation = torch.tensor([[-1.0, 0.0], [3.0, 0.0]])  # far from the target, and inside it
    # A loss only on the target-like image counts far more than one only on the source-like image.
    target_like_loss = deep_embedded_validation(validation, torch.tensor([0.0, 1.0]), source, target)
    source_like_loss = deep_embedded_validation(validation, torch.tensor([1.0, 0.0]), source, target)
    assert target_like_loss > 5 * source_like_loss


def test_picks_by_each_score_and_the_oracle():
    history = [
        {"step": 100, "target_acc": 60.0, "entropy": 0.5, "im": 1.0, "snd": 3.0},
        {"step": 200, "target_acc": 70.0, "entropy": 0.3, "im": 0.9, "snd": 2.0},
        {"step": 300, "target_acc": 65.0, "entropy": 0.4, "im": 1.2, "snd": 1.0},
    ]
    chosen = picks(history)
    assert (chosen["oracle"].step, chosen["oracle"].accuracy) == (200, 70.0)
    assert chosen["entropy"].step == 200 and chosen["im"].step == 300 and chosen["snd"].step == 100
    assert "dev" not in chosen  # no evaluation has it
