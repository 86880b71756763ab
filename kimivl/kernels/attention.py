"""Attention for packed (variable-length) sequences and for full-sequence causal prefill.

On CUDA with flash-attn installed (and KIMIVL_BACKEND not forcing torch), half-precision inputs go to flash-attn
(varlen for packed sequences, no mask ever built); everything else uses PyTorch SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import flash_attn_usable


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     causal: bool = False) -> torch.Tensor:
    """Attention within each packed sequence: q, k, v [L, heads, D]; sequence i is rows cu[i]:cu[i+1] (int32).
    Scale 1/sqrt(D). Returns [L, heads, D]."""
    if flash_attn_usable(q):
        from flash_attn import flash_attn_varlen_func
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=causal)
    return varlen_attention_reference(q, k, v, cu_seqlens, causal)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               causal: bool = False) -> torch.Tensor:
    """The torch path and reference: one SDPA call per sequence (no L x L mask), on [1, heads, len, D] views: 4-D
    inputs reach the fused (flash) CPU kernel, 3-D ones fall back to the unfused math path (4x slower for a
    1024-patch image at the a3b widths)."""
    bounds = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(q[None, s:e].transpose(1, 2), k[None, s:e].transpose(1, 2),
                                           v[None, s:e].transpose(1, 2), is_causal=causal)[0].transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """Full-sequence attention: q, k [B, heads, T, Dqk], v [B, heads, T, Dv] -> [B, heads, T, Dv].

    mask: bool [B, 1, T, T] (True = attend) or None for plain causal. v narrower than q and k (MLA: 128 against 192)
    is zero-padded to their head size and the padding sliced off the output, which changes nothing in the result but
    selects the fused kernels: SDPA's flash kernel on CPU (the unfused math path it otherwise takes builds every
    [T, T] score matrix: 2-3x slower at 2k-8k tokens, memory quadratic in T) and flash-attn 2, which causal calls
    without a mask go to when usable; else SDPA.
    """
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None and v.shape[-1] == q.shape[-1] and flash_attn_usable(q):
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=True).transpose(1, 2)  # [B, heads, T, Dqk]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out[..., :dv]
