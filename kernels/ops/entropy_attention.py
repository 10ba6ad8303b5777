"""Transferable local attention (paper eq. 3, 4): w = 1 - H(d), h = (1 + w) * f, region by region.

d = sigmoid(logit) is region k's domain prediction from its discriminator and H its binary entropy.
Two forms of w are offered, because eq. 3 and the paper's text pull in opposite directions:

- "paper" (eq. 3 as written): w = 1 - H(d). In nats w runs from 1 - ln 2 (d = 1/2, the discriminator
  is undecided) to 1 (d at 0 or 1); in bits, where H lies in [0, 1], from 0 to 1. The regions a
  discriminator tells apart most easily get the most weight.
- "uncertainty" (the text's reading, "a larger attention value over more transferable regions"):
  w = H(d) / ln 2, the entropy normalised to [0, 1] (the same in either unit), so the regions whose
  discriminator cannot tell the domains apart get the most weight.

Both are w = offset + slope * H_nats (see attention_coefficients). The residual form 1 + w keeps
every region's features, only re-weighting them (eq. 4).

Triton backend: one pass over f forward and one backward, on a (image, region tile, channel tile)
grid that reads f, h and their gradients through their strides, so any memory format works and h
keeps f's. Each program recomputes w for its regions from the logits (cheaper than reading it back);
the first channel tile also writes w. Backward computes grad_f = (1 + w) * grad_h and, without
`detach`, each channel tile's share of dL/dz = (sum_c grad_h * f + grad_w) * dw/dz into a
[n_channel_tiles, B, H*W] buffer summed afterwards (deterministic, no atomics). Only the logits, and
f when the logits need a gradient, are saved.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..backend import interpreting, resolve_backend
from ..options import ATTENTION_FORMS, ENTROPY_UNITS


def binary_entropy_with_logits(logits: Tensor) -> Tensor:
    """H(sigmoid(z)) in nats, elementwise, as softplus(z) - z * sigmoid(z).

    Algebraically equal to -p log p - (1 - p) log(1 - p), but never takes the log of a probability
    that rounded to 0 or 1, so saturated logits (|z| = 100) give finite values and gradients.
    """
    return F.softplus(logits) - logits * torch.sigmoid(logits)


def entropy_scale(unit: str) -> float:
    """Factor from nats to `unit`: H_unit = entropy_scale(unit) * H_nats."""
    if unit not in ENTROPY_UNITS:
        raise ValueError(f"unknown entropy unit {unit!r}; allowed: {', '.join(ENTROPY_UNITS)}")
    return 1.0 if unit == "nats" else 1.0 / math.log(2.0)


def attention_coefficients(form: str, unit: str) -> tuple[float, float]:
    """(offset, slope) with w = offset + slope * H_nats for attention `form` measured in `unit`."""
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}; allowed: {', '.join(ATTENTION_FORMS)}")
    if form == "paper":
        return 1.0, -entropy_scale(unit)
    return 0.0, entropy_scale("bits")  # normalised to [0, 1], whichever unit H is reported in


def entropy_attention(
    f: Tensor, logits: Tensor, *, detach: bool = True, form: str = "paper", unit: str = "nats",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Return (h, w): h = (1 + w) * f with w from the region logits broadcast over channels.

    w = 1 - H(sigmoid(logits)) for form "paper" (eq. 3), H / ln 2 for form "uncertainty"; `unit`
    ("nats" or "bits") is the unit of H in the paper form. f [B, C, H, W] in any memory format;
    logits [B, H*W] with region k = y * W + x (row-major, the order of f.flatten(2)). w is [B, H*W]
    fp32 and h has f's dtype, shape and memory format. With `detach`, w is cut from the graph (thuml
    practice for conditioning weights): h then carries no gradient to logits.
    """
    offset, slope = attention_coefficients(form, unit)
    check_attention_inputs("entropy_attention", f, logits)
    batch, _, height, width = f.shape
    if resolve_backend(backend, f.device) == "triton":
        return _EntropyAttention.apply(f, logits, detach, offset, slope)

    weights = offset + slope * binary_entropy_with_logits(logits.float())
    if detach:
        weights = weights.detach()
    scale = (1.0 + weights).view(batch, 1, height, width)
    # Multiply in fp32, hand back f's dtype: h feeds the rest of the network, which may run in bf16.
    h = (scale * f.float()).to(f.dtype)
    return h, weights


