"""Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
anything imports triton; with one, the same tests run the compiled kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
