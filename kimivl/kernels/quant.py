"""Weight-only quantization: symmetric int8 per output channel and int4 in groups along the input, and x @ W^T with
such weights.

The canonical form is the compressed-tensors `pack-quantized` one (what llm-compressor writes and vLLM loads):
- int8: values q in [-128, 127], one scale per output row: W ~ q * scale[n].
- int4: values q in [-8, 7], one scale per `group` consecutive inputs of a row: W ~ q * scale[n, k // group]. Two
  values a byte, stored + 8, the even input in the low nibble: byte j of a row = (q[2j] + 8) | (q[2j + 1] + 8) << 4
  (the little-endian byte view of compressed-tensors' int32 words).
Scales are bfloat16 values (a float32 scale would not survive the bfloat16 file, and the CPU kernels take bfloat16),
chosen as llm-compressor's min-max observer does: amax / 127.5 (int8), amax / 7.5 (int4), values rounded to the
nearest step and clamped to the range; the scale is rounded up to bfloat16 where needed so nothing is clipped.

`QuantWeight` holds one weight ([N, K]) or a stack of them ([E, N, K], routed experts); `quant_matmul` multiplies.
On a CPU with fast bfloat16 (AVX512-BF16 / AMX: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`), int4 weights are
held in the layout of torch's `_weight_int4pack_mm_for_cpu` (same bytes per weight, CPU-specific order) and int8 ones
go through `_weight_int8pack_mm` for few rows, both with bfloat16 activations; elsewhere, and for many int8 rows,
weights are dequantized in blocks of rows and multiplied (`dequantize` is also the reference tests compare to).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
QMAX = {8: 127, 4: 7}
DEQUANT_ROWS = 4096  # output rows dequantized at a time by the generic path (a 2,048-wide float32 block: 32 MiB)
# ... and for fewer than INT8PACK_MAX_ROWS input rows: a block that stays in cache (2,048 wide: 4 MiB in float32).
# Forcing this path on the AVX-512 EPYC, int8, 2816 x 2048, 1 row: 1.08 ms against float32's 1.28 (4,096 rows: 1.48)
FEW_ROWS_BLOCK = 512
CONVERT_ROWS = 4096  # rows converted to the CPU int4 kernel's layout at a time (a 2,048-wide int32 block: 32 MiB)
INT8PACK_MAX_ROWS = 32  # from 32 input rows, dequantize-to-bfloat16 + GEMM beats _weight_int8pack_mm (AVX512 here)


def scheme_bits(scheme: str, group_size: int | None) -> tuple[int, int | None]:
    """("int8" | "int4", group size) -> (bits, group or None for per-channel), checked."""
    if scheme not in SCHEMES:
        raise InputError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "int8":
        return 8, None
    group_size = 128 if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise InputError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return 4, group_size


@functools.cache
def cpu_bf16_fast() -> bool:
    """oneDNN calls this CPU bfloat16-capable (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: an AVX-512 CPU; the
    one measured here also has AVX512_BF16), which torch's bfloat16 GEMMs and int8 / int4 CPU kernels need to be
    fast. On an AVX2-only CPU it is False, and bfloat16 matmuls run at well under 1 GFLOP/s."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---- the canonical form -----------------------------------------------------------------------------------------
def quantize(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (any float dtype) -> (data, scale): int8 [..., N, K] and bfloat16 [..., N] (8 bits), or packed
    uint8 [..., N, K/2] and bfloat16 [..., N, K/group] (4 bits)."""
    w = w.float()
    if bits == 8:
        scale = _scale(w.abs().amax(-1), 8)
        return (w / scale.float()[..., None]).round_().clamp_(-128, 127).to(torch.int8), scale
    u, scale = int4_values(w, group)
    return _pack_nibbles(u), scale


def int4_values(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q + 8 as uint8 [..., N, K], one value a byte; scale bfloat16 [..., N, K/group]): int4
    quantization before packing (in place on one temporary: loading a 16B-weight model quantizes every weight)."""
    w = w.float()
    if w.shape[-1] % group:
        raise InputError(f"int4 groups of {group} do not divide the input width {w.shape[-1]}")
    g = w.unflatten(-1, (-1, group))  # [..., N, K/group, group]
    scale = _scale(g.abs().amax(-1), 4)
    u = (g / scale.float()[..., None]).round_().clamp_(-8, 7).add_(8).to(torch.uint8)
    return u.flatten(-2), scale


def _scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """amax / (qmax + 0.5) as bfloat16, rounded up where rounding to nearest went down, so that no value lies past
    the top step: every weight is then within half a step of its quantized value. An all-zero row or group gets the
    smallest normal scale (any scale gives q = 0 there)."""
    exact = (amax / (QMAX[bits] + 0.5)).clamp(min=torch.finfo(torch.bfloat16).tiny)
    scale = exact.to(torch.bfloat16)
    return torch.where(scale.float() < exact, (scale.view(torch.int16) + 1).view(torch.bfloat16), scale)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., K] (K even) -> uint8 [..., K/2], the even element in the low nibble."""
    return _pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4` inverted: uint8 [..., K/2] -> int8 [..., K] in [-8, 7]."""
    return _unpack_nibbles(packed).to(torch.int8) - 8


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [..., K] -> [..., K/2], the even element in the low nibble."""
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """`_pack_nibbles` inverted."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize(data: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """The canonical form back to float: [..., N, K] = q * scale, computed in float32 (the reference)."""
    if bits == 8:
        return (data.float() * scale.float()[..., None]).to(dtype)
    q = unpack_int4(data).float().unflatten(-1, (scale.shape[-1], -1))  # [..., N, K/group, group]
    return (q * scale.float()[..., None]).flatten(-2).to(dtype)


# ---- the CPU int4 kernel's layout -------------------------------------------------------------------------------
def to_cpu_int4(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int4 (data [N, K/2], scale [N, K/group]) -> the operands of `_weight_int4pack_mm_for_cpu`: weights
    uint8 [N, K/2] in the kernel's own order, scales-and-zeros bfloat16 [K/group, N, 2] (zeros 0: symmetric; the
    kernel computes (u - 8) * scale + zero from the stored u = q + 8)."""
    return cpu_int4_from_values(_unpack_nibbles(data), scale)


