"""tada_kernels: the TADA-specific ops (region discriminators, entropy attention with or without the
average pooling that follows it, attentive entropy).

Each op lives in its own module under ops/ with one public function, its fused Triton kernels with their
launchers and torch.autograd.Function, and the eager PyTorch reference; `backend=` picks the
implementation (see backend.py). Every op accumulates in fp32 and is differentiable.

The ops are imported on first use, so that `tada_kernels.options` (the accepted choices) costs no
torch or triton import: a command that only validates a config answers at once.
"""

import importlib

from .options import ATTENTION_FORMS, BACKENDS, ENTROPY_UNITS

_LAZY = {
    "attention_pool": ".ops.attention_pool",
    "attentive_entropy": ".ops.attentive_entropy",
    "attention_coefficients": ".ops.entropy_attention",
    "binary_entropy_with_logits": ".ops.entropy_attention",
    "entropy_attention": ".ops.entropy_attention",
    "entropy_scale": ".ops.entropy_attention",
    "grouped_mlp": ".ops.grouped_mlp",
    "resolve_backend": ".backend",
}

__all__ = ["ATTENTION_FORMS", "BACKENDS", "ENTROPY_UNITS", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tada_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
