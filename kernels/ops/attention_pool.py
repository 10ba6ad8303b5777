"""Transferable local attention followed by average pooling (paper eq. 4, then the backbone's pooling):
pooled = mean_k (1 + w_k) f_k, without ever writing the attended map h = (1 + w) * f.

With average pooling h is only averaged, so the pooled features are a weighted sum over the K regions
of f, with weights (1 + w_k) / K: the op reads f once forward and writes df once backward, where
entropy_attention followed by a mean writes h, reads it back, and backward expands the pooled
gradient to a full map, reads it and writes df (three passes over a map of B x C x K each way).
w is computed exactly as entropy_attention computes it (same forms and units).

Triton backend: the forward runs on an (image, channel tile) grid; each program walks the regions in
tiles, recomputes w from the logits and accumulates the weighted sum in fp32; the first channel tile
also writes w. The backward runs on an (image, region tile, channel tile) grid like entropy_attention's:
df = (1 + w_k) / K * d_pooled, written through df's strides (f's memory format), and without `detach`
each channel tile's share of dL/dz = (sum_c d_pooled_c f_kc / K + grad_w_k) * dw/dz into a
[n_channel_tiles, B, K] buffer summed afterwards (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import interpreting, resolve_backend
from .entropy_attention import (
    attention_coefficients,
    binary_entropy_and_slope,
    binary_entropy_with_logits,
    check_attention_inputs,
    launch_attention_backward,
    save_for_attention_backward,
)


def attention_pool(
    f: Tensor, logits: Tensor, *, detach: bool = True, form: str = "paper", unit: str = "nats",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Return (pooled, w): pooled = mean over regions of (1 + w) * f, [B, C] in f's dtype, and w [B, H*W]
    fp32, both as entropy_attention(f, logits, ...) followed by a mean over the map would give them.

    f [B, C, H, W] in any memory format; logits [B, H*W] with region k = y * W + x. `detach`, `form`
    and `unit` as for entropy_attention.
    """
    offset, slope = attention_coefficients(form, unit)
    check_attention_inputs("attention_pool", f, logits)
    if resolve_backend(backend, f.device) == "triton":
        return _AttentionPool.apply(f, logits, detach, offset, slope)

    weights = offset + slope * binary_entropy_with_logits(logits.float())
    if detach:
        weights = weights.detach()
    regions = weights.shape[1]
    # One batched matrix-vector product over the [B, C, K] view (a plain view for both memory formats),
    # in fp32 like the fused kernel; the result goes back to f's dtype for the layers that follow.
    pooled = torch.bmm(f.flatten(2).float(), ((1.0 + weights) / regions).unsqueeze(2)).squeeze(2)
    return pooled.to(f.dtype), weights


# -- Triton kernels ---------------------------------------------------------------------------


