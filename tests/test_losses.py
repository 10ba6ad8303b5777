"""Losses (eq. 2, 5, 7, 8, 9), schedules and the gradient reversal layer against hand-computed values."""

import math

import pytest
import torch

from tada_dist.losses import (
    LossWeights,
    attentive_entropy_loss,
    classification_loss,
    global_adversarial_loss,
    local_adversarial_loss,
    tada_objective,
)
from tada_dist.model import GradientReversal
from tada_dist.schedules import create_lr_scheduler, grl_schedule, lr_factor, progress

LN2 = math.log(2.0)


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def bce(z: float, label: float) -> float:
    """-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]."""
    return label * softplus(-z) + (1 - label) * softplus(z)


# -- individual losses ------------------------------------------------------------------------


def test_local_adversarial_loss_averages_over_images_and_regions():
    assert local_adversarial_loss(torch.zeros(3, 5), torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(LN2)
    region_logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    expected = (bce(2.0, 1) + bce(-1.0, 1) + bce(0.0, 0) + bce(3.0, 0)) / 4
    assert local_adversarial_loss(region_logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(expected, rel=1e-6)


def test_global_adversarial_loss():
    expected = (bce(1.5, 1) + bce(-0.5, 0)) / 2
    loss = global_adversarial_loss(torch.tensor([1.5, -0.5]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_losses_run_in_fp32_for_bf16_logits():
    loss = global_adversarial_loss(torch.tensor([1.5, -0.5], dtype=torch.bfloat16), torch.tensor([1.0, 0.0]))
    assert loss.dtype == torch.float32


def test_classification_loss():
    assert classification_loss(torch.zeros(1, 3), torch.tensor([1])).item() == pytest.approx(math.log(3.0))
    loss = classification_loss(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2, rel=1e-6)


def test_attentive_entropy_loss_uniform_predictions_undecided_discriminator():
    # p uniform over 4 classes: H = ln 4; d = 1/2: m = 1 + ln 2.
    loss = attentive_entropy_loss(torch.zeros(6, 4), torch.zeros(6))
    assert loss.item() == pytest.approx((1 + LN2) * math.log(4.0), rel=1e-6)


# -- eq. 9 per method -------------------------------------------------------------------------


def fake_outputs() -> dict[str, torch.Tensor]:
    """Outputs of a 2 source + 2 target batch, K = 2, 3 classes, with simple known losses."""
    return {
        "class_logits_source": torch.zeros(2, 3, requires_grad=True),  # L_y = ln 3
        "class_logits": torch.zeros(4, 3),  # H = ln 3 per image
        "domain_labels": torch.tensor([1.0, 1.0, 0.0, 0.0]),
        "region_logits": torch.zeros(4, 2, requires_grad=True),  # L_l = ln 2
        "global_logits": torch.full((4,), 2.0, requires_grad=True),  # L_g = (2 bce(2,1) + 2 bce(2,0)) / 4
    }


L_Y = math.log(3.0)
L_L = LN2
L_G = (bce(2.0, 1) + bce(2.0, 0)) / 2
L_H = (1 + (softplus(2.0) - 2.0 / (1 + math.exp(-2.0)))) * math.log(3.0)  # m = 1 + H(sigmoid(2))
PLAIN_H = math.log(3.0)  # tada_local's entropy has no global discriminator to weight it: m = 1
LAMBDA, GAMMA = 0.5, 0.2

EXPECTED_TERMS = {
    "source_only": ({"cls": L_Y}, L_Y),
    "dann": ({"cls": L_Y, "global": L_G}, L_Y + LAMBDA * L_G),
    "tada_local": ({"cls": L_Y, "local": L_L, "entropy": PLAIN_H}, L_Y + GAMMA * PLAIN_H + LAMBDA * L_L),
    "tada_global": ({"cls": L_Y, "global": L_G, "entropy": L_H}, L_Y + GAMMA * L_H + LAMBDA * L_G),
    "tada": ({"cls": L_Y, "local": L_L, "global": L_G, "entropy": L_H}, L_Y + GAMMA * L_H + LAMBDA * (L_G + L_L)),
}


@pytest.mark.parametrize("method", EXPECTED_TERMS)
def test_tada_objective_terms_per_method(method):
    outputs = fake_outputs()
    weights = LossWeights(adaptation=LAMBDA, entropy=GAMMA)
    total, terms = tada_objective(outputs, torch.tensor([0, 2]), weights, method=method)
    expected_terms, expected_total = EXPECTED_TERMS[method]
    assert set(terms) == {"loss", *expected_terms}
    for name, value in expected_terms.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6), name
    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(expected_total, rel=1e-6)
    assert all(not value.requires_grad for value in terms.values())
    total.backward()
    assert outputs["class_logits_source"].grad is not None


def test_tada_objective_default_weights_are_the_papers():
    weights = LossWeights()
    assert (weights.adaptation, weights.entropy) == (1.0, 0.1)


def test_tada_objective_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'mada'; allowed: source_only, dann, tada_local, tada_global"):
        tada_objective(fake_outputs(), torch.tensor([0, 2]), LossWeights(), method="mada")


# -- schedules --------------------------------------------------------------------------------


def test_progress_is_clamped_fraction():
    assert [progress(s, 200) for s in (0, 100, 200, 300)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="total_steps must be positive, got 0"):
        progress(0, 0)


def test_grl_schedule_hand_values():
    assert grl_schedule(0.0) == 0.0
    assert grl_schedule(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # 0.98661
    assert grl_schedule(1.0) == pytest.approx(0.9999092, abs=1e-7)


def test_lr_factor_hand_values():
    assert lr_factor(0.0) == 1.0
    assert lr_factor(0.5) == pytest.approx(6 ** -0.75)
    assert lr_factor(1.0) == pytest.approx(0.16556, abs=1e-5)  # 11 ** -0.75


def test_lr_scheduler_scales_every_group_after_n_steps():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.01}, {"params": params[1:], "lr": 0.1}], lr=0.01)
    scheduler = create_lr_scheduler(optimizer, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01 * 6 ** -0.75, 0.1 * 6 ** -0.75])
    for _ in range(7):  # past the end the factor stays at p = 1
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01 * 11 ** -0.75, 0.1 * 11 ** -0.75])


# -- gradient reversal ------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_scaled_negation_backward():
    grl = GradientReversal(coeff=0.5)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = grl(x)
    assert torch.equal(y, x) and y.stride() == x.stride()
    upstream = torch.randn(2, 3, 4, 4)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.5 * upstream)

    grl.coeff = 2.0  # the trainer changes it between steps
    x.grad = None
    grl(x).backward(upstream)
    torch.testing.assert_close(x.grad, -2.0 * upstream)
