"""Triton MLA decode attention over the latent cache (spec 8.1; `mla.absorbed_attention_reference` is the reference).

The small per-head projections stay in torch (q_latent = q_nope @ W_uk before, context @ W_uv^T after); the kernel
does the part that reads the cache, flash-decoding style: one program per (batch row, query, block of heads, range of
slots) walks its cached slots in blocks with an online softmax (running max and sum in float32), and each
[BLOCK_S, C] latent tile is read once for the whole block of heads (all heads share the latent), serving both the
scores and the weighted sum. When there are few (row, query) pairs for a long cache (batch-1 decoding), the slots are
split into ranges so that the whole GPU reads the cache, and a second small kernel merges the ranges' partial results
by their log-sum-exp.
Imported only when the triton backend is chosen; on CPU tensors the kernel runs in the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import tl_precision
from .mla import absorb_weights

BLOCK_H = 16  # heads per program: tl.dot needs at least 16 rows (the real model has 16 heads)
TILE_BYTES = 32 * 1024  # bytes of one latent tile: two pipeline stages stay well inside shared memory
SPLIT_PROGRAMS = 264  # programs to aim for when splitting the cached slots: two per multiprocessor of an H100/H200
# slots per split at least: on an H200 the batch-1 A3B step over 1k cached tokens took 5.13 ms with 256, 4.86 with
# 128 and 4.87 with 64 (gpu_check's profile section, 2026-12-04); shorter ranges only add partials to merge
MIN_SPLIT_SLOTS = 128


@triton.jit
def _mla_decode_kernel(q_ptr, q_pe_ptr, latent_ptr, k_pe_ptr, mask_ptr, lens_ptr, out_ptr, lse_ptr, T, S, H, C, R,
                       split_len, stride_qb, stride_qt, stride_qh, stride_pb, stride_pt, stride_ph, stride_lb,
                       stride_ls, stride_kb, stride_ks, stride_mb, stride_mt, stride_ms, stride_ob, stride_ot, stride_oh,
                       stride_os, scale, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                       PRECISION: tl.constexpr):
    """context[b, t, heads] = softmax_s((q_latent . latent_s + q_pe . k_pe_s) * scale, masked) @ latent, over the
    first S slots, or the first lens[b] when HAS_LENS (read on the device: a captured CUDA graph replays unchanged
    while the cache grows). Program (b*T + t, head block, split) covers slots [split * split_len, + split_len).
    SPLIT: write this split's normalised partial context (float32) to out[..., split, :] and its log-sum-exp to lse
    (-inf when it saw nothing), for `_mla_combine_kernel`; else write the context itself."""
    b = (tl.program_id(0) // T).to(tl.int64)  # int64: B * S * C may pass 2^31
    if HAS_LENS:
        S = tl.minimum(tl.load(lens_ptr + b), S)
    t = tl.program_id(0) % T
    split = tl.program_id(2)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cs = tl.arange(0, BLOCK_C)
    rs = tl.arange(0, BLOCK_R)
    h_ok = heads < H
    c_ok = cs < C
    r_ok = rs < R
    dot_ty = latent_ptr.dtype.element_ty

    q = tl.load(q_ptr + b * stride_qb + t * stride_qt + heads[:, None] * stride_qh + cs[None, :],
                mask=h_ok[:, None] & c_ok[None, :], other=0.0).to(dot_ty)  # [BLOCK_H, BLOCK_C]
    q_pe = tl.load(q_pe_ptr + b * stride_pb + t * stride_pt + heads[:, None] * stride_ph + rs[None, :],
                   mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(dot_ty)  # [BLOCK_H, BLOCK_R]

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max of the scores
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    first = split * split_len
    last = tl.minimum(first + split_len, S)
    for s0 in range(first, last, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < last
        lat = tl.load(latent_ptr + b * stride_lb + ss[:, None] * stride_ls + cs[None, :],
                      mask=s_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_C]
        kpe = tl.load(k_pe_ptr + b * stride_kb + ss[:, None] * stride_ks + rs[None, :],
                      mask=s_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_R]
        scores = tl.dot(q, tl.trans(lat), input_precision=PRECISION)
        scores = tl.dot(q_pe, tl.trans(kpe), scores, input_precision=PRECISION) * scale  # [BLOCK_H, BLOCK_S]
        keep = s_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * stride_mb + t * stride_mt + ss * stride_ms, mask=s_ok, other=0) != 0)
        scores = tl.where(keep[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep exp() away from -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(dot_ty), lat, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_offs = b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + split * stride_os + cs[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
    if SPLIT:
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + (b * T + t) * H * tl.num_programs(2) + heads * tl.num_programs(2) + split, lse, mask=h_ok)


@triton.jit
def _mla_combine_kernel(part_ptr, lse_ptr, out_ptr, T, H, C, SPLITS, stride_pb, stride_pt, stride_ph, stride_ps,
                        stride_ob, stride_ot, stride_oh, BLOCK_C: tl.constexpr):
    """out[b, t, head] = sum_s exp(lse_s - max) * part_s / sum_s exp(lse_s - max), over the splits that saw slots."""
    b = (tl.program_id(0) // T).to(tl.int64)
    t = tl.program_id(0) % T
    h = tl.program_id(1)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    m = tl.full((), float("-inf"), dtype=tl.float32)
    den = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(0, SPLITS):
        lse = tl.load(lse_ptr + ((b * T + t) * H + h) * SPLITS + s)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        part = tl.load(part_ptr + b * stride_pb + t * stride_pt + h * stride_ph + s * stride_ps + cs, mask=c_ok,
                       other=0.0)
        acc = acc * alpha + w * part
        den = den * alpha + w
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + cs, out.to(out_ptr.dtype.element_ty),
             mask=c_ok)


def num_splits(programs: int, S: int, block_s: int) -> tuple[int, int]:
    """How many slot ranges each (row, query, head block) is split into, and the slots per range (a multiple of
    block_s): enough programs to fill a large GPU (SPLIT_PROGRAMS), ranges of at least MIN_SPLIT_SLOTS."""
    splits = max(1, min(SPLIT_PROGRAMS // max(programs, 1), triton.cdiv(S, MIN_SPLIT_SLOTS)))
    split_len = triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    return triton.cdiv(S, split_len) if S else 1, split_len


def latent_attention_triton(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                            mask: torch.Tensor | None, scale: float, kv_lens: torch.Tensor | None = None,
                            splits: int | None = None) -> torch.Tensor:
    """The kernel: q_latent [B, T, heads, C], q_pe [B, T, heads, rope], latent [B, S, C], k_pe [B, S, rope], mask bool
    [B, 1, T, S] or None, kv_lens int32 [B] or None (row b reads only its first kv_lens[b] slots) -> context
    [B, T, heads, C] in latent's dtype. Strided views (a cache slice) are read in place; only the last dimension must
    be contiguous. Few (row, query) pairs over a long cache split the slots into ranges read in parallel, then
    combined (flash-decoding); `splits` overrides the choice (tests)."""
    B, T, H, C = q_latent.shape
    S, R = latent.shape[1], k_pe.shape[-1]
    q_latent, q_pe, latent, k_pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_latent, q_pe, latent, k_pe))
    out = torch.empty(B, T, H, C, device=latent.device, dtype=latent.dtype)
    if out.numel() == 0:
        return out
    if mask is not None:
        mask = mask.expand(B, 1, T, S)
    block_c = max(16, triton.next_power_of_2(C))
    block_s = min(64, max(16, TILE_BYTES // (block_c * latent.element_size())))  # powers of two: 32 for bf16 C=512
    head_blocks = triton.cdiv(H, BLOCK_H)
    n_splits, split_len = num_splits(B * T * head_blocks, S, block_s)
    if splits is not None:
        n_splits, split_len = splits, triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    if n_splits > 1:  # float32 partials [B, T, H, splits, C] and their log-sum-exps
        part = torch.empty(B, T, H, n_splits, C, device=latent.device, dtype=torch.float32)
        lse = torch.empty(B, T, H, n_splits, device=latent.device, dtype=torch.float32)
        target, target_strides = part, part.stride()[:4]
    else:
        target, lse, target_strides = out, out, (*out.stride()[:3], 0)
    _mla_decode_kernel[(B * T, head_blocks, n_splits)](
        q_latent, q_pe, latent, k_pe, mask if mask is not None else latent,
        kv_lens.to(torch.int32) if kv_lens is not None else latent, target, lse, T, S, H, C, R, split_len,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1),
        *((mask.stride(0), mask.stride(2), mask.stride(3)) if mask is not None else (0, 0, 0)),
        *target_strides, float(scale),
        HAS_MASK=mask is not None, HAS_LENS=kv_lens is not None, SPLIT=n_splits > 1, BLOCK_H=BLOCK_H,
        BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(R)),
        PRECISION=tl_precision(latent.dtype), num_stages=2)
    if n_splits > 1:
        _mla_combine_kernel[(B * T, H)](part, lse, out, T, H, C, n_splits, *part.stride()[:4], *out.stride()[:3],
                                        BLOCK_C=block_c)
    return out


def absorbed_attention_triton(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                              kv_b_weight: torch.Tensor, mask: torch.Tensor | None, scale: float,
                              kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """`absorbed_attention` with the cache-reading part in the Triton kernel; same arguments and result."""
    w_uk, w_uv = absorb_weights(kv_b_weight, q_nope.shape[2], q_nope.shape[3])
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # [B, T, heads, C]
    context = latent_attention_triton(q_latent, q_pe, latent, k_pe, mask, scale, kv_lens)  # [B, T, heads, C]
    return torch.einsum("bthc,hvc->bthv", context, w_uv)
