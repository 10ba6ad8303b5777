"""Gradient reversal layer (Ganin & Lempitsky 2015): identity forward, -coeff * gradient backward.

It sits between the feature extractor and each domain discriminator. One backward pass then makes
the discriminators minimise their loss while the features below receive the reversed gradient and
maximise it: the minus sign of eq. 9 without a second optimiser.
"""

import torch
from torch import Tensor, nn


class GradientReversalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)  # a view, so a channels-last map stays channels-last

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad_output, None


class GradientReversal(nn.Module):
    """Reverses gradients scaled by `coeff`, which the trainer updates every step (see schedules.grl_schedule)."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = coeff

    def forward(self, x: Tensor) -> Tensor:
        return GradientReversalFunction.apply(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"
