"""tada_kernels: the TADA-specific ops (region discriminators, entropy attention, attentive entropy).

Each op lives in its own module with one public function, its fused Triton kernels with their
launchers and torch.autograd.Function, and the eager PyTorch reference; `backend=` picks the
implementation (see backend.py). Every op accumulates in fp32 and is differentiable.
"""

from .attentive_entropy import attentive_entropy
from .backend import BACKENDS, resolve_backend
from .entropy_attention import binary_entropy_with_logits, entropy_attention
from .grouped_mlp import grouped_mlp

__all__ = [
    "BACKENDS",
    "attentive_entropy",
    "binary_entropy_with_logits",
    "entropy_attention",
    "grouped_mlp",
    "resolve_backend",
]
