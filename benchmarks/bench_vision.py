"""Speed of the MoonViT tower on one packed batch of 4 images of different sizes, three ways, and the limit.

- packed: the project's path, all images through every layer together, attention per image (varlen_attention);
- per-image loop: the tower called once per image;
- dense block mask: packed, but attention as one SDPA call over all patches with a block-diagonal [L, L] mask.
a3b widths (1152 wide, 16 heads, MLP 4304), a few layers (--layers). The limit is FLOPs (linear layers and per-image
attention) over the rate of the fastest plain GEMM, measured in the same rounds. Times are the best of interleaved
runs; max |diff| is each way's output against the packed one. On CUDA with flash-attn installed the packed way uses
flash-attn varlen (half precision).

    .venv/bin/python benchmarks/bench_vision.py [--layers 2] [--repeats 3] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from limits import Machine, best_times, describe

import kimivl.vision
from kimivl import KimiVLConfig
from kimivl.vision import MoonViT

GRIDS = [(32, 32), (24, 40), (16, 20), (8, 8)]  # patches per image (h, w): 1024 + 960 + 320 + 64


def dense_block_mask_attention(q, k, v, cu_seqlens, causal=False):
    """One SDPA call over every patch with a block-diagonal boolean mask (True inside each image's block)."""
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=q.device),
                                  (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    mask = seq[:, None] == seq[None, :]  # [L, L]
    # [1, heads, L, D] views: 4-D inputs reach SDPA's fused CPU kernel (3-D ones take the slow math path)
    return F.scaled_dot_product_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                                          attn_mask=mask)[0].transpose(0, 1)


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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    cfg = dataclasses.replace(KimiVLConfig.preset("a3b").vision_config, num_hidden_layers=args.layers)
    tower = MoonViT(cfg).to(device=device, dtype=dtype).eval()
    C, I, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    sizes = [h * w for h, w in GRIDS]
    L = sum(sizes)
    pixel_values = torch.randn(L, 3, p, p, device=device)
    grid_hws = torch.tensor(GRIDS, device=device)
    images = pixel_values.split(sizes)

    def packed():
        return tower(pixel_values, grid_hws)

    def per_image():
        return [out for img, hw in zip(images, GRIDS) for out in tower(img, torch.tensor([hw], device=device))]

    def dense_mask():
        with attention(dense_block_mask_attention):
            return tower(pixel_values, grid_hws)

    ways = {"packed (kimivl)": packed, "per-image loop": per_image, "dense block mask": dense_mask}
    machine = Machine(device, dtype, [(L, C, 3 * C), (L, C, I), (L, I, C)])
    flops = 2 * L * 3 * p * p * C + args.layers * (2 * L * (4 * C * C + 2 * C * I) + 4 * C * sum(n * n for n in sizes))
    with torch.no_grad():
        want = torch.cat(packed()).float()
        diffs = {name: (torch.cat(fn()).float() - want).abs().max().item() for name, fn in ways.items()}
        times = best_times(ways | machine.probes(), args.repeats, device)
    rate = machine.matmul_rate(times)
    limit = flops / rate
    print(describe(device))
    print(f"MoonViT a3b widths, {args.layers} layers, {args.dtype}; images {GRIDS} = {L} patches; "
          f"{flops / 1e9:.0f} GFLOP; measured {rate / 1e9:.0f} GFLOP/s -> limit {limit * 1e3:.0f} ms\n")
    header = f"{'way':<18} | {'ms':>8} | {'/ packed':>8} | {'/ limit':>7} | max |diff| vs packed"
    print(header)
    print("-" * len(header))
    for name in ways:
        print(f"{name:<18} | {times[name] * 1e3:>8.0f} | {times[name] / times['packed (kimivl)']:>7.2f}x | "
              f"{times[name] / limit:>6.2f}x | {diffs[name]:.1e}")


if __name__ == "__main__":
    main()
