"""Routed-expert computation: tokens grouped by expert, one SwiGLU per expert, weighted un-permute.

`moe_experts` is the op the model calls; it picks a path per call:
- triton: `triton_moe` (grouped GEMM over the stacked weights, SwiGLU in the first GEMM's epilogue);
- torch: token-expert slots sorted by expert, two `grouped_mm` calls over the stacked weights (forward and
  backward), or a loop over only the experts that received tokens where `grouped_mm` is unavailable or slower
  (float32 inference on CPU, see `grouped_linear`). Each expert's weights are used in place and read once per
  call, so one decode token costs the reads of its k experts.
`moe_experts_reference` is the plain version tests compare to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import backend_for
from .linear import linear
from .quant import QuantWeight, quant_matmul


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]) for every token; returns [T, H] in x's dtype.

    x [T, H]; ids, weights [T, k]; gate_up_proj [E, 2I, H] (gate rows first); down_proj [E, H, I]: tensors, or
    `QuantWeight` stacks (quantized experts: the Triton kernels dequantize in their inner loop; the torch path runs
    one quantized product per used expert).
    """
    if ids.numel() == 0:  # no tokens
        return x.new_zeros(x.shape)
    if isinstance(gate_up_proj, PrepackedStack):
        return moe_experts_grouped(x, ids, weights, gate_up_proj, down_proj)
    if isinstance(gate_up_proj, QuantWeight):
        if gate_up_proj.layout == "canonical" and backend_for(x, weights, gate_up_proj.scale) == "triton":
            from .triton_moe import moe_experts_triton
            return moe_experts_triton(x, ids, weights, gate_up_proj, down_proj)
        return moe_experts_grouped(x, ids, weights, gate_up_proj, down_proj)
    if backend_for(x, weights, gate_up_proj, down_proj) == "triton":
        from .triton_moe import moe_experts_triton
        return moe_experts_triton(x, ids, weights, gate_up_proj, down_proj)
    return moe_experts_grouped(x, ids, weights, gate_up_proj, down_proj)


class PrepackedStack(tuple):
    """A stack of expert weights [E, N, K] held as one prepacked oneDNN tensor per expert (`linear.prepack_weight`;
    `kimivl.prepack`): what `moe_experts` takes in place of a stacked tensor on CPU, for inference."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self[0].shape))


def moe_experts_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                          down_proj: torch.Tensor) -> torch.Tensor:
    """The reference: tokens sorted by expert and a loop over only the experts that received any; expert outputs
    are scaled by their float32 weights and summed in float32, then cast once (the official inference order)."""
    T, k = ids.shape
    if ids.numel() == 0:
        return x.new_zeros(x.shape)
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


def dispatch(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-expert slots grouped by expert, without a host sync (so a CUDA graph can capture it).

    ids [T, k] -> order [T*k] (slot indices sorted by expert, stable), counts [E] (slots per expert), ends [E]
    (int32 cumulative counts: expert e owns sorted rows ends[e-1]:ends[e]). Slot s is token s // k.
    """
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    # a scatter, not bincount: CUDA's bincount reads the largest id back to the host, which a CUDA graph cannot hold
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts, counts.cumsum(0).to(torch.int32)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i: for each slot, the sorted row that holds it."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def grouped_linear(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """xs [N, in] (rows grouped by expert), w [E, out, in] -> [N, out]: each group times its expert's w.T.

    Inference in float32 on CPU loops over the experts that got rows with `kernels.linear`: torch's CPU grouped_mm
    multiplies as x @ w^T, the slow form there (one A3B MoE layer, 32 decode rows: 493 against 294 ms; 512 prefill
    tokens: 1,379 against 1,196; one row: the same). Quantized w (`QuantWeight`): `quant_matmul` per used expert;
    prepacked w (`PrepackedStack`): oneDNN's product per used expert (through `kernels.linear`)."""
    def per_expert(product) -> torch.Tensor:
        parts = [product(xe, w[e]) for e, xe in enumerate(xs.split(counts.tolist())) if xe.shape[0]]
        return torch.cat(parts) if parts else xs.new_empty(0, w.shape[1])

    if isinstance(w, QuantWeight):
        return per_expert(quant_matmul)
    if isinstance(w, PrepackedStack) or (xs.device.type == "cpu" and xs.dtype == torch.float32 and not (
            torch.is_grad_enabled() and (xs.requires_grad or w.requires_grad))):
        return per_expert(linear)
    if grouped_mm_usable(xs, w):
        return F.grouped_mm(xs, w.transpose(1, 2), offs=ends)
    return per_expert(F.linear)


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped GEMM serves x [N, in] times w [E, out, in]: any float dtype on CPU, bfloat16 on CUDA SM80+,
    and rows of both in and out widths 16-byte aligned (it rejects other strides)."""
    if not hasattr(F, "grouped_mm") or (w.shape[2] * x.element_size()) % 16 or (w.shape[1] * x.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def moe_experts_grouped(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                        down_proj: torch.Tensor) -> torch.Tensor:
    """The torch fast path: sort by expert, two grouped GEMMs over the stacked weights, weighted un-permute."""
    order, counts, ends = dispatch(ids, gate_up_proj.shape[0])
    k = ids.shape[1]
    if torch.is_grad_enabled() and x.requires_grad:
        # each token copied k times, then permuted: gathering rows order // k of x instead would make the backward
        # sum duplicate rows in a thread-dependent order on CPU, and training would not repeat bit for bit
        xs = x.repeat_interleave(k, dim=0).index_select(0, order)  # [T*k, H] grouped by expert
    else:  # inference gathers each token's row k times straight from x (no T*k copy first)
        xs = x.index_select(0, order // k)
    gate, up = grouped_linear(xs, gate_up_proj, counts, ends).chunk(2, dim=-1)  # [T*k, I]
    y = grouped_linear(F.silu(gate) * up, down_proj, counts, ends)  # [T*k, H]
    return combine(y, order, weights).to(x.dtype)


def combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted un-permute: y [T*k, H] holds slot order[i] in row i; out[t] = sum_j weights[t, j] * (row of slot
    (t, j)), in float32 -> [T, H]. A gather and a batched [1, k] x [k, H] product (on CPU several times faster than
    index_add's scatter). Gathers are index_select: CPU's advanced indexing y[idx] copies rows 5-10x slower (8,192
    prefill tokens of an A3B MoE layer: 330 ms for one gather)."""
    T, k = weights.shape
    rows = y.index_select(0, inverse_permutation(order)).float().view(T, k, -1)  # [T, k, H] in slot order
    return torch.bmm(weights.float()[:, None, :], rows)[:, 0]
