"""Rotary position embeddings: angle tables for the decoder (1D) and MoonViT (2D), one pairwise rotation."""

from __future__ import annotations

import torch

from .kernels.backend import backend_for


def rope_1d_angles(position_ids: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles [..., dim/2] in float32: pair j of a token at position p turns by p * theta^(-2j/dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim)
    return position_ids.float()[..., None] * inv_freq


def rope_2d_angles(grid_hws: list[tuple[int, int]], head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Angles [L, head_dim/2] in float32 for images packed one after another (row-major patches).

    Pair 2i turns by col * f_i and pair 2i+1 by row * f_i, with f_i = theta^(-4i/head_dim), i < head_dim/4; rows
    and columns restart at 0 for every image. (Spec 3.3: the official code puts the column angle first, although
    its docstring says otherwise.)
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)
    angles = []
    for h, w in grid_hws:
        rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
        angles.append(torch.stack([torch.outer(cols, freqs), torch.outer(rows, freqs)], dim=-1).flatten(1))
    return torch.cat(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2p], x[2p+1]) as complex numbers by angle p; math in float32, returns x's dtype.

    x [..., T, heads, D]; cos, sin [..., T, D/2] (the same rotation for every head). One Triton kernel where the
    triton backend serves (CUDA inference), else `apply_rope_reference`.
    """
    if cos.shape[:-1] == x.shape[:-2] and backend_for(x) == "triton":
        from .kernels.triton_norm import apply_rope_triton
        return apply_rope_triton(x, cos, sin)
    return apply_rope_reference(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in plain PyTorch (same arguments and result)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [..., T, heads, D/2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
