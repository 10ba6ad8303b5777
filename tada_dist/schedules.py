"""Progressive training schedules of DANN (Ganin & Lempitsky 2015), which the paper adopts.

Both are functions of training progress p = step / total_steps:

- learning rate: lr_p = lr_0 * (1 + gamma * p) ** -power, gamma = 10, power = 0.75;
- adaptation: the paper's lambda_p = lambda * (2 / (1 + exp(-10 p)) - 1). We split it in two
  so lambda is counted once: the loss weight lambda multiplies L_g + L_l in the total loss
  (tada_dist.losses.tada_objective), and the gradient reversal coefficient is grl_schedule(p)
  alone. The discriminators then minimise lambda * (L_g + L_l) and the feature extractor receives
  -lambda * grl_schedule(p) times that gradient, which is exactly lambda_p.
"""

import math

import torch


def progress(step: int, total_steps: int) -> float:
    """Training progress p = step / total_steps, clamped to [0, 1]."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return min(max(step / total_steps, 0.0), 1.0)


def grl_schedule(p: float, alpha: float = 10.0) -> float:
    """GRL coefficient 2 / (1 + exp(-alpha p)) - 1: 0 at the start, so the untrained discriminators'
    noisy gradients do not reach the features, rising to ~1 (0.9999 at p = 1 with alpha = 10)."""
    return 2.0 / (1.0 + math.exp(-alpha * p)) - 1.0


def lr_factor(p: float, gamma: float = 10.0, power: float = 0.75) -> float:
    """Learning-rate multiplier (1 + gamma p) ** -power: 1 at p = 0, 11 ** -0.75 ~ 0.166 at p = 1."""
    return (1.0 + gamma * p) ** -power


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, *, gamma: float = 10.0, power: float = 0.75
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying lr_factor to every parameter group's initial lr; call .step() once per optimizer step.

    Groups keep their ratio (new layers at 10x the backbone) because each is scaled by the same factor.
    """
    progress(0, total_steps)  # reject a non-positive total_steps now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(progress(step, total_steps), gamma, power)
    )
