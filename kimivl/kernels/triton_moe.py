"""Triton routed experts: a grouped GEMM over the stacked expert weights with per-expert row offsets.

1. dispatch (torch ops, no host sync): slots sorted by expert, per-expert row ranges, and for every row block the
   expert it belongs to;
2. gate/up GEMM: rows gathered straight from x through the sort order, gate and up accumulated side by side,
   SwiGLU applied in the epilogue: h [T*k, I] in x's dtype;
3. down GEMM: y = h @ down[e].T, rounded to x's dtype (the official order), times the slot's float32 weight;
4. combine: out[t] = sum over its k slots, in a fixed order (no atomics: deterministic), cast to x's dtype.
Quantized experts (`kernels.quant.QuantWeight`, canonical layout) go through the same GEMMs with each weight tile
dequantized in the inner loop (w8a16 / w4a16): int8 times its row's scale, or int4 nibbles (stored + 8, the even
input in the low nibble) times their group's scale, rounded to x's dtype before the dot, as the float weights would
be.
Imported only when the triton backend is chosen; on CPU tensors the kernels run in the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import tl_precision
from .moe import dispatch, inverse_permutation
from .quant import QuantWeight

# Tile shapes per regime: few rows per expert (decode: the weights stream through once, reading them is the cost)
# and many (prefill: a real GEMM). num_warps / num_stages are Triton's launch options. Decode: narrower, deeper tiles
# (more programs, fewer serial steps) took an H200's batch-1 A3B step from 10.4 to 9.3 ms and batch 32 from 22.2 to
# 17.2 ms (gpu_check's profile section, 2026-12-04; 64-wide 128-deep tiles were within 0.1 ms of it).
DECODE_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)
PREFILL_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


@triton.jit
def _block_rows(e, starts_ptr, ends_ptr, block_first_ptr, BLOCK_M: tl.constexpr):
    """The sorted rows of this program's row block of expert e, and which of them exist."""
    start = tl.load(starts_ptr + e)
    rows = start + (tl.program_id(0) - tl.load(block_first_ptr + e)) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < tl.load(ends_ptr + e)


