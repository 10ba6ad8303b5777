"""K independent 3-layer MLPs applied region by region: TADA's region discriminators G_d^k (eq. 2).

Region k of every image goes through its own MLP C -> H -> H -> 1 (weights not shared across
regions), so the K weight matrices are stacked as [K, C, H] and the whole layer is three batched
matmuls over K instead of K small ones.
"""

import torch
from torch import Tensor

from .backend import resolve_backend


def grouped_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    *,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    seed: int | None = None,
) -> Tensor:
    """logit[b, k] = relu(relu(x[b,k] @ w1[k] + b1[k]) @ w2[k] + b2[k]) @ w3[k] + b3[k].

    x [B, K, C] with any strides (a channels-last view of the feature map is the intended input),
    w1 [K, C, H], b1 [K, H], w2 [K, H, H], b2 [K, H], w3 [K, H], b3 [K]. Returns [B, K] fp32 logits.
    When `training`, inverted dropout with probability `dropout` follows each ReLU; `seed` fixes its
    masks (None draws them from the global torch RNG, like nn.Dropout).
    """
    _check_shapes(x, w1, b1, w2, b2, w3, b3)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"grouped_mlp: dropout must be in [0, 1), got {dropout}")
    resolve_backend(backend)  # only the eager implementation exists in this build
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    drop = dropout if training else 0.0

    # [B, K, C] -> [K, B, C]: region k becomes batch entry k of the batched matmuls.
    regions = x.float().transpose(0, 1)
    hidden = torch.baddbmm(b1.float().unsqueeze(1), regions, w1.float()).relu()
    hidden = _dropout(hidden, drop, generator)
    hidden = torch.baddbmm(b2.float().unsqueeze(1), hidden, w2.float()).relu()
    hidden = _dropout(hidden, drop, generator)
    logits = torch.baddbmm(b3.float().view(-1, 1, 1), hidden, w3.float().unsqueeze(2))  # [K, B, 1]
    return logits.squeeze(2).transpose(0, 1).contiguous()


def _dropout(hidden: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    # Written out rather than F.dropout because F.dropout cannot take a generator for seeded masks.
    if p == 0.0:
        return hidden
    keep = torch.empty_like(hidden).bernoulli_(1.0 - p, generator=generator)
    return hidden * keep / (1.0 - p)


def _check_shapes(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"grouped_mlp: x must be [B, K, C], got {list(x.shape)}")
    _, K, C = x.shape
    H = w1.shape[2] if w1.dim() == 3 else "H"
    expected = {
        "w1": ("[K, C, H]", w1, (K, C, H)),
        "b1": ("[K, H]", b1, (K, H)),
        "w2": ("[K, H, H]", w2, (K, H, H)),
        "b2": ("[K, H]", b2, (K, H)),
        "w3": ("[K, H]", w3, (K, H)),
        "b3": ("[K]", b3, (K,)),
    }
    for name, (layout, tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            wanted = "[" + ", ".join(map(str, shape)) + "]"
            raise ValueError(f"grouped_mlp: {name} must be {layout} = {wanted}, got {list(tensor.shape)}")
