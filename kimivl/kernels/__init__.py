"""Compute kernels, one module per op. Each op's plain PyTorch function is the reference that tests compare to; the
op the model calls picks a backend per call through `backend.backend_for` (torch, or triton / flash-attn on CUDA)."""
