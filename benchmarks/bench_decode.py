"""Decoder speed at Kimi-VL-A3B widths against transformers and against this machine's limits.

    .venv/bin/python benchmarks/bench_decode.py [--layers 3] [--work /tmp/kimivl-bench-decode] [--quick]

The model: A3B's decoder widths (hidden 2048, 16 heads, kv_lora_rank 512, 64 routed experts top-6 plus the shared
ones, the 163,840-token vocabulary) with its first --layers layers (one dense, the rest MoE), random weights, float32
(or --dtype bfloat16, on a CPU with fast bfloat16; transformers is then not run). `kimivl` runs with its weights
prepacked for oneDNN (`kimivl.prepack`, as the CLI runs it), `kimivl-plain` without, in the same run.
It is written once as an official checkpoint under --work and exported with `weights_tools export-text`, so kimivl
and transformers' DeepseekV3ForCausalLM run the same weights, each in a fresh process of its own (never both in
memory).

- decode: ms per step (one new token per row) at batch B over a cache of L tokens, filled with random latents and rope
  keys: the same cost as a prefilled cache. Roofline: the bytes a step must read (every
  weight it uses once: attention, dense MLP, shared experts, the routed experts the batch selects, expected under
  uniform routing, one embedding row per token, the whole output head; plus the cache) / the copy bandwidth probed
  in the same run, or the step's matmul FLOPs / the matmul rate where that is longer (large batches and
  contexts). transformers 5 also caches the latent, but expands per-head keys and values from all of it in
  every step.
- prefill: tokens/s for one sequence of L tokens into an empty cache, the output head on the last token only (as
  generation does). Roofline: FLOPs (2 x the weights a token uses, attention's causal half of 2 x T^2 x heads x
  (192 + 128) per layer) / the matmul rate of the probe GEMMs.
- peak: the most resident memory above the model during the call (sampled every 2 ms), and the load's peak
  resident memory in a fresh process over the size of the checkpoint's weights.

The probes run in every contender's process; a row's roofline is the smallest limit their figures give (the machine
at its best), so that the percentages of one row compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from kimivl import KimiVLConfig, MLACache, TextConfig, VisionConfig
from kimivl.kernels.linear import prepackable
from kimivl.model import KimiVLForConditionalGeneration, init_weights
from limits import Machine, best_times, describe

TINY_VISION = dict(init_pos_emb_height=16, init_pos_emb_width=16, num_attention_heads=2, num_hidden_layers=2,
                   hidden_size=32, intermediate_size=64, torch_dtype="float32")
EXPAND_BUDGET = 2 ** 30  # transformers expands per-head keys and values each step: skip beyond this
HF_PREFILL_MAX = 2048  # transformers' prefill attention builds T x T scores per head: 8,192 ran out of 24 GiB here


class PeakRSS:
    """Context manager: the largest resident set size (bytes) seen while inside, sampled from /proc every 2 ms."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def write_model(work: Path, layers: int) -> tuple[Path, Path]:
    """The official checkpoint and its transformers export under `work` (reused when already there)."""
    from weights_tools.export import export_text
    ckpt, hf = work / "kimivl", work / "hf"
    if not (ckpt / "config.json").exists():
        cfg = KimiVLConfig(vision_config=VisionConfig(**TINY_VISION), text_config=TextConfig(num_hidden_layers=layers))
        model = KimiVLForConditionalGeneration(cfg)
        init_weights(model, seed=0)
        model.save_pretrained(ckpt)
        del model
    if not (hf / "config.json").exists():
        export_text(ckpt, hf)
    return ckpt, hf


