"""CPU speed of one MoE layer at the a3b widths, against transformers' DeepseekV3MoE and against this machine's limit.

Both layers hold the same weights (shared Parameters: hidden 2048, 64 routed experts of 1408, top-6, 2 shared experts,
float32, random router bias). Times are the best of several interleaved runs. The limit is measured in the same
process: memory (bytes of the weights the tokens touch: the chosen experts + shared experts, over the copy bandwidth,
counted as bytes read + written, or the read bandwidth of a reduction if higher) or compute (FLOPs over the
measured fp32 matmul rate), whichever is larger. Goal: kimivl within 2x of the limit at 1 and 512 tokens.

    .venv/bin/python benchmarks/bench_moe.py [--tokens 1 16 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kimivl import KimiVLConfig
from kimivl.decoder import MoE

GB = 1e9


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_time(fn, repeats: int) -> float:
    fn()
    return min(once(fn) for _ in range(repeats))


def memory_bandwidth() -> tuple[float, float]:
    """(copy bandwidth counting bytes read + written, read bandwidth of a sum) in bytes/s, over 256 MB buffers."""
    src = torch.randn(64 * 2 ** 20)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    return 2 * nbytes / best_time(lambda: dst.copy_(src), 10), nbytes / best_time(src.sum, 10)


def matmul_rate(H: int, I: int) -> float:
    """Best fp32 FLOP/s of the layer's own GEMM shapes at 512 rows and of a 2048^3 GEMM."""
    rates = []
    for m, k, n in [(512, H, 2 * I), (512, I, H), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2 * m * k * n / best_time(lambda: a @ b, 5))
    return max(rates)


def transformers_twin(ours: MoE, experts_implementation: str):
    """transformers' DeepseekV3MoE holding the very same Parameters as `ours`."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    t = ours.config
    cfg = DeepseekV3Config(hidden_size=t.hidden_size, moe_intermediate_size=t.moe_intermediate_size,
                           n_routed_experts=t.n_routed_experts, num_experts_per_tok=t.num_experts_per_tok,
                           n_shared_experts=t.n_shared_experts, n_group=t.n_group, topk_group=t.topk_group,
                           routed_scaling_factor=t.routed_scaling_factor, norm_topk_prob=t.norm_topk_prob)
    cfg._experts_implementation = experts_implementation
    with torch.device("meta"):
        hf = DeepseekV3MoE(cfg)
    hf.gate.weight = ours.gate.weight
    hf.gate.e_score_correction_bias = ours.gate.e_score_correction_bias
    hf.experts.gate_up_proj = ours.experts.gate_up_proj
    hf.experts.down_proj = ours.experts.down_proj
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(hf.shared_experts, name, getattr(ours.shared_experts, name))
    assert not any(p.is_meta for p in hf.parameters()) and not any(b.is_meta for b in hf.buffers())
    return hf.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    t = KimiVLConfig.preset("a3b").text_config
    ours = MoE(t).eval()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.normal_(std=0.01)
    baselines = {"HF eager": transformers_twin(ours, "eager"), "HF grouped_mm": transformers_twin(ours, "grouped_mm")}

    E, H, I, k = t.n_routed_experts, t.hidden_size, t.moe_intermediate_size, t.num_experts_per_tok
    expert_bytes = 3 * H * I * 4
    shared_bytes = 3 * H * I * t.n_shared_experts * 4
    load = os.getloadavg()[0]
    copy_bw, read_bw = memory_bandwidth()
    rate = matmul_rate(H, I)
    bandwidth = max(copy_bw, read_bw)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured: copy {copy_bw / GB:.1f} GB/s "
          f"(read + write), sum {read_bw / GB:.1f} GB/s (read), fp32 matmul {rate / 1e9:.0f} GFLOP/s; load average "
          f"before the run {load:.2f}")
    print(f"a3b MoE layer: hidden {H}, {E} experts x {I}, top-{k}, {t.n_shared_experts} shared; float32\n")

    names = ["kimivl", *baselines]
    header = (f"{'tokens':>6} | " + " | ".join(f"{n + ' ms':>16}" for n in names) + f" | {'limit ms':>8} | "
              + " | ".join(f"{n + '/limit':>19}" for n in names) + f" | {'HF eager/kimivl':>15} | max |diff|")
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for T in args.tokens:
            x = torch.randn(1, T, H)
            ids = torch.topk(torch.sigmoid(x[0] @ ours.gate.weight.T) + ours.gate.e_score_correction_bias, k).indices
            touched = ids.unique().numel() * expert_bytes + shared_bytes
            flops = 2 * T * (k * 3 * H * I + 3 * H * I * t.n_shared_experts + H * E)
            limit = max(touched / bandwidth, flops / rate)
            fns = {"kimivl": lambda: ours(x), **{n: (lambda m=m: m(x)) for n, m in baselines.items()}}
            for fn in fns.values():
                fn()
            times = {n: float("inf") for n in fns}
            for _ in range(max(2, args.repeats if T < 256 else args.repeats // 2)):
                for n, fn in fns.items():  # interleaved, so that machine noise hits every contender alike
                    times[n] = min(times[n], once(fn))
            want = baselines["HF eager"](x)
            diff = max((fns[n]() - want).abs().max().item() for n in ("kimivl", "HF grouped_mm"))
            print(f"{T:>6} | " + " | ".join(f"{times[n] * 1e3:>16.1f}" for n in names) + f" | {limit * 1e3:>8.1f} | "
                  + " | ".join(f"{times[n] / limit:>18.2f}x" for n in names)
                  + f" | {times['HF eager'] / times['kimivl']:>14.2f}x | {diff:.1e}")
    print(f"\nlimit: max(bytes of the chosen + shared experts' weights / {bandwidth / GB:.1f} GB/s, "
          f"FLOPs / {rate / 1e9:.0f} GFLOP/s); max |diff| is against HF eager (outputs ~{want.abs().mean():.2f})")


if __name__ == "__main__":
    main()
