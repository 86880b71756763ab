"""`kimivl eval` throughput: seconds per sample at several batch sizes, against batch size 1 in the same process.

    .venv/bin/python benchmarks/bench_eval.py [--n 32] [--max-new-tokens 16] [--batch-sizes 1 4 8]

A random checkpoint (preset `tiny`, or `wide` from bench_generate.py: hidden 1024, 4 layers, 16 experts) answers the
first --n samples of the synthetic suite greedily through ModelPredictor, as `kimivl eval` does; float32 on CPU.
Every batch size must give the same answers as the first (default 1) (left padding does not change greedy tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import wide_config  # noqa: E402

from kimivl import KimiVLForConditionalGeneration  # noqa: E402
from kimivl.eval import ModelPredictor, make_synthetic  # noqa: E402
from kimivl.model import init_weights  # noqa: E402
from weights_tools.tiny import make_tiny  # noqa: E402


def checkpoint(folder: Path, preset: str) -> Path:
    make_tiny(folder, preset="tiny", seed=0)  # the tokenizer files, and the tiny weights
    if preset == "wide":
        model = KimiVLForConditionalGeneration(wide_config())
        init_weights(model, seed=0)
        model.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--presets", nargs="+", default=["tiny", "wide"], choices=["tiny", "wide"])
    args = parser.parse_args()
    samples = make_synthetic(args.n, seed=0)
    print(f"{args.n} synthetic samples (one image each), greedy, at most {args.max_new_tokens} new tokens, float32, "
          f"{torch.get_num_threads()} threads\n")
    print(f"| preset | batch size | s / sample | vs batch {args.batch_sizes[0]} | same answers |")
    print("|---|---:|---:|---:|---|")
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            predictor = ModelPredictor(checkpoint(Path(tmp), preset), max_new_tokens=args.max_new_tokens)
            predictor.predict(samples[:2])  # warm-up
            base = answers = None
            for bs in args.batch_sizes:
                start, out = time.perf_counter(), []
                for i in range(0, len(samples), bs):
                    out += predictor.predict(samples[i:i + bs])
                per = (time.perf_counter() - start) / len(samples)
                if base is None:
                    base, answers = per, out
                print(f"| {preset} | {bs} | {per:.3f} | {base / per:.2f}x | {'yes' if out == answers else 'NO'} |")


if __name__ == "__main__":
    main()