def load_peak(path: Path, library: str, dtype: str = "float32") -> tuple[float, float]:
    """(seconds, peak RSS above the imports / weight bytes) of loading `path` in a fresh process (for "kimivl",
    prepacking included, as the CLI does)."""
    module, name, kwargs = (("kimivl", "KimiVLForConditionalGeneration", f", dtype=torch.{dtype}")
                            if library.startswith("kimivl") else
                            ("transformers", "DeepseekV3ForCausalLM", ", dtype=torch.float32"))
    then = ".prepack()" if library == "kimivl" else ""
    code = (f"import resource, sys, time, torch; from {module} import {name} as M; "
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; imports = peak(); "
            f"t0 = time.perf_counter(); M.from_pretrained(sys.argv[1]{kwargs}){then}; "
            "print(time.perf_counter() - t0, peak() - imports)")
    seconds, above = map(float, subprocess.run([sys.executable, "-c", code, str(path)], check=True, text=True,
                                               capture_output=True).stdout.split())
    return seconds, above / sum(f.stat().st_size for f in path.glob("*.safetensors"))


def expected_experts(cfg: TextConfig, tokens: int) -> float:
    """Distinct routed experts `tokens` tokens select in one layer under uniform routing."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - k / E) ** tokens)


def decode_bytes(lm, cfg: TextConfig, batch: int, context: int) -> int:
    """The bytes one decode step must read: the weights it uses once each, and the latent cache."""
    total = 0
    for name, p in lm.named_parameters():
        if "experts.gate_up_proj" in name or "experts.down_proj" in name:
            total += p.nbytes * expected_experts(cfg, batch) / cfg.n_routed_experts
        elif "embed_tokens" in name:
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.nbytes
    elem = next(lm.parameters()).element_size()  # the cache is held in the weights' dtype
    return int(total + batch * context * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem)


def decode_flops(lm, cfg: TextConfig, batch: int, context: int) -> float:
    """Matmul FLOPs of one decode step: every row's weights (k of the routed experts) and the whole output head, and
    the absorbed attention over the latent cache (scores over latent + rope key, context over the latent)."""
    per_token = sum(p.numel() * (cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1)
                    for name, p in lm.named_parameters() if p.dim() >= 2 and "embed_tokens" not in name)
    attention = (cfg.num_hidden_layers * cfg.num_attention_heads * context
                 * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    return 2 * batch * (per_token + attention)


def prefill_flops(lm, cfg: TextConfig, T: int) -> float:
    """Matmul FLOPs of a T-token prefill with the output head on the last token."""
    per_token = 0
    for name, p in lm.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name or "lm_head" in name:
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1
        per_token += p.numel() * share
    attention = cfg.num_hidden_layers * cfg.num_attention_heads * T * T * (cfg.qk_head_dim + cfg.v_head_dim)
    return 2 * per_token * T + attention + 2 * lm.lm_head.weight.numel()


# ---- the two contenders ----------------------------------------------------------------------------------------------
class Ours:
    name = "kimivl"

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32, prepack: bool = True):
        model = KimiVLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype)
        if prepack:  # as the CLI's generate, chat, eval and serve do on CPU
            model.prepack()
        self.lm = model.language_model
        self.cfg, self.dtype = self.lm.config, dtype

    @torch.no_grad()
    def decoder(self, batch: int, context: int, steps: int):
        cfg, lm = self.cfg, self.lm
        cache = MLACache(cfg, batch, context + steps + 4, dtype=self.dtype)
        gen = torch.Generator().manual_seed(0)
        for layer in range(cfg.num_hidden_layers):
            cache.write(layer, torch.randn(batch, context, cfg.kv_lora_rank, generator=gen).to(self.dtype),
                        torch.randn(batch, context, cfg.qk_rope_head_dim, generator=gen).to(self.dtype))
        cache.valid[:, :context] = True
        cache.advance(context)
        token = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)

        def step():  # the step generation and the serving engine run: one token per row at the next slot
            return lm.decode_step(token, torch.full((batch, 1), cache.length), cache, torch.tensor([cache.length]))
        return step

    @torch.no_grad()
    def prefill(self, T: int):
        lm, cfg = self.lm, self.cfg
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))

        def run():
            cache = MLACache(cfg, 1, T, dtype=self.dtype)
            hidden = lm.hidden_states(lm.model.embed_tokens(ids), torch.arange(T)[None], None, cache)
            return lm.lm_head(hidden[:, -1]).float()
        return run


class Transformers:
    name = "transformers"

    def __init__(self, hf: Path):
        from transformers import DeepseekV3ForCausalLM
        self.model = DeepseekV3ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        self.cfg = self.model.config

    def expanded_bytes(self, batch: int, context: int) -> int:
        """The per-head keys and values transformers expands from its latent cache in every layer of every step."""
        c = self.cfg
        return batch * context * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 4

    @torch.no_grad()
    def decoder(self, batch: int, context: int, steps: int):
        from transformers import DynamicCache
        c = self.cfg
        gen = torch.Generator().manual_seed(0)
        cache = DynamicCache(config=c)  # transformers 5 caches the latent and the rope key, each as one "head"
        for layer in range(c.num_hidden_layers):
            cache.update(torch.randn(batch, 1, context, c.kv_lora_rank, generator=gen),
                         torch.randn(batch, 1, context, c.qk_rope_head_dim, generator=gen), layer)
        token = torch.randint(0, c.vocab_size, (batch, 1), generator=gen)

        def step():
            pos = torch.full((batch, 1), cache.get_seq_length())
            return self.model(input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True).logits
        return step

    @torch.no_grad()
    def prefill(self, T: int):
        ids = torch.randint(0, self.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
        return lambda: self.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits


def measure(contender, decode_grid, prefill_lengths, repeats: int, machine: Machine, device: torch.device,
            save=lambda rows: None) -> dict:
    """The rows of one contender; `save(rows)` after each, so a run cut short keeps what it measured."""
    rows = {}
    for batch, context in decode_grid:
        if isinstance(contender, Transformers) and contender.expanded_bytes(batch, context) > EXPAND_BUDGET:
            rows[("decode", batch, context)] = None
            continue
        step = contender.decoder(batch, context, repeats + 2)
        with PeakRSS() as peak, torch.no_grad():  # as generation runs
            times = best_times({"step": step, **machine.probes()}, repeats, device)
        rows[("decode", batch, context)] = dict(s=times["step"], bw=machine.bandwidth(times),
                                                mm=machine.matmul_rate(times), peak=peak.peak)
        save(rows)
        del step
        gc.collect()
    for T in prefill_lengths:
        run = contender.prefill(T)
        gc.collect()
        base = rss()
        with PeakRSS() as peak, torch.no_grad():
            times = best_times({"run": run, **machine.probes()}, max(1, repeats // 2), device)
        rows[("prefill", 1, T)] = dict(s=times["run"], mm=machine.matmul_rate(times), peak=peak.peak - base)
        save(rows)
        del run
        gc.collect()
    return rows


def key_name(key: tuple) -> str:
    return "/".join(map(str, key))


def run_contender(args: argparse.Namespace) -> None:
    """One contender in this process (`--contender`): its rows as JSON to `--rows`."""
    ckpt, hf = args.work / "kimivl", args.work / "hf"
    device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    machine = Machine(device, dtype, [(512, 2048, 3072), (2048, 2048, 1408)])
    contender = (Transformers(hf) if args.contender == "transformers" else
                 Ours(ckpt, dtype, prepack=args.contender == "kimivl"))
    grid = [(b, c) for b in args.batches for c in args.contexts]
    prefill = args.prefill if args.contender != "transformers" else [T for T in args.prefill if T <= HF_PREFILL_MAX]
    measure(contender, grid, prefill, args.repeats, machine, device,
            lambda rows: args.rows.write_text(json.dumps({key_name(k): v for k, v in rows.items()})))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kimivl-bench-decode"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2048, 8192])
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="kimivl's weights and activations (bfloat16: on a CPU with fast bfloat16; transformers "
                             "is then not run)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--reuse", action="store_true", help="print the table from the rows an earlier run left in "
                        "--work instead of measuring again (load figures are measured anew)")
    parser.add_argument("--contender", choices=["kimivl", "kimivl-plain", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.contender:
        return run_contender(args)
    ckpt, hf = write_model(args.work, args.layers)
    decode_grid = [(b, c) for b in args.batches for c in args.contexts]
    cfg = TextConfig(num_hidden_layers=args.layers)
    with torch.device("meta"):  # shapes only: the bytes and FLOPs the work needs
        from kimivl.decoder import DeepseekV3ForCausalLM
        shapes = DeepseekV3ForCausalLM(cfg).to(getattr(torch, args.dtype))
    need = {key: decode_bytes(shapes, cfg, key[0], key[1]) for key in decode_grid}
    work = {key: decode_flops(shapes, cfg, key[0], key[1]) for key in decode_grid}
    flops = {T: prefill_flops(shapes, cfg, T) for T in args.prefill}
    print(f"A3B decoder widths, {args.layers} layers, full vocabulary, {args.dtype}; {describe(torch.device('cpu'))}; "
          f"'—': not measured, transformers' per-head keys and values (expanded each step) over "
          f"{EXPAND_BUDGET / 2 ** 30:.0f} GiB a layer, or its prefill past {HF_PREFILL_MAX} tokens\n")
    names = ["kimivl"] + ([] if args.skip_transformers or args.dtype != "float32" else ["transformers"])
    if prepackable(torch.device("cpu"), getattr(torch, args.dtype)):  # the baseline of prepacking, in the same run
        names.append("kimivl-plain")
    results, loads = {}, {}
    for n in names:  # each in a fresh process: the two models never share this machine's memory
        loads[n] = load_peak(hf if n == "transformers" else ckpt, n, args.dtype)
        rows = args.work / f"rows-{n}{'' if args.dtype == 'float32' else '-' + args.dtype}.json"
        cmd = [sys.executable, __file__, "--contender", n, "--rows", str(rows), "--work", str(args.work),
               "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--batches", *map(str, args.batches), "--contexts",
               *map(str, args.contexts), "--prefill", *map(str, args.prefill)]
        if not (args.reuse and rows.exists()):
            done = subprocess.run(cmd)
            if done.returncode:
                print(f"{n} stopped (exit {done.returncode}): its rows so far are shown", file=sys.stderr)
        results[n] = json.loads(rows.read_text()) if rows.exists() else {}
    print("| work | " + " | ".join(f"{n} ms | {n} tok/s | {n} % of roofline" for n in names) + " | roofline ms |")
    print("|---|" + "---|---|---|" * len(names) + "---|")
    for key in [("decode", b, c) for b, c in decode_grid] + [("prefill", 1, T) for T in args.prefill]:
        kind, batch, length = key
        rows = {n: results[n].get(key_name(key)) for n in names}
        limits = []  # from each contender's own probes; the row's roofline is the smallest: the machine at its best
        for row in filter(None, rows.values()):
            if kind == "decode":  # the slower of reading the bytes and doing the matmuls
                limits.append(max(need[(batch, length)] / row["bw"], work[(batch, length)] / row["mm"]))
            else:
                limits.append(flops[length] / row["mm"])
        limit = min(limits, default=None)
        cells = []
        for row in rows.values():
            if row is None:  # not measured: transformers' per-step expansion or prefill over its budget
                cells.append("— | — | —")
                continue
            tokens = batch if kind == "decode" else length
            cells.append(f"{row['s'] * 1e3:.1f} | {tokens / row['s']:.1f} | {100 * limit / row['s']:.0f}%")
        label = f"decode B={batch} ctx={length}" if kind == "decode" else f"prefill {length}"
        print(f"| {label} | " + " | ".join(cells) + (f" | {limit * 1e3:.1f} |" if limit else " | — |"))
    print("\nprefill memory above the model (peak RSS during the call):")
    for n in names:
        print(f"  {n}: " + ", ".join(f"{T}: {results[n][key_name(('prefill', 1, T))]['peak'] / 2 ** 30:.2f} GiB"
                                     for T in args.prefill if results[n].get(key_name(("prefill", 1, T)))))
    print("\nload (fresh process): " + "; ".join(f"{n} {s:.1f} s, peak {r:.2f}x the weights"
                                                 for n, (s, r) in loads.items()))
    if args.json:
        args.json.write_text(json.dumps(results | {"load": loads}, indent=1))


if __name__ == "__main__":
    main()
