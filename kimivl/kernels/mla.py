"""MLA attention over the latent cache with weight absorption (the decode path)."""

from __future__ import annotations

import torch

from .backend import backend_for


def absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                       kv_b_weight: torch.Tensor, mask: torch.Tensor | None, scale: float,
                       kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new queries over cached latents, never expanding per-head keys or values.

    q_nope [B, T, heads, nope], q_pe [B, T, heads, rope] (rotated); latent [B, S, C] (normalised), k_pe [B, S, rope]
    (rotated); kv_b_weight [heads * (nope + v), C]; mask bool [B, 1, T, S] (True = attend) or None (every slot
    visible); kv_lens [B] or None: row b sees only its first kv_lens[b] slots (a tensor, so that a captured decode
    step reads a growing cache without re-capture). Returns [B, T, heads, v]. Dispatches to the Triton flash-decoding kernel or to
    `absorbed_attention_reference`.
    """
    if backend_for(q_nope, latent, kv_b_weight) == "triton":
        from .triton_mla import absorbed_attention_triton
        return absorbed_attention_triton(q_nope, q_pe, latent, k_pe, kv_b_weight, mask, scale, kv_lens)
    return absorbed_attention_reference(q_nope, q_pe, latent, k_pe, kv_b_weight, mask, scale, kv_lens)


def absorb_weights(kv_b_weight: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_weight [heads * (nope + v), C] -> W_uk [heads, nope, C] (keys), W_uv [heads, v, C] (values)."""
    w = kv_b_weight.unflatten(0, (heads, -1))  # [heads, nope + v, C]
    return w[:, :nope], w[:, nope:]


def absorbed_attention_reference(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                                 kv_b_weight: torch.Tensor, mask: torch.Tensor | None, scale: float,
                                 kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """`absorbed_attention` in plain PyTorch (same arguments and result).

    k_nope = latent @ W_uk^T per head, so q_nope . k_nope = (q_nope @ W_uk) . latent: queries are taken into the
    latent space; likewise softmax @ (latent @ W_uv^T) = (softmax @ latent) @ W_uv^T: values are projected out after
    attention. Every head reads the same latent and rope key, so heads and queries are folded into the rows of one
    matrix multiply per sequence ([heads * T, C] @ [C, S]) instead of broadcasting the cache to each head, which
    copies it. Scores are softmaxed in float32.
    """
    B, T, heads, _ = q_nope.shape
    w_uk, w_uv = absorb_weights(kv_b_weight, heads, q_nope.shape[3])
    q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk).flatten(1, 2)  # [B, heads * T, C]
    q_rope = q_pe.transpose(1, 2).flatten(1, 2)  # [B, heads * T, rope]
    if T == 1:  # decode: as (latent @ q^T)^T, the cache the row-major operand, which torch's CPU bfloat16 bmm
        # multiplies up to 9x faster than a transposed one for few rows (one sequence, 8,192 slots: 0.6 against 5.6 ms
        # a layer; the same at 32 sequences); for a chunk of 512 queries it is 1.1-1.35x slower
        scores = torch.baddbmm(latent @ q_latent.transpose(1, 2), k_pe, q_rope.transpose(1, 2)).transpose(1, 2)
    else:
        scores = torch.baddbmm(q_latent @ latent.transpose(1, 2), q_rope, k_pe.transpose(1, 2))  # [B, heads * T, S]
    scores = scores.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).view(B, heads, T, -1)
    if kv_lens is not None:
        within = torch.arange(latent.shape[1], device=latent.device) < kv_lens[:, None]  # [B, S]
        mask = within[:, None, None] if mask is None else mask & within[:, None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    context = scores.softmax(dim=-1).to(latent.dtype).flatten(1, 2) @ latent  # [B, heads * T, C]
    # values out as W_uv @ context^T, W_uv read row-major as stored: the einsum over it ("bhtc,hvc->bthv") copies the
    # transposed W_uv every call (bfloat16, one sequence: 0.56 against 0.14 ms a layer, the same numbers)
    context = context.view(B, heads, T, -1).permute(1, 3, 0, 2).reshape(heads, -1, B * T)  # [heads, C, B * T]
    return torch.bmm(w_uv, context).view(heads, -1, B, T).permute(2, 3, 0, 1)  # [B, T, heads, v]