@triton.jit
def _attention_pool_forward_kernel(
    f_ptr, f_sb, f_sc, f_sy, f_sx, logits_ptr, l_sb, l_sr, pooled_ptr, p_sb, p_sc, w_ptr,
    C, R, W, offset, slope, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_channels = channels < C
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        regions = start + tl.arange(0, BLOCK_R)
        in_regions = regions < R
        z = tl.load(logits_ptr + b * l_sb + regions * l_sr, mask=in_regions, other=0.0).to(tl.float32)
        entropy, _ = binary_entropy_and_slope(z)
        weight = offset + slope * entropy
        tl.store(w_ptr + b * R + regions, weight, mask=in_regions & (pid_c == 0))
        y, x = regions // W, regions % W
        f_tile = f_ptr + b * f_sb + channels[:, None] * f_sc + y[None, :] * f_sy + x[None, :] * f_sx
        f = tl.load(f_tile, mask=in_channels[:, None] & in_regions[None, :], other=0.0).to(tl.float32)
        total += tl.sum(f * (1.0 + weight)[None, :], axis=1)
    tl.store(pooled_ptr + b * p_sb + channels * p_sc, (total / R).to(pooled_ptr.dtype.element_ty), mask=in_channels)


@triton.jit
def _attention_pool_backward_kernel(
    grad_ptr, g_sb, g_sc, f_ptr, f_sb, f_sc, f_sy, f_sx, logits_ptr, l_sb, l_sr,
    grad_f_ptr, d_sb, d_sc, d_sy, d_sx, grad_w_ptr, partial_ptr,
    B, C, R, W, offset, slope, LOGIT_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(2)
    regions = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_regions, in_channels = regions < R, channels < C
    z = tl.load(logits_ptr + b * l_sb + regions * l_sr, mask=in_regions, other=0.0).to(tl.float32)
    entropy, entropy_slope = binary_entropy_and_slope(z)
    grad = tl.load(grad_ptr + b * g_sb + channels * g_sc, mask=in_channels, other=0.0).to(tl.float32)

    y, x = regions // W, regions % W
    mask = in_channels[:, None] & in_regions[None, :]
    share = (1.0 + offset + slope * entropy) / R  # (1 + w) / K: each region's share of the mean
    grad_f_tile = grad_f_ptr + b * d_sb + channels[:, None] * d_sc + y[None, :] * d_sy + x[None, :] * d_sx
    tl.store(grad_f_tile, (grad[:, None] * share[None, :]).to(grad_f_ptr.dtype.element_ty), mask=mask)

    if LOGIT_GRAD:
        f_tile = f_ptr + b * f_sb + channels[:, None] * f_sc + y[None, :] * f_sy + x[None, :] * f_sx
        f = tl.load(f_tile, mask=mask, other=0.0).to(tl.float32)
        grad_w = tl.sum(grad[:, None] * f, axis=0) / R
        if pid_c == 0:  # the gradient flowing into the returned w joins once, on the first tile
            grad_w += tl.load(grad_w_ptr + b * R + regions, mask=in_regions, other=0.0)
        tl.store(partial_ptr + (pid_c * B + b) * R + regions, slope * entropy_slope * grad_w, mask=in_regions)


# -- launchers and autograd -------------------------------------------------------------------


def _launch_settings(regions: int) -> dict:
    """On the GPU, 64 channels by every region of a ResNet-50 map (64 for K = 49) per program: the forward
    then reads each program's f tile in one pass, 2048 / 64 = 32 programs per image. Small tiles in the
    interpreter, so that its tests walk several region tiles."""
    if interpreting():
        return dict(BLOCK_C=32, BLOCK_R=16)
    return dict(BLOCK_C=64, BLOCK_R=min(64, triton.next_power_of_2(regions)), num_warps=4)


class _AttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, logits, detach: bool, offset: float, slope: float):
        B, C, H, W = f.shape
        settings = _launch_settings(H * W)
        pooled = torch.empty(B, C, device=f.device, dtype=f.dtype)
        weights = torch.empty(B, H * W, device=f.device, dtype=torch.float32)
        _attention_pool_forward_kernel[(B, triton.cdiv(C, settings["BLOCK_C"]))](
            f, *f.stride(), logits, *logits.stride(), pooled, *pooled.stride(), weights, C, H * W, W, offset, slope,
            **settings,
        )
        save_for_attention_backward(ctx, logits, f, weights, detach, offset, slope)
        ctx.map_shape = (B, C, H, W)
        ctx.channels_last = f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()
        return pooled, weights

    @staticmethod
    def backward(ctx, grad_pooled, grad_w):
        B, C, H, W = ctx.map_shape
        settings = _launch_settings(H * W)
        grid = (B, triton.cdiv(H * W, settings["BLOCK_R"]), triton.cdiv(C, settings["BLOCK_C"]))
        memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
        grad_f = torch.empty(B, C, H, W, device=grad_pooled.device, dtype=grad_pooled.dtype,
                             memory_format=memory_format)
        grad_f, grad_logits = launch_attention_backward(
            ctx, _attention_pool_backward_kernel, grid, settings, grad_pooled, grad_w, grad_f)
        return grad_f, grad_logits, None, None, None
