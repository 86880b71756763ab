"""kimivl's side of bench.py's cases, on bench_decode's checkpoint in bfloat16, prepacked as the CLI runs it:
decode ms per step at batch 1 after 64 / 2,048 / 8,192 tokens of context (16 steps after two warm-ups), prefill
of 512 and 2,048 tokens (best of 2 after a warm-up). Times as JSON to the path given.

    .venv/bin/python benchmarks/llamacpp/kimivl_side.py OUT.json [--work /tmp/kimivl-bench-decode]

alternate.sh runs it and bench.py in turn, so that both see the same moments of a shared host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_decode import Ours  # noqa: E402


def timed(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kimivl-bench-decode"))
    args = parser.parse_args()
    ours = Ours(args.work / "kimivl", torch.bfloat16, prepack=True)
    results = {}
    with torch.no_grad():
        for context in (64, 2048, 8192):
            step = ours.decoder(1, context, 20)
            timed(step, 2)
            results[f"decode B=1 ctx={context}"] = t = timed(step, 16)
            print(f"decode ctx {context}: best {min(t) * 1e3:.1f} ms, median {statistics.median(t) * 1e3:.1f}")
        for T in (512, 2048):
            run = ours.prefill(T)
            run()
            results[f"prefill {T}"] = t = timed(run, 2)
            print(f"prefill {T}: {T / min(t):.0f} tokens/s")
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
