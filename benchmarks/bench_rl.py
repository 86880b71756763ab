"""RL step time: the rollout (batched sampling with the latent cache) and the update, with each prompt's image run
through the vision tower once for its whole group, against the same rows with one image copy per response (the
baseline, run in the same process); then seconds per step of GRPO, DAPO and PPO.

The model is the tiny OCR recipe's architecture (MoonViT 192 x 6, a 2-layer DeepSeek-V3 decoder, 576-token BPE),
randomly initialised; prompts are synthetic-suite training samples. Times are medians over --repeats.

    .venv/bin/python benchmarks/bench_rl.py [--prompts 8] [--group 8] [--new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per algorithm in the last table (first skipped)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from tiny_ocr import make_initial

    from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor
    from kimivl.eval.synthetic import make_synthetic
    from kimivl.train import train_rl
    from kimivl.train import rl

    P, G = args.prompts, args.group
    with tempfile.TemporaryDirectory() as tmp:
        make_initial(Path(tmp) / "model", seed=0)
        model = KimiVLForConditionalGeneration.from_pretrained(Path(tmp) / "model")
        processor = KimiVLProcessor.from_pretrained(Path(tmp) / "model")
        samples = make_synthetic(P, split="train")
        reward = rl.get_reward("anls")[0]
        config = rl.GRPOConfig(out=tmp, prompts_per_step=P, group_size=G, max_new_tokens=args.new_tokens, lr=1e-4)
        per_row = rl.GRPOConfig(out=tmp, prompts_per_step=P * G, group_size=1, max_new_tokens=args.new_tokens)
        repeated = [s for s in samples for _ in range(G)]

        print(f"{P} prompts x {G} responses, up to {args.new_tokens} new tokens, 2 threads; median of "
              f"{args.repeats}\n")
        print("| phase | one vision pass per prompt (s) | one per response, baseline (s) | speed-up |")
        print("|---|---:|---:|---:|")
        model.eval()
        t_shared, ro = timed(lambda: rl.rollout(model, processor, samples, reward, config, seed=0), args.repeats)
        t_rows, ro_rows = timed(lambda: rl.rollout(model, processor, repeated, reward, per_row, seed=0),
                                args.repeats)
        print(f"| rollout (prefill + {args.new_tokens} decode steps) | {t_shared:.2f} | {t_rows:.2f} | "
              f"{t_rows / t_shared:.2f}x |")
        ro_rows.tokens, ro_rows.mask, ro_rows.logprobs = ro.tokens, ro.mask, ro.logprobs  # the same responses
        ro_rows.scores, ro_rows.truncated = ro.scores, ro.truncated
        reference = copy.deepcopy(model).requires_grad_(False)  # GRPO's KL term needs the starting model
        params = rl.prepare(model, config)
        optimizer, _ = rl.optimizer_and_schedule(params, config)
        model.train()

        def update(rollouts):
            return lambda: rl._optimize(model, rollouts, config, reference, None, rl.RunningMoments(), params, optimizer,
                                        P * G, processor.tokenizer.pad_id)
        t_shared, _ = timed(update(ro), args.repeats)
        t_rows, _ = timed(update(ro_rows), args.repeats)
        print(f"| update (pi_old and reference forwards + forward/backward) | {t_shared:.2f} | {t_rows:.2f} | "
              f"{t_rows / t_shared:.2f}x |")

        print("\n| algorithm | s/step | of which rollout |")
        print("|---|---:|---:|")
        for name, cls in rl.ALGORITHMS.items():
            out = Path(tmp) / name
            fresh = KimiVLForConditionalGeneration.from_pretrained(Path(tmp) / "model")
            train_rl(fresh, processor, make_synthetic(P * args.steps, split="train"), "anls",
                     cls(out=str(out), steps=args.steps, prompts_per_step=P, group_size=G,
                         max_new_tokens=args.new_tokens, lr=1e-4, progress=False))
            rows = [r for r in rl.read_metrics(out / "metrics.jsonl") if "step_seconds" in r][1:]
            print(f"| {name} | {statistics.mean(r['step_seconds'] for r in rows):.2f} | "
                  f"{statistics.mean(r['rollout_seconds'] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
