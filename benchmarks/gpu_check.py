"""The CUDA path on a real GPU, checked and timed in one run: kernel tests, model agreement, MoE layer, MLA decode,
the full A3B decoding and prefilling, and the vision tower, each row against this machine's measured limits.

    python benchmarks/gpu_check.py OUT_DIR [--only SECTION ...] [--budget SECONDS]   # on one GPU (~4 min on an H200)
    python benchmarks/gpu_check.py OUT_DIR --dry-run                               # tiny shapes, any machine

Writes OUT_DIR/gpu_check.json (every figure) and OUT_DIR/gpu_check.md (the tables), after each section, so a run cut
short still leaves what it measured. Sections:
- machine: copy bandwidth (a 2 GiB device copy, bytes read + written) and bf16 matmul rate (8192^3), the ceilings
  every roofline ratio below uses;
- tests: tests/test_kernels_triton.py and tests/test_kernels.py under pytest on this device (the Triton kernels
  compiled for it, not interpreted);
- agreement: tiny and wider random checkpoints loaded on the device (triton backend, float32 and bfloat16) against
  the CPU float32 torch reference: logits, and greedy tokens (and captured-graph decoding against eager decoding);
- moe: one MoE layer at A3B widths (bf16; 1, 64, 4096 tokens): triton, torch (grouped_mm) and transformers'
  DeepseekV3MoE, against max(bytes of the weights touched / bandwidth, FLOPs / matmul rate);
- mla: absorbed MLA decode attention (A3B widths, 1k-128k cached tokens, batch 1 and 16): Triton kernel and torch
  reference against the bytes-read limit;
- a3b: the full 27-layer A3B with random bf16 weights built on the GPU: prefill 8k tokens, decode steps (captured
  CUDA graph, and eager for comparison) at batch 1/8/32/128 over 1k and 16k cached tokens, end-to-end greedy
  `generate_tokens`, and the packed vision tower (one 1792x1792 image + 4 others) against a per-image loop.
Exit status 1 when a correctness check failed (the reports are still written), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from kimivl import KimiVLConfig, KimiVLForConditionalGeneration  # noqa: E402
from kimivl.cuda_graphs import decoder_step, release_graphs  # noqa: E402
from kimivl.decoder import MoE  # noqa: E402
from kimivl.generation import GenerationConfig, GenerationStats, generate_tokens  # noqa: E402
from kimivl.kernels.mla import absorbed_attention_reference  # noqa: E402
from kimivl.model import init_weights  # noqa: E402

GiB = 2 ** 30


@dataclass
class Profile:
    """Problem sizes: `full` for one large GPU, `dry` for a quick run anywhere (CI runs it on CPU)."""

    copy_bytes: int
    matmul_n: int
    dtypes: tuple[str, ...]  # agreement runs
    bench_dtype: str  # moe, mla, a3b
    wide: bool  # agreement on the wider random model too
    moe_preset: str
    moe_tokens: tuple[int, ...]
    mla_preset: str
    mla_contexts: tuple[int, ...]
    mla_batches: tuple[int, ...]
    a3b_preset: str
    prefill: int
    decode_contexts: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_steps: int
    eager_batches: tuple[int, ...]
    generate_prompt: int
    generate_tokens: int
    vision_grids: tuple[tuple[int, int], ...]
    run_tests: bool


PROFILES = {
    "full": Profile(copy_bytes=2 * GiB, matmul_n=8192, dtypes=("float32", "bfloat16"), bench_dtype="bfloat16",
                    wide=True, moe_preset="a3b", moe_tokens=(1, 64, 4096), mla_preset="a3b",
                    mla_contexts=(1024, 8192, 32768, 131072), mla_batches=(1, 16), a3b_preset="a3b", prefill=8192,
                    decode_contexts=(1024, 16384), decode_batches=(1, 8, 32, 128), decode_steps=24,
                    eager_batches=(1, 32), generate_prompt=1024, generate_tokens=128,
                    vision_grids=((128, 128), (32, 32), (24, 40), (16, 20), (8, 8)), run_tests=True),
    "dry": Profile(copy_bytes=16 * 2 ** 20, matmul_n=256, dtypes=("float32",), bench_dtype="float32", wide=False,
                   moe_preset="tiny", moe_tokens=(1, 20), mla_preset="tiny", mla_contexts=(40, 100),
                   mla_batches=(1, 2), a3b_preset="tiny", prefill=48, decode_contexts=(30,), decode_batches=(1, 2),
                   decode_steps=2, eager_batches=(1,), generate_prompt=20, generate_tokens=4,
                   vision_grids=((8, 8), (4, 6), (2, 2)), run_tests=False),
}


# ---- timing and limits ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, repeats: int = 5, warmup: int = 1, min_seconds: float = 2e-3
                     ) -> float:
    """Median over `repeats` measurements of the time per call of fn(i) (i counts calls, so fn can rotate inputs);
    each measurement runs enough calls to last about min_seconds. CUDA events on a GPU, perf_counter elsewhere."""
    calls = 0
    for _ in range(warmup):
        fn(calls)
        calls += 1
    sync(device)
    start = time.perf_counter()
    fn(calls)
    calls += 1
    sync(device)
    inner = max(1, min(200, int(min_seconds / max(time.perf_counter() - start, 1e-7))))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn(calls)
                calls += 1
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(calls)
                calls += 1
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


@dataclass
class Limits:
    bandwidth: float  # bytes/s
    matmul: float  # FLOP/s in the benchmark dtype

    def time(self, nbytes: float, flops: float = 0.0) -> float:
        """The roofline: the larger of moving `nbytes` and computing `flops`."""
        return max(nbytes / self.bandwidth, flops / self.matmul)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN anywhere gives inf)."""
    d = (got.double().cpu() - want.double().cpu()).abs().max()
    err = (d / want.double().abs().max().cpu()).item()
    return err if math.isfinite(err) else float("inf")


