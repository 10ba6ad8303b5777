"""Domain discriminators: K region-level ones for local attention (eq. 2) and one image-level (eq. 5).

Both output logits of "this is a source image" (domain label 1 = source, 0 = target).
"""

import math

import torch
from torch import Tensor, nn

import tada_kernels


class RegionDiscriminators(nn.Module):
    """K independent MLPs C -> H -> H -> 1, one per feature-map region, run as one grouped kernel.

    The weights are stacked per layer ([K, C, H] etc.) rather than held as K nn.Sequentials so that
    tada_kernels.grouped_mlp sees each layer as one tensor; with ResNet-50 (K = 49, C = 2048,
    H = 1024) they hold 154M parameters.
    """

    def __init__(self, num_regions: int, in_channels: int, hidden: int, dropout: float = 0.5, *, backend: str = "auto"):
        super().__init__()
        self.num_regions = num_regions
        self.in_channels = in_channels
        self.hidden = hidden
        self.dropout = dropout
        self.backend = backend
        K, C, H = num_regions, in_channels, hidden
        self.w1 = nn.Parameter(torch.empty(K, C, H))
        self.b1 = nn.Parameter(torch.empty(K, H))
        self.w2 = nn.Parameter(torch.empty(K, H, H))
        self.b2 = nn.Parameter(torch.empty(K, H))
        self.w3 = nn.Parameter(torch.empty(K, H))
        self.b3 = nn.Parameter(torch.empty(K))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init per region: weights and biases uniform in +-1/sqrt(fan_in).
        layers = ((self.in_channels, (self.w1, self.b1)), (self.hidden, (self.w2, self.b2, self.w3, self.b3)))
        for fan_in, params in layers:
            bound = 1.0 / math.sqrt(fan_in)
            for param in params:
                nn.init.uniform_(param, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, K, C] (any strides) -> [B, K] fp32 region logits."""
        return tada_kernels.grouped_mlp(
            x, self.w1, self.b1, self.w2, self.b2, self.w3, self.b3,
            dropout=self.dropout, training=self.training, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_regions={self.num_regions}, in_channels={self.in_channels}, "
            f"hidden={self.hidden}, dropout={self.dropout}"
        )


def mlp(in_features: int, hidden: int, layers: int, out_features: int, dropout: float = 0.0) -> list[nn.Module]:
    """`layers` hidden Linear + ReLU (+ Dropout) of width `hidden`, then Linear to out_features."""
    modules: list[nn.Module] = []
    for index in range(layers):
        modules += [nn.Linear(in_features if index == 0 else hidden, hidden), nn.ReLU(inplace=True)]
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
    return [*modules, nn.Linear(hidden if layers else in_features, out_features)]


class DomainDiscriminator(nn.Sequential):
    """Image-level discriminator G_d on the bottleneck features, [B, in] -> [B] logits: in -> hidden ->
    hidden -> 1 (two hidden layers, the thuml design) or in -> hidden -> 1 (one, the textbook digits one)."""

    def __init__(self, in_features: int, hidden: int = 1024, dropout: float = 0.5, layers: int = 2):
        super().__init__(*mlp(in_features, hidden, layers, 1, dropout))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).squeeze(1)
