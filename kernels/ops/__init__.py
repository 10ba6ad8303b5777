"""One module per op: its Triton kernels, their launchers, the torch.autograd.Function and the eager reference."""
