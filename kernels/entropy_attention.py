"""Transferable local attention (paper eq. 3, 4): w = 1 - H(d), h = (1 + w) * f, region by region.

d = sigmoid(logit) is region k's domain prediction from its discriminator and H the binary entropy
in nats, so w runs from 1 - ln 2 (d = 1/2, the discriminator is undecided) to 1 (d at 0 or 1). The
residual form 1 + w keeps every region's features, only re-weighting them (eq. 4).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend


def binary_entropy_with_logits(logits: Tensor) -> Tensor:
    """H(sigmoid(z)) in nats, elementwise, as softplus(z) - z * sigmoid(z).

    Algebraically equal to -p log p - (1 - p) log(1 - p), but never takes the log of a probability
    that rounded to 0 or 1, so saturated logits (|z| = 100) give finite values and gradients.
    """
    return F.softplus(logits) - logits * torch.sigmoid(logits)


def entropy_attention(
    f: Tensor, logits: Tensor, *, detach: bool = True, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Return (h, w): h = (1 + w) * f with w = 1 - H(sigmoid(logits)) broadcast over channels.

    f [B, C, H, W] in any memory format; logits [B, H*W] with region k = y * W + x (row-major, the
    order of f.flatten(2)). w is [B, H*W] fp32 and h has f's dtype and shape. With `detach`, w is cut
    from the graph (thuml practice for conditioning weights): h then carries no gradient to logits.
    """
    if f.dim() != 4:
        raise ValueError(f"entropy_attention: f must be [B, C, H, W], got {list(f.shape)}")
    batch, _, height, width = f.shape
    if tuple(logits.shape) != (batch, height * width):
        raise ValueError(
            f"entropy_attention: logits must be [B, H*W] = [{batch}, {height * width}], got {list(logits.shape)}"
        )
    resolve_backend(backend)  # only the eager implementation exists in this build

    weights = 1.0 - binary_entropy_with_logits(logits.float())
    if detach:
        weights = weights.detach()
    scale = (1.0 + weights).view(batch, 1, height, width)
    # Multiply in fp32, hand back f's dtype: h feeds the rest of the network, which may run in bf16.
    h = (scale * f.float()).to(f.dtype)
    return h, weights
