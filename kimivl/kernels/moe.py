"""Routed-expert computation: tokens grouped by expert, one SwiGLU per expert, weighted un-permute."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]) for every token; returns [T, H] in x's dtype.

    x [T, H]; ids, weights [T, k]; gate_up_proj [E, 2I, H] (gate rows first); down_proj [E, H, I].
    Reference path: tokens sorted by expert and a loop over only the experts that received any; expert outputs are
    scaled by their float32 weights and summed in float32, then cast once (the official inference order).
    """
    T, k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)  # [T*k] slots grouped by expert
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()
    token = order // k
    outs = []
    for e, xe in enumerate(x[token].split(counts)):
        if xe.shape[0]:
            gate, up = F.linear(xe, gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, down_proj[e]))
    y = torch.cat(outs).float() * weights.flatten()[order, None]  # [T*k, H]
    return torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32).index_add_(0, token, y).to(x.dtype)