def check_attention_inputs(op: str, f: Tensor, logits: Tensor) -> None:
    """One-line errors for a feature map that is not [B, C, H, W] or logits that are not [B, H*W]."""
    if f.dim() != 4:
        raise ValueError(f"{op}: f must be [B, C, H, W], got {list(f.shape)}")
    batch, _, height, width = f.shape
    if tuple(logits.shape) != (batch, height * width):
        raise ValueError(f"{op}: logits must be [B, H*W] = [{batch}, {height * width}], got {list(logits.shape)}")


# -- Triton kernels ---------------------------------------------------------------------------


@triton.jit
def binary_entropy_and_slope(z):
    """H(sigmoid(z)) in nats and dH/dz = -z * s * (1 - s), elementwise in fp32.

    Written in |z| so nothing cancels: with e = exp(-|z|), H = log(1 + e) + |z| * e / (1 + e) and
    s (1 - s) = e / (1 + e)^2, finite and exact to rounding at |z| = 100 (where e underflows to 0).
    """
    magnitude = tl.abs(z)
    e = tl.exp(-magnitude)
    small_side = e / (1.0 + e)  # sigmoid(-|z|)
    entropy = tl.log(1.0 + e) + magnitude * small_side
    return entropy, -z * small_side * (1.0 - small_side)