@triton.jit
def _weight_tile(w_ptr, s_ptr, e, n, ks, mask, stride_we, stride_wn, stride_se, stride_sn, dtype,
                 BITS: tl.constexpr, GROUP: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile W[e, n, ks]^T in `dtype`: loaded (BITS 0: float weights) or dequantized (8: int8
    with a scale per row n; 4: packed int4 with a scale per GROUP inputs)."""
    row = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    if BITS == 0:
        return tl.load(row + ks[:, None], mask=mask, other=0.0)
    srow = s_ptr + e.to(tl.int64) * stride_se + n[None, :].to(tl.int64) * stride_sn
    if BITS == 8:
        q = tl.load(row + ks[:, None], mask=mask, other=0).to(tl.float32)
        scale = tl.load(srow, mask=mask, other=0.0).to(tl.float32)
    else:
        byte = tl.load(row + (ks // 2)[:, None], mask=mask, other=0).to(tl.int32)
        q = ((byte >> ((ks % 2) * 4)[:, None]) & 15).to(tl.float32) - 8.0
        scale = tl.load(srow + (ks // GROUP)[:, None], mask=mask, other=0.0).to(tl.float32)
    return (q * scale).to(dtype)


@triton.jit
def _gate_up_kernel(x_ptr, order_ptr, w_ptr, s_ptr, h_ptr, block_expert_ptr, block_first_ptr, starts_ptr, ends_ptr,
                    E, H, I, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """h[rows, n] = silu(x[tok] @ gate[e].T) * (x[tok] @ up[e].T) for one row block of one expert."""
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e >= E:  # past the last row block in use
        return
    rows, row_ok = _block_rows(e, starts_ptr, ends_ptr, block_first_ptr, BLOCK_M)
    token = tl.load(order_ptr + rows, mask=row_ok, other=0) // TOP_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + token[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = col_ok[None, :] & k_ok[:, None]
        gate = _weight_tile(w_ptr, s_ptr, e, cols, ks, w_mask, stride_we, stride_wn, stride_se, stride_sn, a.dtype,
                            BITS, GROUP)  # gate rows 0..I-1, up rows I..2I-1
        up = _weight_tile(w_ptr, s_ptr, e, cols + I, ks, w_mask, stride_we, stride_wn, stride_se, stride_sn, a.dtype,
                          BITS, GROUP)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, order_ptr, slot_w_ptr, y_ptr, block_expert_ptr, block_first_ptr, starts_ptr,
                 ends_ptr, E, H, I, stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 BITS: tl.constexpr, GROUP: tl.constexpr):
    """y[rows, n] = float(round(h[rows] @ down[e].T)) * weight of the row's slot (float32)."""
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e >= E:  # past the last row block in use
        return
    rows, row_ok = _block_rows(e, starts_ptr, ends_ptr, block_first_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, e, cols, ks, col_ok[None, :] & k_ok[:, None], stride_we, stride_wn, stride_se,
                         stride_sn, a.dtype, BITS, GROUP)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    slot_w = tl.load(slot_w_ptr + tl.load(order_ptr + rows, mask=row_ok, other=0), mask=row_ok, other=0.0)
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * slot_w[:, None]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, row_of_slot_ptr, out_ptr, T, H, stride_y, stride_out,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j y[row of slot (t, j)], summed in slot order."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = tokens < T
    mask = t_ok[:, None] & (cols[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(row_of_slot_ptr + tokens * TOP_K + j, mask=t_ok, other=0)
        acc += tl.load(y_ptr + row[:, None].to(tl.int64) * stride_y + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + tokens[:, None].to(tl.int64) * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def row_blocks(counts: torch.Tensor, block_m: int, max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `max_blocks` row blocks, the expert it belongs to (E past the last block in use) and, per expert,
    the index of its first block. Expert e has ceil(counts[e] / block_m) blocks."""
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    block_expert = torch.searchsorted(block_end, torch.arange(max_blocks, device=counts.device), right=True)
    return block_expert, block_end - blocks


def _operands(w: torch.Tensor | QuantWeight, x: torch.Tensor) -> tuple:
    """(weights, scales, stride_we, stride_wn, stride_se, stride_sn, bits, group) for the kernels: float weights have
    no scales (x stands in for the unused pointer) and bits 0."""
    if not isinstance(w, QuantWeight):
        w = w.contiguous()
        return w, x, w.stride(0), w.stride(1), 0, 0, 0, 1
    if w.layout != "canonical":
        raise ValueError(f"the Triton expert kernels read the canonical quantized layout, not {w.layout!r}")
    data, scale = w.data.contiguous(), w.scale.contiguous()
    return data, scale, data.stride(0), data.stride(1), scale.stride(0), scale.stride(1), w.bits, w.group or 1


def moe_experts_triton(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       gate_up_proj: torch.Tensor | QuantWeight, down_proj: torch.Tensor | QuantWeight
                       ) -> torch.Tensor:
    """`moe_experts` through the Triton kernels; same arguments (float or quantized experts) and result."""
    T, k = ids.shape
    E, two_i, H = gate_up_proj.shape
    I = two_i // 2
    n = T * k
    out = torch.empty(T, H, device=x.device, dtype=x.dtype)
    if n == 0:
        return out
    x = x.contiguous()
    gu, gu_s, gu_we, gu_wn, gu_se, gu_sn, bits, group = _operands(gate_up_proj, x)
    dn, dn_s, dn_we, dn_wn, dn_se, dn_sn, _, _ = _operands(down_proj, x)
    order, counts, ends = dispatch(ids, E)
    tiles = DECODE_TILES if n <= 16 * E else PREFILL_TILES  # few rows per expert (decode): small blocks waste less
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    # every expert's last block may be partial; at most min(E, n) experts have rows
    num_blocks = n // block_m + min(E, n)
    meta = (*row_blocks(counts, block_m, num_blocks), ends - counts, ends)
    precision = tl_precision(x.dtype)

    h = torch.empty(n, I, device=x.device, dtype=x.dtype)  # sorted rows
    _gate_up_kernel[(num_blocks, triton.cdiv(I, block_n))](
        x, order, gu, gu_s, h, *meta, E, H, I, x.stride(0), gu_we, gu_wn, gu_se, gu_sn, h.stride(0), TOP_K=k,
        PRECISION=precision, BITS=bits, GROUP=group, **tiles)
    y = torch.empty(n, H, device=x.device, dtype=torch.float32)
    _down_kernel[(num_blocks, triton.cdiv(H, block_n))](
        h, dn, dn_s, order, weights.contiguous().view(-1).float(), y, *meta, E, H, I, h.stride(0), dn_we, dn_wn,
        dn_se, dn_sn, y.stride(0), PRECISION=precision, BITS=bits, GROUP=group, **tiles)
    row_of_slot = inverse_permutation(order)
    block_t, block_h = 16, 64
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        y, row_of_slot, out, T, H, y.stride(0), out.stride(0), TOP_K=k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out
