"""tada_kernels: the TADA-specific ops (region discriminators, entropy attention, attentive entropy).

Each op lives in its own module with one public function, its fused Triton kernels with their
launchers and torch.autograd.Function, and the eager PyTorch reference; `backend=` picks the
implementation (see backend.py). Every op accumulates in fp32 and is differentiable.
"""

from .attentive_entropy import attentive_entropy
from .backend import BACKENDS, resolve_backend
from .entropy_attention import (
    ATTENTION_FORMS,
    ENTROPY_UNITS,
    attention_coefficients,
    binary_entropy_with_logits,
    entropy_attention,
    entropy_scale,
)
from .grouped_mlp import grouped_mlp

__all__ = [
    "ATTENTION_FORMS",
    "BACKENDS",
    "ENTROPY_UNITS",
    "attention_coefficients",
    "attentive_entropy",
    "binary_entropy_with_logits",
    "entropy_attention",
    "entropy_scale",
    "grouped_mlp",
    "resolve_backend",
]
