#!/usr/bin/env python3
"""llama.cpp's baseline beside bench_decode: llama-cpp-python on the BF16 GGUF of bench_decode's checkpoint (A3B
widths, 3 layers, full vocabulary, random weights), converted with convert.py here.

Measures, with fixed random token ids (numpy default_rng(0), range [0, 163840)):
  * prefill tokens/s for one sequence of 512 and 2048 tokens into an empty context
    (KV cache cleared before each run; best of --repeats runs),
  * decode ms/token at batch 1 after contexts of 64, 2048 and 8192 tokens
    (context filled untimed, then --decode-steps single-token eval() steps are timed
    individually; median reported).
Only Llama.eval() (llama_decode on a batch, logits for the last token only) is timed:
no sampling, no detokenisation, no logits copy.

Setup (a venv of its own, outside the project's; the build takes ~15 minutes on 2 cores):
  python3 -m venv /tmp/llama/venv
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" /tmp/llama/venv/bin/pip install llama-cpp-python==0.3.36 \
      torch transformers tokenizers sentencepiece numpy safetensors protobuf
  pip download --no-binary=:all: --no-deps llama-cpp-python==0.3.36; tar xzf llama_cpp_python-0.3.36.tar.gz
  LLAMA_CPP_SRC=llama_cpp_python-0.3.36/vendor/llama.cpp /tmp/llama/venv/bin/python benchmarks/llamacpp/convert.py \
      /tmp/kimivl-bench-decode/hf --outtype bf16 --outfile /tmp/llama/model-bf16.gguf
Run:
  /tmp/llama/venv/bin/python benchmarks/llamacpp/bench.py --model /tmp/llama/model-bf16.gguf --json results.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama

VOCAB = 163840
N_CTX = 8448


def clear_kv(llm: Llama) -> None:
    """Empty the context: drop every cell of the KV cache and reset Llama's token count."""
    llm.reset()
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)


def timed_eval(llm: Llama, toks) -> float:
    t0 = time.perf_counter()
    llm.eval(toks)
    llama_cpp.llama_synchronize(llm._ctx.ctx)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--json", default=None, help="write results as JSON here")
    ap.add_argument("--quick", action="store_true", help="only prefill 512 and decode at ctx 64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="prefill runs per length (best taken)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--flash-attn", action="store_true", help="enable flash attention (default: off, Llama's default)")
    args = ap.parse_args()

    prefill_lens = [512] if args.quick else [512, 2048]
    decode_ctxs = [64] if args.quick else [64, 2048, 8192]
    assert max(decode_ctxs) + args.decode_steps <= N_CTX

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=max(decode_ctxs + prefill_lens) + args.decode_steps).tolist()

    t_load = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=N_CTX,
        n_batch=512,
        n_ubatch=512,
        logits_all=False,
        flash_attn=args.flash_attn,
        verbose=False,
    )
    t_load = time.perf_counter() - t_load
    assert llm.n_vocab() == VOCAB, llm.n_vocab()
    sysinfo = llama_cpp.llama_print_system_info().decode()

    # warm-up (untimed): touch all weights once so page-cache/mmap faults are not measured
    clear_kv(llm)
    llm.eval(ids[:64])
    clear_kv(llm)

    results = {
        "meta": {
            "model": os.path.abspath(args.model),
            "model_bytes": os.path.getsize(args.model),
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": sysinfo,
            "n_threads": args.threads,
            "n_ctx": N_CTX,
            "n_batch": 512,
            "n_ubatch": 512,
            "flash_attn": args.flash_attn,
            "quick": args.quick,
            "load_s": t_load,
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "token_seed": 0,
        },
        "prefill": [],
        "decode": [],
    }

    for n in prefill_lens:
        runs = []
        for _ in range(args.repeats):
            clear_kv(llm)
            runs.append(timed_eval(llm, ids[:n]))
        best = min(runs)
        results["prefill"].append({"n_tokens": n, "runs_s": runs, "best_s": best, "tok_per_s": n / best})
        print(f"prefill {n}: runs {[round(r, 3) for r in runs]} s -> {n / best:.1f} tok/s", file=sys.stderr, flush=True)

    for ctx in decode_ctxs:
        clear_kv(llm)
        t_fill = timed_eval(llm, ids[:ctx])  # untimed for the result, kept for information
        steps = []
        for i in range(args.decode_steps):
            steps.append(timed_eval(llm, [ids[ctx + i]]) * 1e3)
        assert llm.n_tokens == ctx + args.decode_steps
        med = statistics.median(steps)
        results["decode"].append({
            "ctx": ctx, "steps": args.decode_steps, "median_ms": med, "tok_per_s": 1e3 / med,
            "min_ms": min(steps), "max_ms": max(steps), "step_ms": steps, "fill_s": t_fill,
        })
        print(f"decode @ctx {ctx}: median {med:.2f} ms/token ({1e3 / med:.2f} tok/s), fill {t_fill:.2f} s",
              file=sys.stderr, flush=True)
    clear_kv(llm)

    print(f"\nllama-cpp-python {llama_cpp.__version__}, threads={args.threads}, n_ctx={N_CTX}, "
          f"n_batch=n_ubatch=512, flash_attn={args.flash_attn}")
    print(f"system_info: {sysinfo}\n")
    print("| test | tokens / ctx | time | tok/s |")
    print("|---|---:|---:|---:|")
    for p in results["prefill"]:
        print(f"| prefill (best of {len(p['runs_s'])}) | {p['n_tokens']} | {p['best_s'] * 1e3:.1f} ms | {p['tok_per_s']:.1f} |")
    for d in results["decode"]:
        print(f"| decode bs=1 (median of {d['steps']}) | {d['ctx']} | {d['median_ms']:.2f} ms/tok | {d['tok_per_s']:.2f} |")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
