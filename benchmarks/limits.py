"""Timing and this machine's limits, measured inside the benchmark process (shared by bench_moe and bench_vision)."""

from __future__ import annotations

import os
import time

import torch


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
    """Best time of each fn over `repeats` rounds after a warm-up call; rounds interleave the fns, so machine noise
    (other processes, a shared host) hits every contender alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], once(fn, device))
    return best


def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s: the larger of a 256 MB copy (bytes read + written) and a 256 MB sum (bytes read)."""
    src = torch.randn(64 * 2 ** 20, device=device)
    dst = torch.empty_like(src)
    t = best_times({"copy": lambda: dst.copy_(src), "sum": src.sum}, 10, device)
    return max(2 * src.nbytes / t["copy"], src.nbytes / t["sum"])


def matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s: the best of plain GEMMs of the given (m, k, n) shapes and 2048^3."""
    rates = []
    for m, k, n in [*shapes, (2048, 2048, 2048)]:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        rates.append(2 * m * k * n / best_times({"mm": lambda: a @ b}, 5, device)["mm"])
    return max(rates)


def describe(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return f"torch {torch.__version__}, {where}, load average before the run {os.getloadavg()[0]:.2f}"
