"""Linear layers of the decoder: nn.Linear with a faster float32 CPU form for few rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias): `F.linear`, except for two or more rows in float32 on CPU, computed as
    (weight @ x^T)^T: the same products summed in another order. On the 2-core AVX2 CPU this project is measured on,
    torch 2.13's float32 GEMM runs `x @ weight^T` 1.5-4x slower for 2-32 rows and was never faster up to 512 (the
    A3B output head, 163,840 x 2,048, at 8 rows: 651 ms against 160 ms); for one row both forms take the same time."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() < 2
            or x.numel() == x.shape[-1]):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and initialisation) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
