"""Timing and this machine's limits, measured inside the benchmark process (shared by bench_moe and bench_vision).

The limit probes (a memory copy, a reduction, plain GEMMs) run in the same interleaved rounds as the contenders, so
that a busy moment (other processes, a shared host) slows probes and contenders alike instead of skewing the ratio.
"""

from __future__ import annotations

import os
import time

import torch

from kimivl.kernels.linear import prepack_weight, prepackable, prepacked_linear


def once(fn, device: torch.device) -> float:
    """Seconds for one call of fn (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def best_times(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Best time of each fn over `repeats` interleaved rounds, after a warm-up call of each."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], once(fn, device))
    return best


class Machine:
    """Probes of the memory bandwidth and the matmul rate; their times go into `best_times` with the contenders."""

    def __init__(self, device: torch.device, dtype: torch.dtype, gemm_shapes: list[tuple[int, int, int]],
                 probe_elements: int = 64 * 2 ** 20):
        # float32 elements copied and summed: 256 MB by default; a CPU with a large last-level cache needs more
        # (the AVX-512 EPYC here: 60 GB/s over 256 MB, 35 GB/s over 2 GiB)
        self.src = torch.randn(probe_elements, device=device)
        self.dst = torch.empty_like(self.src)
        self.gemms = {(m, k, n): (torch.randn(m, k, device=device, dtype=dtype),
                                  torch.randn(k, n, device=device, dtype=dtype))
                      for m, k, n in [*gemm_shapes, (2048, 2048, 2048)]}
        # on CPU also oneDNN's product from a prepacked weight, which beats torch's own GEMM there (kimivl.prepack)
        self.packed = {}
        if prepackable(device, dtype):
            self.packed = {key: (a, prepack_weight(b.t().contiguous())) for key, (a, b) in self.gemms.items()}

    def probes(self) -> dict:
        fns = {"probe copy": lambda: self.dst.copy_(self.src), "probe sum": self.src.sum}
        fns |= {f"probe mm {m}x{k}x{n}": (lambda a=a, b=b: a @ b) for (m, k, n), (a, b) in self.gemms.items()}
        fns |= {f"probe packed mm {m}x{k}x{n}": (lambda a=a, w=w: prepacked_linear(a, w))
                for (m, k, n), (a, w) in self.packed.items()}
        return fns

    def bandwidth(self, times: dict[str, float]) -> float:
        """Bytes/s: the larger of the copy (bytes read + written) and the sum (bytes read)."""
        return max(2 * self.src.nbytes / times["probe copy"], self.src.nbytes / times["probe sum"])

    def matmul_rate(self, times: dict[str, float]) -> float:
        """FLOP/s of the fastest probe GEMM (torch's, or oneDNN's prepacked one where measured)."""
        return max(2 * m * k * n / times[name.format(m, k, n)] for m, k, n in self.gemms
                   for name in ("probe mm {}x{}x{}", "probe packed mm {}x{}x{}") if name.format(m, k, n) in times)


def describe(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return f"torch {torch.__version__}, {where}, load average before the run {os.getloadavg()[0]:.2f}"
