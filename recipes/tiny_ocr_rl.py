"""Reinforcement learning on the tiny OCR model: start from a checkpoint of `recipes/tiny_ocr.py`, run GRPO, DAPO or
PPO on prompts from the training split of the synthetic suite, and score the held-out split with `kimivl eval` (`ocr`:
exact match) at every checkpoint.

    .venv/bin/python recipes/tiny_ocr_rl.py --start runs/tiny-ocr/checkpoints/step-0000400/model \\
        --algorithm grpo --out runs/tiny-ocr-grpo

Seeded. The curves are `--out/metrics.jsonl` (mean reward per step, held-out exact match per checkpoint) and
`--out/reward.png`; `--categories` restricts the training prompts to some of the suite's categories.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor
from kimivl.eval.runner import run_benchmark
from kimivl.eval.synthetic import CATEGORIES, SyntheticSuite, write_synthetic
from kimivl.train import get_reward, train_rl
from kimivl.train.rl import ALGORITHMS


class Categories(Sequence):
    """The samples of `suite` in some of its categories (sample i has category i mod 5), in order."""

    def __init__(self, suite: SyntheticSuite, categories: Sequence[str]):
        self.suite, self.offsets = suite, sorted(CATEGORIES.index(c) for c in categories)

    def __len__(self) -> int:
        return len(self.suite) // len(CATEGORIES) * len(self.offsets)

    def __getitem__(self, j: int):
        if not 0 <= j < len(self):
            raise IndexError(j)
        return self.suite[len(CATEGORIES) * (j // len(self.offsets)) + self.offsets[j % len(self.offsets)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="a checkpoint of recipes/tiny_ocr.py (its model/ folder)")
    ap.add_argument("--algorithm", choices=list(ALGORITHMS), default="grpo")
    ap.add_argument("--out", default="runs/tiny-ocr-rl")
    ap.add_argument("--reward", default="exact")
    ap.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", type=json.loads, default={}, help="other config fields as JSON")
    args = ap.parse_args()
    torch.set_num_threads(2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = out / "heldout.tsv"
    if not heldout.is_file():
        write_synthetic(heldout, n=args.eval_n, split="test")
    get_reward(args.reward)  # an unknown name fails before the model loads
    model = KimiVLForConditionalGeneration.from_pretrained(args.start)
    processor = KimiVLProcessor.from_pretrained(args.start)
    prompts = Categories(SyntheticSuite(5 * args.steps * args.prompts_per_step * 4, seed=args.seed, split="train"),
                         args.categories)
    config = ALGORITHMS[args.algorithm](
        out=str(out), steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, lr=args.lr, seed=args.seed, save_every=args.save_every,
        eval_data=str(heldout), resume=args.resume, progress=True, **args.set)
    t0 = time.perf_counter()
    before = run_benchmark(args.start, heldout, "ocr", out / "eval-start", progress=False)["headline"]["value"]
    result = train_rl(model, processor, prompts, args.reward, config)
    minutes = (time.perf_counter() - t0) / 60
    after = run_benchmark(str(result.model_dir), heldout, "ocr", out / "eval", progress=False)["headline"]["value"]
    print(f"{args.algorithm}: {args.steps} steps in {minutes:.1f} min; mean reward {result.rewards[0]:.3f} (first "
          f"step) -> {result.rewards[-1]:.3f} (last); held-out exact match {before:.1f} -> {after:.1f}")


if __name__ == "__main__":
    main()
