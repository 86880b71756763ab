"""Variable-length (packed) attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     causal: bool = False) -> torch.Tensor:
    """Attention within each packed sequence: q, k, v [L, heads, D]; sequence i is rows cu[i]:cu[i+1].

    Reference path: one SDPA call per sequence (on CPU this beat one call with a block-diagonal mask by 2x and
    needs no L x L memory).
    """
    bounds = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=causal).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)
