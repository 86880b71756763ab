"""CPU speed of the MoonViT tower on one packed batch of 4 images of different sizes, three ways, and the limit.

- packed: the project's path, all images through every layer together, attention per image (varlen_attention);
- per-image loop: the tower called once per image;
- dense block mask: packed, but attention as one SDPA call over all patches with a block-diagonal [L, L] mask.
a3b widths (1152 wide, 16 heads, MLP 4304), float32, a few layers (--layers). The limit is FLOPs (linear layers and
per-image attention) over the fp32 matmul rate measured in the same process. Times are the best of interleaved runs;
max |diff| is each way's output against the packed one.

    .venv/bin/python benchmarks/bench_vision.py [--layers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

import torch
import torch.nn.functional as F

import kimivl.vision
from kimivl import KimiVLConfig
from kimivl.vision import MoonViT

GRIDS = [(32, 32), (24, 40), (16, 20), (8, 8)]  # patches per image (h, w): 1024 + 960 + 320 + 64


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_rate(L: int, C: int, I: int) -> float:
    """Best fp32 FLOP/s of the tower's own GEMM shapes and of a 2048^3 GEMM."""
    rates = []
    for m, k, n in [(L, C, 3 * C), (L, C, I), (L, I, C), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        rates.append(2 * m * k * n / min(once(lambda: a @ b) for _ in range(3)))
    return max(rates)


def dense_block_mask_attention(q, k, v, cu_seqlens, causal=False):
    """One SDPA call over every patch with a block-diagonal boolean mask (True inside each image's block)."""
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    mask = seq[:, None] == seq[None, :]  # [L, L]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask).transpose(0, 1)


@contextlib.contextmanager
def attention(fn):
    real = kimivl.vision.varlen_attention
    kimivl.vision.varlen_attention = fn
    try:
        yield
    finally:
        kimivl.vision.varlen_attention = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = dataclasses.replace(KimiVLConfig.preset("a3b").vision_config, num_hidden_layers=args.layers)
    tower = MoonViT(cfg).eval()
    C, I, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    sizes = [h * w for h, w in GRIDS]
    L = sum(sizes)
    pixel_values = torch.randn(L, 3, p, p)
    grid_hws = torch.tensor(GRIDS)
    images = pixel_values.split(sizes)

    def packed():
        return tower(pixel_values, grid_hws)

    def per_image():
        return [out for img, hw in zip(images, GRIDS) for out in tower(img, torch.tensor([hw]))]

    def dense_mask():
        with attention(dense_block_mask_attention):
            return tower(pixel_values, grid_hws)

    ways = {"packed (kimivl)": packed, "per-image loop": per_image, "dense block mask": dense_mask}
    rate = matmul_rate(L, C, I)
    flops = 2 * L * 3 * p * p * C + args.layers * (2 * L * (4 * C * C + 2 * C * I) + 4 * C * sum(n * n for n in sizes))
    limit = flops / rate
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured fp32 matmul {rate / 1e9:.0f} "
          f"GFLOP/s; load average before the run {os.getloadavg()[0]:.2f}")
    print(f"MoonViT a3b widths, {args.layers} layers, float32; images {GRIDS} = {L} patches; "
          f"{flops / 1e9:.0f} GFLOP -> limit {limit * 1e3:.0f} ms\n")
    with torch.no_grad():
        want = torch.cat(packed())
        diffs = {name: (torch.cat(fn()) - want).abs().max().item() for name, fn in ways.items()}
        times = {name: float("inf") for name in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():  # interleaved, so that machine noise hits every way alike
                times[name] = min(times[name], once(fn))
    header = f"{'way':<18} | {'ms':>8} | {'/ packed':>8} | {'/ limit':>7} | max |diff| vs packed"
    print(header)
    print("-" * len(header))
    for name in ways:
        print(f"{name:<18} | {times[name] * 1e3:>8.0f} | {times[name] / times['packed (kimivl)']:>7.2f}x | "
              f"{times[name] / limit:>6.2f}x | {diffs[name]:.1e}")


if __name__ == "__main__":
    main()