# ---- the report -----------------------------------------------------------------------------------------------
@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)  # {"what", "value", "limit", "ok"}
    error: str | None = None
    seconds: float = 0.0

    def check(self, what: str, value: float, limit: float, ok: bool | None = None) -> bool:
        ok = bool(value <= limit) if ok is None else ok
        self.checks.append({"what": what, "value": value, "limit": limit, "ok": ok})
        return ok

    @property
    def ok(self) -> bool:
        return self.error is None and all(c["ok"] for c in self.checks)


class Report:
    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.sections = out, meta, {}

    def write(self) -> None:
        data = {"meta": self.meta, "sections": {k: asdict(s) | {"ok": s.ok} for k, s in self.sections.items()}}
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")
        tmp = self.out / "gpu_check.md.tmp"
        tmp.write_text(self.markdown())
        tmp.replace(self.out / "gpu_check.md")

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# GPU check: {m['device']}", "",
                 f"{m['date']}; torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}, "
                 f"Python {m['python']}; profile `{m['profile']}`.", ""]
        for s in self.sections.values():
            lines += [f"## {s.title} ({'ok' if s.ok else 'FAILED'}, {s.seconds:.0f} s)", ""]
            if s.rows:
                lines += ["| " + " | ".join(s.columns) + " |", "|" + "---|" * len(s.columns)]
                lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in s.rows]
                lines.append("")
            for c in s.checks:
                if not c["ok"]:
                    lines.append(f"- FAILED: {c['what']}: {fmt(c['value'])} (limit {fmt(c['limit'])})")
            lines += [f"- {n}" for n in s.notes]
            if s.error:
                lines += ["", "```", s.error.strip()[-3000:], "```"]
            lines.append("")
        return "\n".join(lines)


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.2e}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.3g}"
    return str(v)


