"""Which implementation of a tada_kernels op runs.

Every op takes `backend=` and resolves it here, so the choice is made in one place:

- "eager": the vectorised PyTorch reference in fp32; the CPU path and the test oracle.
- "auto": the default. Today it always resolves to "eager"; once the fused Triton kernels are in this
  build it will pick them for CUDA tensors and keep "eager" everywhere else.
- "triton": ask for the fused kernels explicitly. They are not part of this build yet, so asking for
  them fails loudly instead of quietly running something else.
"""

BACKENDS = ("auto", "eager", "triton")


def resolve_backend(backend: str) -> str:
    """Map a requested backend to the implementation that will run ("eager" in this build)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown tada_kernels backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")
    if backend == "triton":
        raise RuntimeError(
            "tada_kernels backend 'triton' is not available in this build; use backend 'eager' or 'auto'"
        )
    return "eager"
