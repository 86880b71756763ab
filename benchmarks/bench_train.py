"""Finetuning speed and memory by mode, against full finetuning run the same way.

A random model wider than the tiny preset (bench_generate's: decoder hidden 1024, 4 layers, 16 experts; the tiny
MoonViT) is written once as a checkpoint; each mode then trains it for a few steps of 8 synthetic-suite
conversations in its own process, whose peak RSS the parent reads (os.wait4). Seconds per step skip the first step
(allocator warm-up). Peak RSS holds the Python process, the model, its gradients and AdamW's two moments for what
trains, and the activations kept for the backward.

    .venv/bin/python benchmarks/bench_train.py [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODES = {  # name: SFTConfig settings
    "full (baseline)": {},
    "full + gradient checkpointing": {"gradient_checkpointing": True},
    "full, micro-batches of 2": {"micro_batch_size": 2},
    "frozen vision + projector": {"freeze": ("vision", "projector")},
    "LoRA r16 (attention, MLPs, projector)": {"lora_rank": 16},
}


def make_checkpoint(out: Path) -> None:
    from bench_generate import wide_config

    from kimivl import KimiVLForConditionalGeneration
    from kimivl.model import init_weights
    from weights_tools.tiny import write_checkpoint

    model = KimiVLForConditionalGeneration(wide_config())
    init_weights(model, seed=0)
    write_checkpoint(model, out)


def run_mode(ckpt: str, out: str, mode: str, steps: int, batch_size: int) -> None:
    """In the child: train, then print one JSON line with the timing."""
    from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor
    from kimivl.eval.synthetic import SyntheticSuite
    from kimivl.train import SFTConfig, SampleConversations, train

    torch.set_num_threads(2)
    model = KimiVLForConditionalGeneration.from_pretrained(ckpt)
    processor = KimiVLProcessor.from_pretrained(ckpt)
    data = SampleConversations(SyntheticSuite(steps * batch_size, split="train"))
    result = train(model, processor, data, SFTConfig(out=out, steps=steps, batch_size=batch_size, lr=1e-4,
                                                     progress=False, **MODES[mode]))
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # the first step warms the allocator up
    seconds = (timed[-1]["seconds"] - rows[0]["seconds"]) / len(timed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"s_per_step": seconds, "tokens_per_s": sum(r["tokens"] for r in timed) / (seconds * len(timed)),
                      "loss": result.losses[-1], "trainable": trainable}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--child", nargs=3, metavar=("CKPT", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_mode(*args.child, args.steps, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        make_checkpoint(ckpt)
        rows = []
        for n, mode in enumerate(MODES):
            proc = subprocess.Popen([sys.executable, __file__, "--steps", str(args.steps), "--batch-size",
                                     str(args.batch_size), "--child", str(ckpt), str(Path(tmp) / f"run{n}"), mode],
                                    stdout=subprocess.PIPE, text=True)
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise SystemExit(f"{mode}: the training process failed")
            rows.append((mode, json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024))
    base = rows[0]
    print(f"{args.steps} steps of {args.batch_size} synthetic conversations, float32, 2 threads; "
          f"baseline: {base[0]} in the same script")
    print("| mode | trainable params | s / step | tokens / s | peak RSS (MB) | RSS vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r, rss in rows:
        print(f"| {mode} | {r['trainable']:,} | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {rss:,.0f} | "
              f"{rss / base[2]:.2f}x |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