# ---- sections -------------------------------------------------------------------------------------------------
def machine(sec: Section, p: Profile, device: torch.device) -> Limits:
    sec.columns = ["probe", "size", "time", "rate"]
    src = torch.randn(p.copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = seconds_per_call(lambda i: dst.copy_(src), device, repeats=7)
    bandwidth = 2 * src.nbytes / t
    sec.rows.append(["device copy (read + write)", f"{src.nbytes / GiB:.2f} GiB", f"{t * 1e3:.3f} ms",
                     f"{bandwidth / 1e12:.2f} TB/s"])
    del src, dst
    dtype = getattr(torch, p.bench_dtype)
    n = p.matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = seconds_per_call(lambda i: a @ b, device, repeats=7)
    rate = 2 * n ** 3 / t
    sec.rows.append([f"{p.bench_dtype} matmul", f"{n}^3", f"{t * 1e3:.3f} ms", f"{rate / 1e12:.1f} TFLOP/s"])
    sec.notes.append("random inputs; median of 7 timed batches after a warm-up; every roofline below uses these two")
    return Limits(bandwidth, rate)


def run_tests(sec: Section, out: Path, timeout: float) -> None:
    sec.columns = ["tests", "passed", "failed", "skipped", "seconds"]
    files = ["tests/test_kernels_triton.py", "tests/test_kernels.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KIMIVL_BACKEND")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                           f"--junitxml={out / 'gpu_tests.xml'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    import xml.etree.ElementTree as ET
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, fail = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    sec.rows.append([" ".join(files), total - fail - skipped, fail, skipped, round(time.perf_counter() - start)])
    sec.check("pytest exit status", proc.returncode, 0)
    sec.check("kernel tests skipped on the GPU", skipped, 0)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    sec.notes.append(f"pytest: {tail}")
    if proc.returncode:
        sec.notes.append("failures: " + "; ".join(line for line in proc.stdout.splitlines()
                                                  if line.startswith(("FAILED", "ERROR")))[:2000])


def prompt_inputs(cfg: KimiVLConfig, seed: int = 0) -> dict:
    """Two left-padded rows with one image each (8x8 and 4x4 patch grids), random text around them."""
    gen = torch.Generator().manual_seed(seed)
    pad_id = cfg.media_placeholder_token_id
    rows, grids = [], [(8, 8), (4, 4)]
    for length, (h, w) in zip((40, 28), grids):
        text = torch.randint(0, 1000, (length - h * w // 4,), generator=gen)
        rows.append(torch.cat([text[:5], torch.full((h * w // 4,), pad_id), text[5:]]))
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    pixels = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_hws=torch.tensor(grids))


def wide_config() -> KimiVLConfig:
    from bench_generate import wide_config as wide
    return wide()


def agreement(sec: Section, p: Profile, device: torch.device, work: Path) -> None:
    """Checkpoints written to disk, loaded on the device, against CPU float32 torch."""
    sec.columns = ["model", "dtype", "logits rel err vs CPU fp32", "triton vs torch on device", "greedy tokens = CPU",
                   "graph = eager tokens", "new tokens"]
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
    models = {"tiny": KimiVLConfig.preset("tiny")}
    if p.wide:
        models["wide"] = wide_config()
    n_new = 12
    for (name, cfg), dtype in [(m, d) for m in models.items() for d in p.dtypes]:
        # float32: router biases that leave the choice to the scores (routing itself is checked); bfloat16: biases
        # that settle it, since on random weights bf16 rounding alone flips near-tied experts, which is no kernel
        # error (measured on CPU, torch bf16 vs float32 logits: tiny 0.20 at std 0.05, 0.011 at 1; wide 0.43 at
        # std 1, 0.029 at 4)
        bias_std = 0.05 if dtype == "float32" else 4.0
        model = KimiVLForConditionalGeneration(cfg)
        init_weights(model, seed=0)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith("e_score_correction_bias"):
                    param.normal_(std=bias_std)
        path = work / f"{name}-{dtype}"
        model.save_pretrained(path)
        del model
        ref = KimiVLForConditionalGeneration.from_pretrained(path, dtype="float32", progress=False).eval()
        inputs = prompt_inputs(cfg)
        os.environ["KIMIVL_BACKEND"] = "torch"
        try:
            with torch.no_grad():
                want = ref(**inputs).logits
            want_tokens = ref.generate(**inputs, max_new_tokens=n_new, stop_ids=[]).tolist()
        finally:
            del os.environ["KIMIVL_BACKEND"]
        real = inputs["attention_mask"].bool()
        model = KimiVLForConditionalGeneration.from_pretrained(path, dtype=dtype, device=device,
                                                               progress=False).eval()
        dev_inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            os.environ["KIMIVL_BACKEND"] = "triton"
            try:
                got = model(**dev_inputs).logits.cpu()
                graph = model.generate(**dev_inputs, max_new_tokens=n_new, stop_ids=[]).tolist()
                eager_tokens = torch.stack(list(generate_tokens(
                    model, **dev_inputs, config=GenerationConfig(max_new_tokens=n_new), cuda_graph=False)),
                    1).tolist()
            finally:
                os.environ["KIMIVL_BACKEND"] = "torch"
            try:
                torch_logits = model(**dev_inputs).logits.cpu()
            finally:
                del os.environ["KIMIVL_BACKEND"]
        err = rel_err(got[real], want[real])
        backend_err = rel_err(got[real], torch_logits[real])
        same = sum(a == b for row_a, row_b in zip(graph, want_tokens) for a, b in zip(row_a, row_b))
        total = sum(len(r) for r in want_tokens)
        sec.rows.append([name, dtype, err, backend_err, f"{same}/{total}", graph == eager_tokens, n_new])
        sec.check(f"{name} {dtype} logits vs CPU float32", err, tolerance[dtype])
        sec.check(f"{name} {dtype} triton vs torch backend on the device", backend_err, tolerance[dtype])
        sec.check(f"{name} {dtype} graph decoding = eager decoding", 0, 0, ok=graph == eager_tokens)
        if dtype == "float32":
            sec.check(f"{name} float32 greedy tokens = CPU", total - same, 0)
        del model
        del ref
    sec.notes.append("random weights saved as official checkpoints and loaded with from_pretrained on the device; "
                     "two left-padded prompts with one image each; logits over real positions; greedy tokens from "
                     "model.generate (captured CUDA graph on a GPU) against the CPU float32 torch run. float32 must "
                     "agree to 1e-4 and give the same tokens; bfloat16 to 5e-2 (random weights leave small logit "
                     "margins, so its greedy tokens may part from float32's: shown, not required). Router correction "
                     "biases ~N(0, 0.05) for float32 and ~N(0, 4) for bfloat16 (settled routing: see the code)")


def moe(sec: Section, p: Profile, device: torch.device, limits: Limits) -> None:
    from bench_moe import transformers_twin

    dtype = getattr(torch, p.bench_dtype)
    t = KimiVLConfig.preset(p.moe_preset).text_config
    E, H, I, k, S = t.n_routed_experts, t.hidden_size, t.moe_intermediate_size, t.num_experts_per_tok, \
        t.n_shared_experts
    torch.manual_seed(0)
    ours = MoE(t).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.data = torch.randn(E, device=device) * 0.01  # float32, as loaded
    contenders = {"triton": ("triton", ours), "torch": ("torch", ours)}
    for impl in ("eager", "grouped_mm"):
        try:
            contenders[f"HF {impl}"] = (None, transformers_twin(ours, impl))
        except Exception as e:  # noqa: BLE001 (an older transformers without that implementation)
            sec.notes.append(f"HF {impl}: not available ({type(e).__name__}: {e})")
    names = list(contenders)
    sec.columns = ["tokens", *[f"{n} ms" for n in names], "limit ms", *[f"{n} / limit" for n in names],
                   "max rel diff vs HF eager"]
    expert_bytes = 3 * H * I * dtype.itemsize
    for T in p.moe_tokens:
        xs = [torch.randn(1, T, H, device=device, dtype=dtype) for _ in range(4)]
        with torch.no_grad():
            scores = torch.sigmoid(xs[0][0].float() @ ours.gate.weight.float().T) + ours.gate.e_score_correction_bias
            touched = scores.topk(k).indices.unique().numel()
        nbytes = (touched + S) * expert_bytes + E * H * dtype.itemsize + 2 * T * H * dtype.itemsize
        flops = 2 * T * ((k + S) * 3 * H * I + H * E)
        limit = limits.time(nbytes, flops)
        times, outs = {}, {}
        for n, (backend, module) in contenders.items():
            def call(i, module=module):
                return module(xs[i % len(xs)])
            with torch.no_grad():
                if backend:
                    os.environ["KIMIVL_BACKEND"] = backend
                try:
                    times[n] = seconds_per_call(call, device)
                    outs[n] = call(0).float()
                finally:
                    os.environ.pop("KIMIVL_BACKEND", None)
        ref = outs.get("HF eager", outs["torch"])
        diff = max(rel_err(o, ref) for n, o in outs.items() if n != "HF eager")
        sec.rows.append([T, *[times[n] * 1e3 for n in names], limit * 1e3, *[times[n] / limit for n in names], diff])
        sec.check(f"MoE {T} tokens: outputs agree", diff, 2e-2 if dtype != torch.float32 else 1e-5)
    sec.notes.append(f"{p.moe_preset} widths: hidden {H}, {E} experts x {I}, top-{k}, {S} shared, {p.bench_dtype}; "
                     "limit = max(bytes of the touched + shared experts, router and activations / bandwidth, FLOPs / "
                     "matmul rate); inputs rotate over 4 sets; HF twins hold the very same Parameters")


def mla(sec: Section, p: Profile, device: torch.device, limits: Limits) -> None:
    import triton

    from kimivl.kernels.triton_mla import absorbed_attention_triton

    dtype = getattr(torch, p.bench_dtype)
    t = KimiVLConfig.preset(p.mla_preset).text_config
    heads, nope, R, C, V = (t.num_attention_heads, t.qk_nope_head_dim, t.qk_rope_head_dim, t.kv_lora_rank,
                            t.v_head_dim)
    from kimivl.kernels import triton_mla

    sec.columns = ["batch", "context", "splits", "cache MB read", "triton ms", "triton 1-pass ms", "torch ms",
                   "limit ms", "triton / limit", "1-pass / limit", "torch / limit", "triton GB/s", "rel err"]
    scale = (nope + R) ** -0.5
    gen = torch.Generator(device=device).manual_seed(0)
    kv_b = torch.randn(heads * (nope + V), C, device=device, dtype=dtype, generator=gen) / C ** 0.5
    for B in p.mla_batches:
        for S in p.mla_contexts:
            cache_bytes = B * S * (C + R) * dtype.itemsize
            copies = max(1, min(8, (256 * 2 ** 20) // cache_bytes))  # rotate past the L2 cache
            latent = torch.randn(copies, B, S, C, device=device, dtype=dtype, generator=gen)
            k_pe = torch.randn(copies, B, S, R, device=device, dtype=dtype, generator=gen)
            q_nope = torch.randn(B, 1, heads, nope, device=device, dtype=dtype, generator=gen)
            q_pe = torch.randn(B, 1, heads, R, device=device, dtype=dtype, generator=gen)
            with torch.no_grad():
                tri = seconds_per_call(lambda i: absorbed_attention_triton(
                    q_nope, q_pe, latent[i % copies], k_pe[i % copies], kv_b, None, scale), device)
                chosen = triton_mla.num_splits
                triton_mla.num_splits = lambda programs, S, block_s: (1, S)
                try:
                    one_pass = seconds_per_call(lambda i: absorbed_attention_triton(
                        q_nope, q_pe, latent[i % copies], k_pe[i % copies], kv_b, None, scale), device)
                finally:
                    triton_mla.num_splits = chosen
                ref_t = seconds_per_call(lambda i: absorbed_attention_reference(
                    q_nope, q_pe, latent[i % copies], k_pe[i % copies], kv_b, None, scale), device)
                got = absorbed_attention_triton(q_nope, q_pe, latent[0], k_pe[0], kv_b, None, scale)
                want = absorbed_attention_reference(q_nope.float(), q_pe.float(), latent[0].float(),
                                                    k_pe[0].float(), kv_b.float(), None, scale)
            err = rel_err(got, want)
            nbytes = cache_bytes + kv_b.nbytes
            limit = limits.time(nbytes)
            splits = triton_mla.num_splits(B * triton.cdiv(heads, triton_mla.BLOCK_H), S, 32)[0]
            sec.rows.append([B, S, splits, cache_bytes / 1e6, tri * 1e3, one_pass * 1e3, ref_t * 1e3, limit * 1e3,
                             tri / limit, one_pass / limit, ref_t / limit, nbytes / tri / 1e9, err])
            sec.check(f"MLA B={B} S={S} vs float32 reference", err, 2e-2 if dtype != torch.float32 else 1e-5)
            del latent, k_pe
    sec.notes.append("splits: slot ranges read in parallel and merged (flash-decoding; shown for bf16 tiles of 32 "
                     "slots); 1-pass: the same kernel with one range per (row, head block)")
    sec.notes.append(f"one query per row over S cached latents ({C} + {R} values, {p.bench_dtype}), {heads} heads, "
                     "absorbed (the whole op: query absorption, kernel, value projection); limit = bytes read "
                     "(latents, rope keys, kv_b weight) / bandwidth; rel err against the float32 reference; caches "
                     "rotate over up to 8 copies so small ones are not served from L2")


def build_random(cfg: KimiVLConfig, device: torch.device, dtype: torch.dtype) -> KimiVLForConditionalGeneration:
    """The whole model with random weights made on the device (no host copy): N(0, 0.02) matrices, unit norms,
    float32 router biases."""
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(cfg)
    model = model.to(dtype=dtype).to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.data = torch.randn(param.shape, device=device, generator=gen) * 0.01
            elif param.dim() >= 2:
                param.normal_(std=cfg.text_config.initializer_range, generator=gen)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def primed_step(lm, batch: int, context: int, slots: int, gen: torch.Generator):
    """The model's captured decode step for `batch` rows over a cache of `slots` holding `context` random latents,
    run once (warm-up and capture; it writes slot `context`, which later calls rewrite) -> (step, token, pos)."""
    param = lm.lm_head.weight
    step = decoder_step(lm, batch, slots, param.device, param.dtype)
    cache = step.cache
    cache.latent[:, :, :context].normal_(generator=gen)
    cache.k_pe[:, :, :context].normal_(generator=gen)
    cache.valid[:, :context] = True
    cache.length = context
    token = torch.randint(0, 1000, (batch,), device=param.device, generator=gen)
    pos = torch.full((batch, 1), context, device=param.device)
    step(token, pos, context)
    return step, token, pos


def decode_bytes(t, batch: int, context: int, itemsize: int) -> float:
    """Bytes one decode step must read: every weight it uses once (experts touched by `batch` tokens under uniform
    routing, in expectation) and the cached latents."""
    H, E, k = t.hidden_size, t.n_routed_experts, t.num_experts_per_tok
    attn = H * t.num_attention_heads * t.qk_head_dim + H * (t.kv_lora_rank + t.qk_rope_head_dim) \
        + t.kv_lora_rank * t.num_attention_heads * (t.qk_nope_head_dim + t.v_head_dim) \
        + t.num_attention_heads * t.v_head_dim * H
    touched = E * (1 - (1 - k / E) ** batch)
    moe = E * H + (t.n_shared_experts + touched) * 3 * H * t.moe_intermediate_size
    dense = 3 * H * t.intermediate_size
    n_moe = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    params = t.num_hidden_layers * attn + n_moe * moe + (t.num_hidden_layers - n_moe) * dense + t.vocab_size * H
    cache = batch * context * t.num_hidden_layers * (t.kv_lora_rank + t.qk_rope_head_dim)
    return (params + cache) * itemsize


def a3b(sec: Section, p: Profile, device: torch.device, limits: Limits, deadline: float) -> None:
    dtype = getattr(torch, p.bench_dtype)
    cfg = KimiVLConfig.preset(p.a3b_preset)
    t = cfg.text_config
    sec.columns = ["what", "batch", "context", "ms", "tokens/s", "limit ms", "limit tokens/s", "time / limit"]
    start = time.perf_counter()
    model = build_random(cfg, device, dtype)
    lm = model.language_model
    weight_bytes = sum(x.nbytes for x in model.parameters())
    sec.notes.append(f"{p.a3b_preset}: {weight_bytes / 1e9:.1f} GB of random {p.bench_dtype} weights built on the "
                     f"device in {time.perf_counter() - start:.1f} s")
    gen = torch.Generator(device=device).manual_seed(0)

    # prefill: one sequence, logits of its last token (as generation does)
    def prefill(T: int) -> None:
        from kimivl.cache import MLACache
        ids = torch.randint(0, 1000, (1, T), device=device, generator=gen)
        cache = MLACache(t, 1, T + 1, device=device, dtype=dtype)
        positions = torch.arange(T, device=device)[None]
        lm.lm_head(lm.hidden_states(lm.model.embed_tokens(ids), positions, None, cache)[:, -1])

    with torch.no_grad():
        prefill(min(512, p.prefill))  # compiles the kernels
        seconds = seconds_per_call(lambda i: prefill(p.prefill), device, repeats=2, warmup=0, min_seconds=0)
    active = decode_bytes(t, 1, 0, 1) - t.vocab_size * t.hidden_size  # params one token uses, bar the lm_head rows
    attn_flops = t.num_hidden_layers * 2 * p.prefill ** 2 * t.num_attention_heads * (t.qk_head_dim + t.v_head_dim) / 2
    flops = 2 * p.prefill * active + attn_flops + 2 * t.vocab_size * t.hidden_size
    limit = limits.time(weight_bytes, flops)
    sec.rows.append(["prefill", 1, p.prefill, seconds * 1e3, p.prefill / seconds, limit * 1e3, p.prefill / limit,
                     seconds / limit])

    # decode steps on a cache filled with random latents (`context` tokens), graph replay vs eager
    with torch.no_grad():
        for context in p.decode_contexts:
            for B in p.decode_batches:
                if time.perf_counter() > deadline:
                    sec.notes.append(f"decode B={B} context={context}: skipped, out of time budget")
                    continue
                step, token, pos = primed_step(lm, B, context, context + p.decode_steps + 4, gen)
                cache = step.cache
                graph_s = seconds_per_call(lambda i: step(token, pos, context), device, repeats=5, warmup=1,
                                           min_seconds=0.02)
                limit = limits.time(decode_bytes(t, B, context, dtype.itemsize))
                sec.rows.append(["decode step, CUDA graph" if device.type == "cuda" else "decode step, fixed shapes",
                                 B, context, graph_s * 1e3, B / graph_s, limit * 1e3, B / limit, graph_s / limit])
                if B in p.eager_batches:
                    def eager(i):
                        cache.length = context
                        hidden = lm.hidden_states(lm.model.embed_tokens(token[:, None]), pos, None, cache)
                        return lm.lm_head(hidden[:, -1])
                    eager_s = seconds_per_call(eager, device, repeats=3, warmup=1, min_seconds=0.02)
                    sec.rows.append(["decode step, eager", B, context, eager_s * 1e3, B / eager_s, limit * 1e3,
                                     B / limit, eager_s / limit])
                del step, cache
                release_graphs(lm)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # end to end: greedy generate_tokens after a text prompt, as users call it (second call: the graph is reused)
    with torch.no_grad():
        ids = torch.randint(0, 1000, (1, p.generate_prompt), device=device, generator=gen)
        for graphed in ((True, False) if device.type == "cuda" else (True,)):
            config = GenerationConfig(max_new_tokens=p.generate_tokens)
            for _ in range(2):
                stats = GenerationStats()
                n = len(list(generate_tokens(model, ids, config=config, stats=stats, cuda_graph=graphed)))
            sec.rows.append([f"generate_tokens, {'graph' if graphed else 'eager'} ({n} new)", 1, p.generate_prompt,
                             1e3 / stats.decode_tokens_per_second, stats.decode_tokens_per_second, "", "", ""])
        release_graphs(lm)

    # vision: one large image and several smaller ones, packed through the tower vs one call per image
    tower = model.vision_tower
    grids = [tuple(g) for g in p.vision_grids]
    pixels = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, device=device, dtype=dtype, generator=gen)
    grid_t = torch.tensor(grids, device=device)
    per_image = list(zip(pixels.split([h * w for h, w in grids]), grid_t.split(1)))
    v = cfg.vision_config
    L = pixels.shape[0]
    lin = 2 * L * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) * v.num_hidden_layers
    att = sum(4 * (h * w) ** 2 * v.hidden_size for h, w in grids) * v.num_hidden_layers
    limit = limits.time(sum(x.nbytes for x in tower.parameters()), lin + att)
    with torch.no_grad():
        packed = seconds_per_call(lambda i: tower(pixels, grid_t), device, repeats=3, min_seconds=0)
        loop = seconds_per_call(lambda i: [tower(px, g) for px, g in per_image], device, repeats=3, min_seconds=0)
        diff = rel_err(torch.cat([m.flatten() for m in tower(pixels, grid_t)]),
                       torch.cat([tower(px, g)[0].flatten() for px, g in per_image]))
    for what, s in (("vision tower, packed", packed), ("vision tower, per-image loop", loop)):
        sec.rows.append([what, len(grids), L, s * 1e3, L / s, limit * 1e3, L / limit, s / limit])
    sec.check("vision packed = per-image loop", diff, 5e-2 if dtype != torch.float32 else 1e-5)
    sec.notes.append(f"vision: patch grids {grids} ({L} patches); tokens/s there are patches/s; limit = FLOPs (linear "
                     "+ per-image attention) / matmul rate")
    sec.notes.append("decode rows: the step alone (embedding to logits, no sampling) over a cache holding `context` "
                     "random latents; limit = bytes of the weights one step reads (experts touched by `batch` tokens "
                     "under uniform routing) + the cache / bandwidth; prefill limit = max(weights / bandwidth, "
                     "FLOPs / matmul rate); generate_tokens rows are decode tokens/s as its stats report them "
                     "(sampling and Python included)")
    del model


def profile(sec: Section, p: Profile, device: torch.device, limits: Limits) -> None:
    """Where a batch-1 decode step's GPU time goes (kernel durations, measured on eager steps: they are the same
    kernels a graph replays), and the captured step's time under other expert-kernel tiles."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from kimivl.kernels import triton_moe

    dtype = getattr(torch, p.bench_dtype)
    cfg = KimiVLConfig.preset(p.a3b_preset)
    t = cfg.text_config
    model = build_random(cfg, device, dtype)
    lm = model.language_model
    gen = torch.Generator(device=device).manual_seed(0)
    context = p.decode_contexts[0]

    def graphed_step(B: int) -> float:
        step, token, pos = primed_step(lm, B, context, context + 64, gen)
        seconds = seconds_per_call(lambda i: step(token, pos, context), device, repeats=5, min_seconds=0.02)
        release_graphs(lm)
        return seconds

    with torch.no_grad():
        graph_s = graphed_step(1)
        step = decoder_step(lm, 1, context + 64, device, dtype)  # its cache, for eager steps
        step.cache.valid[:, :context] = True
        token = torch.randint(0, 1000, (1,), device=device, generator=gen)
        pos = torch.full((1, 1), context, device=device)

        def eager():
            step.cache.length = context
            lm.lm_head(lm.hidden_states(lm.model.embed_tokens(token[:, None]), pos, None, step.cache)[:, -1])
        for _ in range(2):
            eager()
        sync(device)
        steps = 3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                eager()
            sync(device)
        release_graphs(lm)
    from torch.autograd import DeviceType

    kernels = []  # device-side events only (kernels, copies): the aten ops above them carry the same time again
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us and us > 0 and getattr(e, "device_type", None) == DeviceType.CUDA:
            kernels.append((e.key, e.count // steps, us / steps))
    kernels.sort(key=lambda k: -k[2])
    total = sum(k[2] for k in kernels)
    sec.columns = ["kernel", "launches / step", "us / step", "share"]
    sec.rows = [[name[:90], n, us, us / total] for name, n, us in kernels[:30]]
    sec.notes.append(f"batch-1 decode step over {context} cached tokens: kernel time {total / 1e3:.2f} ms per step "
                     f"({sum(k[1] for k in kernels)} launches), captured graph step {graph_s * 1e3:.2f} ms, "
                     f"limit {limits.time(decode_bytes(t, 1, context, dtype.itemsize)) * 1e3:.2f} ms")

    variants = {"n64 k32 w4 s3": dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
                "n32 k128 w4 s3": dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3),
                "n64 k128 w4 s3": dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
                "n32 k64 w4 s4": dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=4),
                "n16 k256 w4 s3": dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3),
                "n128 k64 w8 s3": dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)}
    from kimivl.kernels import triton_mla

    shortest = triton_mla.MIN_SPLIT_SLOTS
    try:
        for slots in (256, 128, 64):
            triton_mla.MIN_SPLIT_SLOTS = slots
            with torch.no_grad():
                b1, b32 = graphed_step(1), graphed_step(32)
            sec.notes.append(f"MLA splits of at least {slots} slots: graph step batch 1 {b1 * 1e3:.2f} ms, batch 32 "
                             f"{b32 * 1e3:.2f} ms")
    finally:
        triton_mla.MIN_SPLIT_SLOTS = shortest
    chosen = dict(triton_moe.DECODE_TILES)
    try:
        for name, tiles in variants.items():
            triton_moe.DECODE_TILES = chosen | tiles
            with torch.no_grad():
                b1, b32 = graphed_step(1), graphed_step(32)
            sec.notes.append(f"decode tiles {name}: graph step batch 1 {b1 * 1e3:.2f} ms, batch 32 {b32 * 1e3:.2f} ms")
    finally:
        triton_moe.DECODE_TILES = chosen
    del model


# ---- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (any machine; CI runs it on CPU)")
    parser.add_argument("--only", nargs="+", choices=["machine", "tests", "agreement", "moe", "mla", "a3b", "profile"],
                        help="sections to run (machine always runs; profile only when named)")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds: decode rows past it are skipped, and the tests get what is left plus 2 minutes")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    p = PROFILES["dry" if args.dry_run else "full"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # the Triton kernels then run in the interpreter (set before they are imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    deadline = begin + args.budget

    import triton
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": tf_version, "python": platform.python_version(),
            "profile": "dry" if args.dry_run else "full", "cuda": torch.version.cuda,
            "interpreter": os.environ.get("TRITON_INTERPRET", "0")}
    report = Report(args.out, meta)
    # the pytest run goes last: it is the longest (compiling every kernel variant) and the rest matters as much
    wanted = args.only or ["machine", "agreement", "mla", "moe", "a3b", "tests"]
    titles = {"machine": "Machine ceilings", "tests": "Kernel tests on the device", "agreement": "Model agreement",
              "moe": "MoE layer", "mla": "MLA decode attention", "a3b": "Full A3B: prefill, decode, vision",
              "profile": "Batch-1 decode step profile"}
    limits = Limits(1.0, 1.0)
    with tempfile.TemporaryDirectory() as work:
        for name in ["machine", *[w for w in wanted if w != "machine"]]:
            sec = Section(titles[name], [])
            report.sections[name] = sec
            start = time.perf_counter()
            print(f"[{time.perf_counter() - begin:6.1f} s] {name}", flush=True)
            try:
                if name == "machine":
                    limits = machine(sec, p, device)
                elif name == "tests":
                    if p.run_tests:
                        run_tests(sec, args.out, timeout=max(60.0, deadline + 120 - time.perf_counter()))
                    else:
                        sec.notes.append("not run in a dry run (CI runs these tests itself)")
                elif name == "agreement":
                    agreement(sec, p, device, Path(work))
                elif name == "moe":
                    moe(sec, p, device, limits)
                elif name == "mla":
                    mla(sec, p, device, limits)
                elif name == "a3b":
                    a3b(sec, p, device, limits, deadline)
                elif name == "profile":
                    profile(sec, p, device, limits)
            except Exception:  # noqa: BLE001 (recorded; the next section still runs)
                sec.error = traceback.format_exc()
                print(sec.error, file=sys.stderr, flush=True)
            sec.seconds = time.perf_counter() - start
            report.write()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(report.markdown())
    failed = [name for name, s in report.sections.items() if not s.ok]
    print(f"{len(report.sections) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f" in {time.perf_counter() - begin:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
