"""Attentive entropy (paper eq. 6, 7): each image's prediction entropy weighted by m = 1 + H(d).

d = sigmoid(global logit) is the global discriminator's domain prediction for the image. Images the
discriminator cannot tell apart (d near 1/2) get m up to 1 + ln 2, so minimising L_h sharpens the
predictions of the images that already look alike across domains the most.

Triton backend: the forward is one single-program kernel (the loss is over one batch of logits):
it walks the rows in tiles and each row's classes in chunks with an online logsumexp that also
carries sum_j e^(x_j - max) (x_j - max), so the softmax entropy needs no second pass, then averages
m * entropy into the scalar. It saves each row's logsumexp and entropy; the backward kernel (a grid
over row tiles) rebuilds p from them: dL/dx_ij = g/n * m_i * -p_ij (log p_ij + E_i), and without
`detach` dL/dd_i = g/n * E_i * dH/dd_i.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import interpreting, resolve_backend
from .entropy_attention import binary_entropy_and_slope, binary_entropy_with_logits, entropy_scale


def attentive_entropy(
    class_logits: Tensor, domain_logits: Tensor, *, detach: bool = True, unit: str = "nats", backend: str = "auto"
) -> Tensor:
    """mean_i (1 + H(sigmoid(domain_logits[i]))) * H(softmax(class_logits[i])), an fp32 scalar.

    class_logits [n, c], domain_logits [n]. The prediction entropy is in nats; `unit` ("nats" or
    "bits") is the unit of the domain entropy in m = 1 + H(d), so m lies in [1, 1 + ln 2] or [1, 2].
    With `detach`, m is cut from the graph so this loss trains the classifier and features only,
    never the global discriminator.
    """
    scale = entropy_scale(unit)
    if class_logits.dim() != 2:
        raise ValueError(f"attentive_entropy: class_logits must be [n, classes], got {list(class_logits.shape)}")
    if tuple(domain_logits.shape) != (class_logits.shape[0],):
        raise ValueError(
            f"attentive_entropy: domain_logits must be [n] = [{class_logits.shape[0]}], got {list(domain_logits.shape)}"
        )
    if resolve_backend(backend, class_logits.device) == "triton":
        return _AttentiveEntropy.apply(class_logits, domain_logits, detach, scale)

    attention = 1.0 + scale * binary_entropy_with_logits(domain_logits.float())
    if detach:
        attention = attention.detach()
    # log_softmax stays finite for saturated logits, and p = 0 there, so p * log p = 0 instead of NaN.
    log_probs = class_logits.float().log_softmax(dim=1)
    prediction_entropy = -(log_probs.exp() * log_probs).sum(dim=1)
    return (attention * prediction_entropy).mean()


# -- Triton kernels ---------------------------------------------------------------------------


@triton.jit
def _attentive_entropy_forward_kernel(
    logits_ptr, l_sn, l_sc, domain_ptr, d_s, loss_ptr, lse_ptr, entropy_ptr, N, C, unit_scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        exp_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_j e^(x_j - row_max)
        exp_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_j e^(x_j - row_max) (x_j - row_max)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            in_cols = cols < C
            x = tl.load(
                logits_ptr + rows[:, None] * l_sn + cols[None, :] * l_sc,
                mask=in_rows[:, None] & in_cols[None, :], other=0.0,
            ).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(tl.where(in_cols[None, :], x, float("-inf")), axis=1))
            # Rescale the sums to the new maximum; before the first chunk they are 0 and row_max is -inf.
            shift = tl.where(exp_sum > 0.0, row_max - new_max, 0.0)
            rescale = tl.exp(shift)
            exp_dot = rescale * (exp_dot + shift * exp_sum)
            exp_sum = rescale * exp_sum
            centred = x - new_max[:, None]
            e = tl.where(in_cols[None, :], tl.exp(centred), 0.0)
            exp_sum += tl.sum(e, axis=1)
            exp_dot += tl.sum(e * centred, axis=1)
            row_max = new_max
        log_sum = tl.log(exp_sum)
        entropy = log_sum - exp_dot / exp_sum  # -sum p log p with log p = x - row_max - log_sum
        d = tl.load(domain_ptr + rows * d_s, mask=in_rows, other=0.0).to(tl.float32)
        domain_entropy, _ = binary_entropy_and_slope(d)
        total += tl.where(in_rows, (1.0 + unit_scale * domain_entropy) * entropy, 0.0)
        tl.store(lse_ptr + rows, row_max + log_sum, mask=in_rows)
        tl.store(entropy_ptr + rows, entropy, mask=in_rows)
    tl.store(loss_ptr, tl.sum(total, axis=0) / N)


@triton.jit
def _attentive_entropy_backward_kernel(
    logits_ptr, l_sn, l_sc, domain_ptr, d_s, lse_ptr, entropy_ptr, grad_loss_ptr,
    grad_logits_ptr, grad_domain_ptr, N, C, unit_scale,
    DOMAIN_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    grad = tl.load(grad_loss_ptr).to(tl.float32) / N
    lse = tl.load(lse_ptr + rows, mask=in_rows, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=in_rows, other=0.0)
    d = tl.load(domain_ptr + rows * d_s, mask=in_rows, other=0.0).to(tl.float32)
    domain_entropy, domain_slope = binary_entropy_and_slope(d)
    row_grad = grad * (1.0 + unit_scale * domain_entropy)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = in_rows[:, None] & (cols[None, :] < C)
        x = tl.load(logits_ptr + rows[:, None] * l_sn + cols[None, :] * l_sc, mask=mask, other=0.0).to(tl.float32)
        log_p = x - lse[:, None]
        dx = -row_grad[:, None] * tl.exp(log_p) * (log_p + entropy[:, None])
        tl.store(grad_logits_ptr + rows[:, None] * C + cols[None, :], dx.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if DOMAIN_GRAD:
        dd = grad * entropy * unit_scale * domain_slope
        tl.store(grad_domain_ptr + rows, dd.to(grad_domain_ptr.dtype.element_ty), mask=in_rows)


# -- launchers and autograd -------------------------------------------------------------------


def _launch_settings() -> dict:
    # A batch of logits is small (64 images x up to a few hundred classes): one warp group per tile.
    # 16 x 128 tiles: with 32 x 128 the forward needed 255 registers and spilled 660 bytes on sm_90
    # (bench/codegen.py); now 128 registers, no spill.
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_C=32)
    return dict(BLOCK_N=16, BLOCK_C=128, num_warps=4)


class _AttentiveEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, class_logits, domain_logits, detach: bool, unit_scale: float):
        N, C = class_logits.shape
        settings = _launch_settings()
        loss = torch.empty((), device=class_logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=class_logits.device, dtype=torch.float32)
        entropy = torch.empty_like(lse)
        _attentive_entropy_forward_kernel[(1,)](
            class_logits, *class_logits.stride(), domain_logits, domain_logits.stride(0), loss, lse, entropy,
            N, C, unit_scale, **settings,
        )
        ctx.detach = detach
        ctx.unit_scale = unit_scale
        ctx.save_for_backward(class_logits, domain_logits, lse, entropy)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        class_logits, domain_logits, lse, entropy = ctx.saved_tensors
        N, C = class_logits.shape
        settings = _launch_settings()
        grad_logits = torch.empty(N, C, device=class_logits.device, dtype=class_logits.dtype)
        grad_domain = None if ctx.detach else torch.empty_like(domain_logits)
        _attentive_entropy_backward_kernel[(triton.cdiv(N, settings["BLOCK_N"]),)](
            class_logits, *class_logits.stride(), domain_logits, domain_logits.stride(0), lse, entropy,
            grad_loss.contiguous(), grad_logits, grad_domain, N, C, ctx.unit_scale, DOMAIN_GRAD=not ctx.detach,
            **settings,
        )
        return grad_logits, grad_domain, None, None