@triton.jit
def _entropy_attention_forward_kernel(
    f_ptr, f_sb, f_sc, f_sy, f_sx, logits_ptr, l_sb, l_sr, h_ptr, h_sb, h_sc, h_sy, h_sx, w_ptr,
    C, R, W, offset, slope, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    regions = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_regions = regions < R
    z = tl.load(logits_ptr + b * l_sb + regions * l_sr, mask=in_regions, other=0.0).to(tl.float32)
    entropy, _ = binary_entropy_and_slope(z)
    weight = offset + slope * entropy
    tl.store(w_ptr + b * R + regions, weight, mask=in_regions & (tl.program_id(2) == 0))

    y, x = regions // W, regions % W
    mask = (channels[:, None] < C) & in_regions[None, :]
    f_tile = f_ptr + b * f_sb + channels[:, None] * f_sc + y[None, :] * f_sy + x[None, :] * f_sx
    f = tl.load(f_tile, mask=mask, other=0.0).to(tl.float32)
    h_tile = h_ptr + b * h_sb + channels[:, None] * h_sc + y[None, :] * h_sy + x[None, :] * h_sx
    tl.store(h_tile, ((1.0 + weight)[None, :] * f).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _entropy_attention_backward_kernel(
    grad_h_ptr, g_sb, g_sc, g_sy, g_sx, f_ptr, f_sb, f_sc, f_sy, f_sx, logits_ptr, l_sb, l_sr,
    grad_f_ptr, d_sb, d_sc, d_sy, d_sx, grad_w_ptr, partial_ptr,
    B, C, R, W, offset, slope, LOGIT_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(2)
    regions = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_regions = regions < R
    z = tl.load(logits_ptr + b * l_sb + regions * l_sr, mask=in_regions, other=0.0).to(tl.float32)
    entropy, entropy_slope = binary_entropy_and_slope(z)

    y, x = regions // W, regions % W
    mask = (channels[:, None] < C) & in_regions[None, :]
    spatial = channels[:, None] * g_sc + y[None, :] * g_sy + x[None, :] * g_sx
    grad_h = tl.load(grad_h_ptr + b * g_sb + spatial, mask=mask, other=0.0).to(tl.float32)
    grad_f_tile = grad_f_ptr + b * d_sb + channels[:, None] * d_sc + y[None, :] * d_sy + x[None, :] * d_sx
    scale = 1.0 + offset + slope * entropy  # 1 + w
    tl.store(grad_f_tile, (scale[None, :] * grad_h).to(grad_f_ptr.dtype.element_ty), mask=mask)

    if LOGIT_GRAD:
        f_tile = f_ptr + b * f_sb + channels[:, None] * f_sc + y[None, :] * f_sy + x[None, :] * f_sx
        grad_w = tl.sum(grad_h * tl.load(f_tile, mask=mask, other=0.0).to(tl.float32), axis=0)
        if pid_c == 0:  # the gradient flowing into the returned w joins once, on the first tile
            grad_w += tl.load(grad_w_ptr + b * R + regions, mask=in_regions, other=0.0)
        tl.store(partial_ptr + (pid_c * B + b) * R + regions, slope * entropy_slope * grad_w, mask=in_regions)


# -- launchers and autograd -------------------------------------------------------------------


def _launch_settings() -> dict:
    """64 x 64 tiles of f on the GPU: 2048 programs for a 64-image batch of 2048 x 7 x 7 maps, enough
    to keep an H200's memory busy with this purely bandwidth-bound pass. Small tiles in the interpreter."""
    if interpreting():
        return dict(BLOCK_C=32, BLOCK_R=32)
    return dict(BLOCK_C=64, BLOCK_R=64, num_warps=4)


def _grid(f: Tensor, settings: dict) -> tuple[int, int, int]:
    B, C, H, W = f.shape
    return B, triton.cdiv(H * W, settings["BLOCK_R"]), triton.cdiv(C, settings["BLOCK_C"])


def save_for_attention_backward(ctx, logits: Tensor, f: Tensor, weights: Tensor, detach: bool, offset: float,
                                slope: float) -> None:
    """What the backward of an attention op (this one, attention_pool) needs: the logits, and f only
    when the logits get a gradient; w is cut from the graph under `detach`."""
    ctx.detach = detach
    ctx.coefficients = (offset, slope)
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(logits, None if detach else f)
    if detach:
        ctx.mark_non_differentiable(weights)


def launch_attention_backward(ctx, kernel, grid, settings: dict, grad: Tensor, grad_w: Tensor | None,
                              grad_f: Tensor) -> tuple[Tensor, Tensor | None]:
    """Run an attention op's backward kernel (both take the same arguments, `grad` being the gradient of
    h or of the pooled features) into `grad_f`; (grad_f, grad of the logits or None under `detach`).
    Each channel tile writes its share of the logits' gradient to its own row of a buffer summed here."""
    logits, f = ctx.saved_tensors
    batch, channels, _, width = grad_f.shape
    regions = logits.shape[1]
    partial = None
    if not ctx.detach:
        partial = torch.empty(grid[2], batch, regions, device=grad.device, dtype=torch.float32)
        grad_w = grad_w.float().contiguous() if grad_w is not None else torch.zeros_like(partial[0])
    features = grad_f if f is None else f  # f is only read for the logits' gradient
    kernel[grid](
        grad, *grad.stride(), features, *features.stride(), logits, *logits.stride(), grad_f, *grad_f.stride(),
        grad_w, partial, batch, channels, regions, width, *ctx.coefficients, LOGIT_GRAD=not ctx.detach, **settings,
    )
    return grad_f, None if ctx.detach else partial.sum(0).to(ctx.logits_dtype)


class _EntropyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, logits, detach: bool, offset: float, slope: float):
        B, C, H, W = f.shape
        settings = _launch_settings()
        h = torch.empty_like(f)  # keeps f's memory format
        weights = torch.empty(B, H * W, device=f.device, dtype=torch.float32)
        _entropy_attention_forward_kernel[_grid(f, settings)](
            f, *f.stride(), logits, *logits.stride(), h, *h.stride(), weights, C, H * W, W, offset, slope,
            **settings,
        )
        save_for_attention_backward(ctx, logits, f, weights, detach, offset, slope)
        return h, weights

    @staticmethod
    def backward(ctx, grad_h, grad_w):
        settings = _launch_settings()
        grad_f, grad_logits = launch_attention_backward(
            ctx, _entropy_attention_backward_kernel, _grid(grad_h, settings), settings, grad_h, grad_w,
            torch.empty_like(grad_h),
        )
        return grad_f, grad_logits, None, None, None
