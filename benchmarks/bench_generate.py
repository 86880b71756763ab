"""Decode speed with the MLA latent cache against recomputing the whole sequence every step, and cache size.

    .venv/bin/python benchmarks/bench_generate.py [--steps 32] [--prompt 128]

Both paths run greedy decoding from the same prompt (with one image) in this process and must pick the same tokens.
Presets: `tiny` and `wide` (hidden 1024, 4 layers, 16 experts); float32 on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from kimivl import KimiVLConfig, KimiVLForConditionalGeneration, MLACache
from kimivl.generation import GenerationConfig, GenerationStats, generate_tokens
from kimivl.model import init_weights


def wide_config() -> KimiVLConfig:
    cfg = KimiVLConfig.preset("tiny")
    t = cfg.text_config
    t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok = 1024, 4, 16, 4
    t.num_attention_heads, t.kv_lora_rank, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim = 8, 256, 64, 32, 64
    t.intermediate_size, t.moe_intermediate_size, t.n_shared_experts = 2816, 704, 2
    cfg.validate()
    return cfg


def prompt(cfg: KimiVLConfig, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grid = (8, 8)  # one 112 x 112 image: 16 decoder tokens
    n_media = grid[0] * grid[1] // 4
    text = torch.randint(0, 1000, (length - n_media,))
    ids = torch.cat([text[:8], torch.full((n_media,), cfg.media_placeholder_token_id), text[8:]])[None]
    return ids, torch.randn(grid[0] * grid[1], 3, 14, 14), torch.tensor([grid])


@torch.no_grad()
def without_cache(model, ids, pixels, grids, steps: int) -> tuple[list[int], float]:
    """Greedy decoding that runs the whole sequence through the model for every new token."""
    out, start = [], None
    for step in range(steps):
        logits = model(ids, pixel_values=pixels, image_grid_hws=grids).logits[:, -1]
        if step == 0:
            start = time.perf_counter()  # like the cached path: time the steps after the first token
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        ids = torch.cat([ids, token], 1)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"greedy decoding, prompt {args.prompt} tokens (one image), {args.steps} new tokens, float32, "
          f"{torch.get_num_threads()} threads\n")
    print("| preset | decoder params | prefill tok/s | decode tok/s, latent cache | decode tok/s, no cache "
          "| speed-up |")
    print("|---|---|---|---|---|---|")
    for name, cfg in (("tiny", KimiVLConfig.preset("tiny")), ("wide", wide_config())):
        model = KimiVLForConditionalGeneration(cfg).eval()
        init_weights(model, seed=0)
        ids, pixels, grids = prompt(cfg, args.prompt)
        gen = GenerationConfig(max_new_tokens=args.steps)
        list(generate_tokens(model, ids, pixel_values=pixels, image_grid_hws=grids, config=gen))  # warm up
        stats = GenerationStats()
        cached = [int(t) for t in generate_tokens(model, ids, pixel_values=pixels, image_grid_hws=grids,
                                                   config=gen, stats=stats)]
        plain, seconds = without_cache(model, ids, pixels, grids, args.steps)
        assert cached == plain, f"{name}: cached and uncached greedy tokens differ"
        n = sum(p.numel() for p in model.language_model.parameters())
        no_cache = (args.steps - 1) / seconds
        print(f"| {name} | {n / 1e6:.1f} M | {stats.prefill_tokens_per_second:.0f} | "
              f"{stats.decode_tokens_per_second:.1f} | {no_cache:.1f} | "
              f"{stats.decode_tokens_per_second / no_cache:.1f}x |")

    t = KimiVLConfig.preset("a3b").text_config
    latent = MLACache(t, 1, 1, device="meta", dtype=torch.bfloat16).bytes_per_token_per_layer()
    full = t.num_attention_heads * (t.qk_head_dim + t.v_head_dim) * 2
    print(f"\na3b cache per token per layer (bfloat16): latent {latent:,} bytes "
          f"({t.kv_lora_rank} + {t.qk_rope_head_dim} values) vs per-head K/V {full:,} bytes "
          f"({t.num_attention_heads} heads x ({t.qk_head_dim} + {t.v_head_dim})): {full / latent:.1f}x smaller; "
          f"per token over {t.num_hidden_layers} layers {latent * t.num_hidden_layers / 1024:.1f} KiB vs "
          f"{full * t.num_hidden_layers / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
