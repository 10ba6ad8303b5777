"""Which implementation of a tada_kernels op runs, and the launch settings the Triton kernels share.

Every op takes `backend=` and resolves it here, against the device of its input, so the choice is
made in one place:

- "eager": the vectorised PyTorch form, the CPU path: fp32, or the 16-bit dtype of 16-bit
  inputs with fp32 accumulation, as the fused kernels compute (their tests check both against
  float64 references).
- "auto": the default. The fused Triton kernels for CUDA tensors, "eager" everywhere else.
- "triton": the fused Triton kernels, always. CPU tensors run them under the Triton interpreter,
  which needs TRITON_INTERPRET=1 in the environment before triton is first imported; without it
  asking for "triton" on the CPU fails with a one-line error instead of quietly running eager.
"""

import os

import torch
import triton.language as tl

from .options import BACKENDS


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (read at each launch, like triton itself)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the implementation that runs on tensors of `device`: "eager" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown tada_kernels backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "eager" or (backend == "auto" and not on_cuda):
        return "eager"
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"tada_kernels backend 'triton' got {torch.device(device).type} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU"
        )
    return "triton"


def operand_dtype(dtype: torch.dtype):
    """The dtype tl.dot multiplies in: 16-bit activations keep the tensor cores' 16-bit path (weights are
    cast to it tile by tile), everything else multiplies in fp32. Accumulation is fp32 either way."""
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of intermediate activations and gradients for inputs of `dtype` (see operand_dtype)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
