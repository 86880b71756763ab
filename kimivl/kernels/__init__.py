"""Compute kernels, one module per op. Each op's plain PyTorch function is the reference that tests compare to."""