def cpu_int4_from_values(u: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_cpu_int4` from the unpacked values (`int4_values`: q + 8, uint8 [N, K]), skipping the canonical packing.
    Converted CONVERT_ROWS rows at a time (a multiple of the kernel's 64-row blocks, which convert independently), so
    the int32 temporary the kernel's converter takes stays small."""
    rows = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(u[i:i + CONVERT_ROWS].to(torch.int32), 1)
            for i in range(0, u.shape[0], CONVERT_ROWS)]
    zeros = torch.zeros_like(scale)
    return torch.cat(rows), torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous()


def from_cpu_int4(data: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_cpu_int4` inverted (exactly): the kernel itself applied to the identity with unit scales gives each
    weight's q, small integers that bfloat16 holds exactly. Costs a K x K x N product: for tests and the rare
    dequantization, never on the forward path."""
    K, N = scale_zeros.shape[0] * group, scale_zeros.shape[1]
    unit = torch.zeros(K // group, N, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1
    q = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), data, group, unit)
    return pack_int4(q.t().to(torch.int8)), scale_zeros[..., 0].t().contiguous()


# ---- weights and the product ------------------------------------------------------------------------------------
@dataclass
class QuantWeight:
    """One quantized weight [N, K] or a stack [E, N, K] (`w[e]` is expert e's, a view).

    layout "canonical": data / scale as `quantize` returns them; "cpu-int4": data / scale as `to_cpu_int4` returns
    them (int4 on a CPU with fast bfloat16)."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int | None
    shape: tuple[int, ...]  # the float weight's
    layout: str = "canonical"

    def __getitem__(self, e: int) -> "QuantWeight":
        return QuantWeight(self.data[e], self.scale[e], self.bits, self.group, self.shape[1:], self.layout)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(data, scale) in the canonical form, whatever the layout held."""
        if self.layout == "canonical":
            return self.data, self.scale
        if self.data.dim() == 2:
            return from_cpu_int4(self.data, self.scale, self.group)
        parts = [self[e].canonical() for e in range(self.data.shape[0])]
        return torch.stack([d for d, _ in parts]), torch.stack([s for _, s in parts])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        data, scale = self.canonical()
        return dequantize(data, scale, self.bits, dtype)


def held_layout(bits: int, device: torch.device, rows: int) -> str:
    """The layout a weight of `bits` and `rows` output rows is held in on `device`: "cpu-int4" for int4 on a
    fast-bfloat16 CPU (whose kernel takes output widths that are multiples of 16), else "canonical"."""
    return "cpu-int4" if bits == 4 and device.type == "cpu" and cpu_bf16_fast() and rows % 16 == 0 else "canonical"


def in_layout(data: torch.Tensor, scale: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A canonical 2-D weight (data, scale) in `layout`."""
    return to_cpu_int4(data, scale) if layout == "cpu-int4" else (data, scale)


def quantize_in_layout(w: torch.Tensor, bits: int, group: int | None, layout: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`in_layout(*quantize(w, ...), layout)` without packing values only to unpack them again."""
    if layout == "cpu-int4":
        return cpu_int4_from_values(*int4_values(w, group))
    return quantize(w, bits, group)


def quant_matmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ W^T for a 2-D quantized W [N, K] -> [..., N] in x's dtype (accumulated in float32 by every
    path). Few rows on a fast-bfloat16 CPU use torch's int8 / int4 kernels (bfloat16 activations, as the published
    model runs); otherwise blocks of W are dequantized to the compute dtype (bfloat16 on such a CPU, else x's) and
    multiplied, so the temporary stays within DEQUANT_ROWS rows."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if w.layout == "cpu-int4":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), w.data, w.group, w.scale)
    elif (w.bits == 8 and rows.device.type == "cpu" and cpu_bf16_fast() and rows.shape[0] < INT8PACK_MAX_ROWS
          and w.shape[-1] % 16 == 0):  # the kernel reads past the row for other input widths
        out = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), w.data, w.scale)
    else:
        dtype = torch.bfloat16 if rows.device.type == "cpu" and cpu_bf16_fast() else rows.dtype
        xr = rows.to(dtype)
        step = DEQUANT_ROWS if rows.shape[0] >= INT8PACK_MAX_ROWS else FEW_ROWS_BLOCK
        if w.bits == 8:  # one scale per output row: applied to the product, the block converts without it
            parts = [F.linear(xr, w.data[i:i + step].to(dtype)).float() * w.scale[i:i + step].float()
                     for i in range(0, w.shape[0], step)]
        else:
            parts = [F.linear(xr, dequantize(w.data[i:i + step], w.scale[i:i + step], w.bits, dtype))
                     for i in range(0, w.shape[0], step)]
        out = torch.cat(parts, dim=-1)
    return out.to(x.dtype).view(*x.shape[:-1], w.shape[0])


def quant_matmul_reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x @ dequantize(W)^T in float32: what every `quant_matmul` path is compared to."""
    return F.linear(x.float(), w.dequantize()).to(x.dtype)
