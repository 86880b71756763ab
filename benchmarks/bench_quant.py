"""Weight-only int8 / int4 on this CPU: A3B-width layers against float32, and the whole Kimi-VL-A3B quantized.

    .venv/bin/python benchmarks/bench_quant.py layers [--repeats 30] [--out DIR]
    .venv/bin/python benchmarks/bench_quant.py a3b [--work /tmp/kimivl-bench-quant] [--schemes int8,int4] [--out DIR]
    .venv/bin/python benchmarks/bench_quant.py accuracy [--model runs/tiny-shapes] [--out DIR]

`layers`: one attention layer (batch-1 decode step over a 512-token latent cache) and one MoE layer (64 routed experts,
top 6, plus the shared ones; a different token each call, so the experts change) at A3B widths (the published
config.json), random weights (N(0, 0.02)), float32 against int8 and int4 (groups of 128) in the same process, with
the memory-bandwidth roofline for the bytes each call reads: the weights it uses, as stored (float32, or int8 / int4
plus bfloat16 scales), and the cache; bandwidth probed over 2 GiB in the same interleaved rounds (limits.Machine).
Also the output error of each quantized layer against float32 (|y_q - y| / |y| over 64 tokens).

`accuracy`: held-out exact match (`kimivl eval`, `ocr` metric) of a model that knows something, loaded in float32,
int8 and int4 (groups of 32: its widths are 64-256): recipes/tiny_shapes.py's model (the colour and the number of
shapes in an image), given as --model (default runs/tiny-shapes, where the recipe writes it).

`a3b`: the full model (MoonViT, projector, 27-layer decoder) written once as a random bfloat16 checkpoint in the
official layout under --work (33 GB, the published config.json and tokenizer files; kept out of git), then, for each
scheme in a fresh process: load time and peak resident memory while loading (`from_pretrained(quantize=...)`, the
weights read from disk), time to first token and to 64 tokens for one image (assets/sample.png) and a question, and
decode tokens/s at 512 and 4,096 tokens of context (a random latent cache, batch 1). A scheme named `int4-ct` is
first written by `kimivl-weights quantize` (compressed-tensors) and then loaded from that. float32 (65 GB) and bfloat16
(33 GB) do not fit in this machine's 24 GiB, so there is no float row.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kimivl import KimiVLConfig, MLACache
from kimivl.quant import QuantLinear, Scheme, quantize_model, quantized_bytes
from limits import Machine, best_times, describe

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official" / "kimi-vl-a3b-instruct"
SCHEMES = {"float32": None, "int8": Scheme(8, None), "int4": Scheme(4, 128)}


def a3b_config(layers: int | None = None, tiny_vision: bool = False) -> KimiVLConfig:
    cfg = KimiVLConfig.from_json(OFFICIAL / "config.json")
    if layers is not None:
        cfg.text_config.num_hidden_layers = layers
    if tiny_vision:
        v = cfg.vision_config
        v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.num_attention_heads = 1, 64, 64, 1
    return cfg


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- layers -------------------------------------------------------------------------------------------------------
def weight_bytes(module: torch.nn.Module, experts_used: float | None = None) -> int:
    """Bytes of the weights a call reads: all of them, or for routed experts `experts_used` of E."""
    total = 0
    for m in module.modules():
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        size = sum(t.nbytes for t in own)
        if isinstance(m, QuantLinear) and m.data.dim() == 3 or type(m).__name__ == "Experts":
            size = size * experts_used / next(iter(own)).shape[0]
        total += size
    return int(total)


def layers(args: argparse.Namespace) -> dict:
    from kimivl.model import KimiVLForConditionalGeneration, init_weights
    cfg = a3b_config(layers=2, tiny_vision=True)  # layer 0 dense, layer 1 MoE
    t = cfg.text_config
    base = KimiVLForConditionalGeneration(cfg)
    init_weights(base, seed=0)
    base.eval()
    models = {"float32": base}
    for name in ("int8", "int4"):
        models[name] = quantize_model(copy.deepcopy(base), SCHEMES[name])
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 1, 1, t.hidden_size, generator=gen)
    context = 512
    cache = MLACache(t, 1, context + 1)
    cache.latent.normal_(generator=gen)
    cache.k_pe.normal_(generator=gen)
    cache.valid[:] = True
    slot = torch.tensor([context])
    from kimivl.rope import rope_1d_angles
    angles = rope_1d_angles(torch.tensor([[context]]), t.qk_rope_head_dim, t.rope_theta)
    cos, sin = angles.cos(), angles.sin()
    mask = cache.valid[:, None, None, :]
    fns, counters, rows = {}, {}, []
    for name, model in models.items():
        layer = model.language_model.model.layers[1]
        counters[name] = [0]

        def attn(layer=layer, c=counters[name]):
            c[0] += 1
            return layer.self_attn(xs[c[0] % 64], cos, sin, mask, cache, 1, slot)

        def moe(layer=layer, c=counters[name]):
            c[0] += 1
            return layer.mlp(xs[c[0] % 64])
        fns[f"attention {name}"], fns[f"moe {name}"] = attn, moe
    machine = Machine(device, torch.float32, [], probe_elements=512 * 2 ** 20)  # 2 GiB: beyond any cache
    with torch.no_grad():
        times = best_times(fns | machine.probes(), args.repeats, device)
        bw = machine.bandwidth(times)
        out = {}
        for part in ("attention", "moe"):
            ref = [(fns[f"{part} float32"]()) for _ in range(64)]
            for name, model in models.items():
                layer = model.language_model.model.layers[1]
                counters[name][0] = counters["float32"][0] - 64  # the same 64 tokens as the reference
                err = [((fns[f"{part} {name}"]() - r).norm() / r.norm()).item() for r in ref]
                if part == "attention":
                    used = weight_bytes(layer.self_attn) + cache.latent[1].nbytes + cache.k_pe[1].nbytes
                else:
                    used = weight_bytes(layer.mlp, experts_used=t.num_experts_per_tok)
                ms = times[f"{part} {name}"] * 1e3
                rows.append({"layer": part, "weights": name, "ms": ms, "MB read": used / 1e6,
                             "roofline ms": used / bw * 1e3, "of roofline": used / bw * 1e3 / ms,
                             "vs float32": times[f"{part} float32"] / times[f"{part} {name}"],
                             "rel error": sum(err) / len(err)})
        out = {"bandwidth GB/s": bw / 1e9, "rows": rows, "machine": describe(device),
               "cpu": torch.backends.cpu.get_cpu_capability(), "repeats": args.repeats}
    return out


# ---- the whole A3B ------------------------------------------------------------------------------------------------
def write_random_a3b(work: Path) -> Path:
    """A random bfloat16 Kimi-VL-A3B in the official layout at work/a3b-bf16 (reused when complete): N(0, 0.02)
    weights, norms 1, biases and router correction biases 0, written shard by shard in 8M-element chunks."""
    from kimivl.checkpoint import KEEP_FLOAT32, TensorSource, expected_tensors, write_shards
    out = work / "a3b-bf16"
    if (out / "config.json").exists():
        return out
    stage = work / "a3b-bf16.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    config = KimiVLConfig.from_json(OFFICIAL / "config.json")
    gen = torch.Generator().manual_seed(0)

    def chunks(name: str, n: int, dtype: torch.dtype):
        for a in range(0, n, 2 ** 23):
            m = min(2 ** 23, n - a)
            if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
                yield torch.ones(m, dtype=dtype)
            elif name.endswith(".bias") or name.endswith(KEEP_FLOAT32):
                yield torch.zeros(m, dtype=dtype)
            else:
                yield torch.randn(m, generator=gen).mul_(0.02).to(dtype)

    sources = {}
    for name, shape in expected_tensors(config).items():
        dtype = torch.float32 if name.endswith(KEEP_FLOAT32) else torch.bfloat16
        sources[name] = TensorSource(dtype, shape, chunks(name, int(torch.Size(shape).numel()), dtype))
    t0 = time.perf_counter()
    write_shards(stage, sources, "5GB")
    for f in OFFICIAL.iterdir():
        if f.name != "model.safetensors.index.json":
            shutil.copy(f, stage / f.name)
    stage.rename(out)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def run_scheme(ckpt: Path, scheme: str, contexts: list[int]) -> dict:
    """One scheme in this process: load, one image + question to 64 tokens, decode at each context."""
    from kimivl.generation import generate_tokens, GenerationConfig
    from kimivl.model import KimiVLForConditionalGeneration
    from kimivl.processing import KimiVLProcessor
    written = None
    if scheme.endswith("-ct"):  # first written as a compressed-tensors checkpoint (another process), then loaded
        scheme, src, ckpt = scheme[:-3], ckpt, ckpt.parent / f"a3b-{scheme}"
        if not (ckpt / "config.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "weights_tools", "quantize", str(src), str(ckpt), "--scheme", scheme],
                           check=True, capture_output=True, cwd=ROOT)
            written = time.perf_counter() - t0
    base = peak_rss()
    t0 = time.perf_counter()
    model = KimiVLForConditionalGeneration.from_pretrained(ckpt, quantize=None if written is not None or
                                                           ckpt.name.endswith("-ct") else scheme, progress=False)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss()
    processor = KimiVLProcessor.from_pretrained(ckpt)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "assets" / "sample.png")},
                                             {"type": "text", "text": "What is in this image?"}]}]
    with torch.no_grad():
        t0 = time.perf_counter()
        inputs = processor(messages)
        steps = generate_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                inputs["image_grid_hws"], GenerationConfig(max_new_tokens=64), stop_ids=[], pad_id=0)
        next(steps)
        ttft = time.perf_counter() - t0
        n = 1 + sum(1 for _ in steps)
        total = time.perf_counter() - t0
        prompt = int(inputs["input_ids"].shape[1])
        lm, t = model.language_model, model.config.text_config
        decode = {}
        for context in contexts:
            cache = MLACache(t, 1, context + 40, dtype=model.dtype)
            cache.latent[:, :, :context].normal_()
            cache.k_pe[:, :, :context].normal_()
            cache.valid[:, :context] = True
            cache.advance(context)
            token = torch.randint(0, t.vocab_size, (1, 1))
            times = []
            for i in range(12):
                s = time.perf_counter()
                hidden = lm.hidden_states(lm.model.embed_tokens(token), torch.full((1, 1), cache.length), None, cache)
                token = lm.lm_head(hidden[:, -1]).float().argmax(-1, keepdim=True)
                times.append(time.perf_counter() - s)
            decode[context] = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up steps
            del cache
    return {"scheme": scheme, "from": ckpt.name, "files GB": sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            / 1e9, "quantize_checkpoint s": written, "load s": load_s, "load peak GB": (load_peak - base) / 1e9,
            "peak GB": (peak_rss() - base) / 1e9, "model GB": quantized_bytes(model) / 1e9,
            "prompt tokens": prompt, "ttft s": ttft, "64 tokens s": total, "new tokens": n,
            "decode ms": {str(c): v * 1e3 for c, v in decode.items()},
            "decode bytes": decode_bytes(model), "cpu": torch.backends.cpu.get_cpu_capability()}


def decode_bytes(model) -> int:
    """The weight bytes one decode token reads: everything in the decoder but the other routed experts and the
    embedding table (one row)."""
    lm, t = model.language_model, model.config.text_config
    return weight_bytes(lm, t.num_experts_per_tok) - weight_bytes(lm.model.embed_tokens)


def a3b(args: argparse.Namespace) -> dict:
    ckpt = write_random_a3b(Path(args.work))
    results = []
    for scheme in args.schemes.split(","):
        proc = subprocess.run([sys.executable, __file__, "a3b-run", str(ckpt), scheme], text=True,
                              capture_output=True)
        if proc.returncode:
            results.append({"scheme": scheme, "error": proc.stderr[-2000:]})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    return {"machine": describe(torch.device("cpu")), "checkpoint GB": sum(
        f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9, "rows": results}


def accuracy(args: argparse.Namespace) -> dict:
    from kimivl.eval.runner import run_benchmark
    root = Path(args.model)
    rows = []
    for name, scheme, group in (("float32", None, None), ("int8", "int8", None), ("int4 g32", "int4", 32)):
        t0 = time.perf_counter()
        report = run_benchmark(str(root / "sft" / "model"), root / "heldout" / "heldout.jsonl", "ocr",
                               Path(args.work) / f"accuracy-{name.replace(' ', '-')}", progress=False,
                               quantize=scheme, group_size=group)
        rows.append({"weights": name, "exact match": report["overall"]["score"], "n": report["overall"]["n"],
                     **{k: v["score"] for k, v in report["categories"].items()},
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {"model": str(root / "sft" / "model"), "rows": rows, "machine": describe(torch.device("cpu"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["layers", "a3b", "a3b-run", "accuracy"])
    p.add_argument("args", nargs="*")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--work", default="/tmp/kimivl-bench-quant")
    p.add_argument("--schemes", default="int8,int4")
    p.add_argument("--out", help="write the result JSON here (a folder)")
    p.add_argument("--model", default=str(ROOT / "runs" / "tiny-shapes"), help="recipes/tiny_shapes.py's --out")
    args = p.parse_args()
    if args.part == "a3b-run":
        print(json.dumps(run_scheme(Path(args.args[0]), args.args[1], [512, 4096])))
        return
    result = {"layers": layers, "a3b": a3b, "accuracy": accuracy}[args.part](args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"bench_quant_{args.part}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
