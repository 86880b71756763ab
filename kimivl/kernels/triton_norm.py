"""Triton RMSNorm and rotary embedding: one launch each where the torch versions (`decoder.rms_norm_reference`,
`rope.apply_rope_reference`) take six to ten small ones. In a batch-1 A3B decode step such elementwise launches are
most of the ~4,900 kernels (each ~2 us on an H200, even replayed from a CUDA graph), so they matter there and nowhere
else. Imported only when the triton backend is chosen; on CPU tensors the kernels run in the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_out, eps, BLOCK_D: tl.constexpr):
    """out[row] = w * round_x(x * rsqrt(mean(x^2) + eps)), the statistics in float32: torch's order and roundings."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` in one kernel: x [..., D] (rows may be strided, the last dimension contiguous)."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)  # a view for the cache's split latents; a copy only for odd layouts
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, D, rows.stride(0), out.stride(0), float(eps),
                                           BLOCK_D=triton.next_power_of_2(D))
    return out.view(*x.shape[:-1], D)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, P, stride_xn, stride_xh, stride_cn, stride_sn,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pairs (x[2p], x[2p+1]) of token n, heads of this block, turned by angle p of token n, in float32."""
    n = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < P
    ok = (heads < H)[:, None] & p_ok[None, :]
    src = x_ptr + n * stride_xn + heads[:, None] * stride_xh + 2 * ps[None, :]
    x0 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + n * stride_cn + ps, mask=p_ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + n * stride_sn + ps, mask=p_ok, other=0.0)[None, :]
    dst = out_ptr + (n * H + heads[:, None]) * (2 * P) + 2 * ps[None, :]
    tl.store(dst, (x0 * c - x1 * s).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + 1, (x0 * s + x1 * c).to(out_ptr.dtype.element_ty), mask=ok)


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope_reference` in one kernel: x [..., heads, D] (heads and tokens may be strided), cos, sin
    [..., D/2] with x's leading shape (float32) -> a new contiguous tensor in x's dtype."""
    *lead, H, D = x.shape
    flat = x.reshape(-1, H, D)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    cos, sin = cos.reshape(-1, D // 2), sin.reshape(-1, D // 2)
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    N = flat.shape[0]
    if N and H:
        block_h = min(16, triton.next_power_of_2(H))
        _rope_kernel[(N, triton.cdiv(H, block_h))](
            flat, cos, sin, out, H, D // 2, flat.stride(0), flat.stride(1), cos.stride(0), sin.stride(0),
            BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(D // 2))
    return out
