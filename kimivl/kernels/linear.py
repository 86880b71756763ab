"""Linear layers of the decoder: nn.Linear with a faster float32 CPU form for few rows, and weights prepacked in
oneDNN's blocked layout for CPU inference (`prepack_weight`, `kimivl.prepack`)."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .quant import cpu_bf16_fast


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias): `F.linear`, except for two or more rows in float32 on CPU, computed as
    (weight @ x^T)^T: the same products summed in another order. On the 2-core AVX2 CPU this project is measured on,
    torch 2.13's float32 GEMM runs `x @ weight^T` 1.5-4x slower for 2-32 rows and was never faster up to 512 (the
    A3B output head, 163,840 x 2,048, at 8 rows: 651 ms against 160 ms); for one row both forms take the same time.
    A prepacked weight (an opaque oneDNN tensor, `prepack_weight`) is multiplied by oneDNN directly."""
    if weight.is_mkldnn:
        return prepacked_linear(x, weight, bias)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() < 2
            or x.numel() == x.shape[-1]):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def prepackable(device: torch.device, dtype: torch.dtype) -> bool:
    """Weights of this device and dtype can be prepacked: CPU with oneDNN, float32, or bfloat16 where oneDNN runs it
    (an AVX-512 CPU: `cpu_bf16_fast`)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and (dtype == torch.float32 or dtype == torch.bfloat16 and cpu_bf16_fast()))


@cache
def prepacked_min_rows() -> int:
    """The fewest rows a prepacked product is given: 6 where oneDNN runs its AVX-512 kernels (`cpu_bf16_fast`: it
    asks oneDNN, which honours ONEDNN_MAX_CPU_ISA), which multiply 1-5 rows slower than 6 (zero rows are added and
    their outputs dropped), else 1. Measured on the 2-thread AVX512-BF16 EPYC, 64 expert weights 2,816 x 2,048 read
    in turn, ms per product for 1 / 2 / 4 / 6 / 8 rows: float32 0.89 / 1.03 / 0.81 / 0.74 / 0.94, bfloat16 0.53 /
    0.55 / 0.44 / 0.39 / 0.51; the A3B output head in bfloat16 24.5 / 27.5 / 21.5 / 20.7 / 24.9. Held to AVX2 the
    time only grows with the rows (0.90 / 1.01 / 1.12 / 1.20 / 1.32), and nothing is added."""
    return 6 if cpu_bf16_fast() else 1


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 or bfloat16 CPU weight [N, K] reordered into oneDNN's blocked layout for its matmul kernels (an
    opaque `is_mkldnn` tensor of the same size; `.to_dense()` gives the weight back exactly). On the 2-thread
    AVX512-BF16 EPYC this project is measured on (torch 2.13, cold caches), the A3B output head (163,840 x 2,048) at
    1 / 8 / 32 rows takes 34 / 39 / 71 ms in bfloat16 with torch's own product and 21 / 25 / 55 ms prepacked (one row
    padded to six, `prepacked_min_rows`); in float32 `linear`'s best form takes 71 / 158 / 253 ms and the prepacked
    product 44 / 51 / 110. Expert-sized weights gain 1.2-1.9x; from 48 to 2,048 rows the prepacked product was never
    slower."""
    # the layout for the rows oneDNN expects: 4 with its AVX-512 kernels (with prepacked_min_rows' padding, a float32
    # decode step of bench_decode's 3-layer A3B model at batch 1 / 2 / 8 took 66.5 / 77 / 167 ms against 66 / 108 /
    # 224 with the one-row layout unpadded), one row held to AVX2 (an expert's product: 0.57 against 0.76 ms)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4 if cpu_bf16_fast() else 1)


def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (CPU, the weight's dtype) @ a prepacked weight^T (+ bias). The oneDNN op has no backward: where x
    or the bias needs a gradient, the weight is unpacked for the call (a copy of it) and F.linear computes it; a
    prepacked weight itself takes no gradient (it is refused)."""
    if torch.is_grad_enabled():
        if weight.requires_grad:
            raise InputError("a prepacked weight takes no gradient: call model.unprepack() before training")
        if x.requires_grad or (bias is not None and bias.requires_grad):
            return F.linear(x, weight.to_dense(), bias)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    rows = F.pad(rows, (0, 0, 0, max(0, prepacked_min_rows() - n)))  # zero rows up to the fewest (AVX-512: 6)
    out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")
    return out[:n].view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and initialisation) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
