"""Speed of one MoE layer at the a3b widths, against transformers' DeepseekV3MoE and against this machine's limit.

Both layers hold the same weights (shared Parameters: hidden 2048, 64 routed experts of 1408, top-6, 2 shared experts,
random router bias). Times are the best of several interleaved rounds. The limit is measured in the same rounds:
memory (bytes of the weights the tokens touch: the chosen experts + the shared experts, over the bandwidth of a 256 MB
copy or sum) or compute (FLOPs over the rate of the fastest plain GEMM), whichever is larger. Goal on CPU (float32): kimivl within 2x of the
limit at 1 and 512 tokens. On CUDA the kimivl rows are the triton backend (default there) and KIMIVL_BACKEND=torch.

    .venv/bin/python benchmarks/bench_moe.py [--tokens 1 16 512] [--repeats 7] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os

import torch
from limits import Machine, best_times, describe

from kimivl import KimiVLConfig
from kimivl.decoder import MoE


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
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()])
    return hf.eval()


def with_backend(fn, backend: str):
    def run():
        os.environ["KIMIVL_BACKEND"] = backend
        try:
            return fn()
        finally:
            del os.environ["KIMIVL_BACKEND"]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    os.environ.pop("KIMIVL_BACKEND", None)

    torch.manual_seed(0)
    t = KimiVLConfig.preset("a3b").text_config
    E, H, I, k, S = t.n_routed_experts, t.hidden_size, t.moe_intermediate_size, t.num_experts_per_tok, t.n_shared_experts
    ours = MoE(t).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.data = torch.randn(E, device=device) * 0.01  # float32, as loaded
    contenders = {"kimivl": ours}
    if device.type == "cuda":
        contenders["kimivl torch"] = with_backend(ours, "torch")
    contenders |= {"HF eager": transformers_twin(ours, "eager"), "HF grouped_mm": transformers_twin(ours, "grouped_mm")}

    machine = Machine(device, dtype, [(512, H, 2 * I), (512, I, H)])
    print(describe(device))
    print(f"a3b MoE layer: hidden {H}, {E} experts x {I}, top-{k}, {S} shared; {args.dtype}\n")

    names = list(contenders)
    header = (f"{'tokens':>6} | " + " | ".join(f"{n + ' ms':>16}" for n in names) + f" | {'limit ms':>8} | "
              + " | ".join(f"{n + '/limit':>19}" for n in names) + f" | {'HF eager/kimivl':>15} | "
              f"{'GB/s':>5} | {'GFLOP/s':>7} | max |diff|")
    print(header)
    print("-" * len(header))
    expert_bytes = 3 * H * I * dtype.itemsize
    with torch.no_grad():
        for T in args.tokens:
            x = torch.randn(1, T, H, device=device, dtype=dtype)
            scores = torch.sigmoid(x[0].float() @ ours.gate.weight.float().T) + ours.gate.e_score_correction_bias
            touched = (scores.topk(k).indices.unique().numel() + S) * expert_bytes
            flops = 2 * T * ((k + S) * 3 * H * I + H * E)
            fns = {n: (lambda m=m: m(x)) for n, m in contenders.items()}
            times = best_times(fns | machine.probes(), max(2, args.repeats if T < 256 else args.repeats // 2), device)
            bandwidth, rate = machine.bandwidth(times), machine.matmul_rate(times)
            limit = max(touched / bandwidth, flops / rate)
            want = fns["HF eager"]().float()
            diff = max((fns[n]().float() - want).abs().max().item() for n in names if n != "HF eager")
            print(f"{T:>6} | " + " | ".join(f"{times[n] * 1e3:>16.1f}" for n in names) + f" | {limit * 1e3:>8.1f} | "
                  + " | ".join(f"{times[n] / limit:>18.2f}x" for n in names)
                  + f" | {times['HF eager'] / times['kimivl']:>14.2f}x | {bandwidth / 1e9:>5.1f} | {rate / 1e9:>7.0f} | "
                  f"{diff:.1e}")
    print(f"\nlimit = max(bytes of the chosen + shared experts' weights / GB/s, FLOPs / GFLOP/s), both measured in the "
          f"row's rounds; max |diff|: every other row's output against HF eager (outputs ~{want.abs().mean():.2f})")


if __name__ == "__main__":
    main()
