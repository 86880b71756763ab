"""Every Triton kernel against its torch reference. Without a GPU the kernels run in the Triton interpreter on CPU
tensors (float32, tiny shapes: the interpreter's cost grows with the number of programs).

Tolerances: rel 1e-5 (max |diff| / max |reference|); the kernels accumulate in float32 like the references, in a
different order.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of the kernel modules (checked at definition)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kimivl import KimiVLConfig, KimiVLForConditionalGeneration, KimiVLProcessor, MLACache  # noqa: E402
from kimivl.config import TextConfig  # noqa: E402
from kimivl.generation import GenerationConfig, generate_tokens  # noqa: E402
from kimivl.kernels import triton_mla, triton_moe, triton_norm, triton_routing  # noqa: E402
from kimivl.kernels.mla import absorbed_attention, absorbed_attention_reference  # noqa: E402
from kimivl.kernels.moe import moe_experts, moe_experts_reference  # noqa: E402
from kimivl.kernels.routing import route, route_reference  # noqa: E402
from kimivl.model import default_position_ids, init_weights  # noqa: E402
from tests.helpers import image_batch, prompt_with_images, rel_err  # noqa: E402
from tests.test_kernels import moe_inputs, shape_id  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-5


def same_routing(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Same expert set per token and the same weight for each expert (the order within a token may differ)."""
    (ids, w), (ref_ids, ref_w) = got, want
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == ref_ids.shape
    a, b = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(a.values, b.values)
    torch.testing.assert_close(w.gather(1, a.indices), ref_w.gather(1, b.indices), rtol=RTOL, atol=0)


def text_config(preset: str, **changes) -> TextConfig:
    cfg = KimiVLConfig.preset(preset).text_config
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


ROUTING_CASES = {  # name: (config, tokens); BLOCK_T is 16, so 37 tokens leave a partial block
    "sigmoid-bias": (text_config("tiny"), 37),
    "grouped": (text_config("tiny-grouped"), 37),
    "softmax-greedy": (text_config("tiny-softmax"), 37),
    "single-token": (text_config("tiny"), 1),
    "topk-equals-experts": (text_config("tiny", num_experts_per_tok=8), 5),
    "six-experts": (text_config("tiny", n_routed_experts=6, num_experts_per_tok=2), 20),  # E not a power of two
    "grouped-max": (text_config("tiny-grouped", topk_method="group_limited_greedy"), 20),  # group score = max
}


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_routing_kernel_matches_reference(case):
    cfg, T = ROUTING_CASES[case]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, cfg.hidden_size, generator=gen)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen) * 0.3
    bias = torch.randn(cfg.n_routed_experts, generator=gen) * 0.1 if cfg.topk_method == "noaux_tc" else None
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    bias = bias.to(DEVICE) if bias is not None else None
    same_routing(triton_routing.route_triton(x, weight, bias, cfg), route_reference(x, weight, bias, cfg))


MOE_SHAPES = [  # (tokens, experts, hidden, intermediate, top-k); the last expert gets no tokens unless k == E
    (1, 8, 16, 12, 3),  # a single token: 3 row blocks of one row each
    (5, 4, 16, 12, 4),  # top-k equal to the expert count
    (40, 8, 24, 20, 2),  # expert 1 gets all 40 rows: 3 blocks of 16, the last partial; hidden not a multiple of 32
    (40, 2, 16, 70, 2),  # 80 rows > 16 per expert: 64-row blocks; intermediate spans two column blocks
]


@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: shape_id(*s))
def test_expert_kernels_match_reference(shape):
    x, ids, w, gate_up, down = (t.to(DEVICE) for t in moe_inputs(*shape))
    got = triton_moe.moe_experts_triton(x, ids, w, gate_up, down)
    want = moe_experts_reference(x, ids, w, gate_up, down)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert rel_err(got, want) <= RTOL


@pytest.mark.parametrize("scheme", [(8, None), (4, 32)], ids=["int8", "int4-g32"])
@pytest.mark.parametrize("shape", MOE_SHAPES[:1] + MOE_SHAPES[2:], ids=lambda s: shape_id(*s))
def test_quantized_expert_kernels_match_reference(shape, scheme):
    """w8a16 / w4a16: the expert GEMMs dequantizing each weight tile in the inner loop, against the reference over
    the dequantized weights. Widths are padded to multiples of 32 so int4 groups fit."""
    from kimivl.kernels.quant import QuantWeight, dequantize, quantize
    T, E, H, I, k = shape
    H, I = -(-H // 32) * 32, -(-I // 32) * 32
    x, ids, w, gate_up, down = (t.to(DEVICE) for t in moe_inputs(T, E, H, I, k))
    bits, group = scheme
    q = [QuantWeight(*quantize(p, bits, group), bits, group, tuple(p.shape)) for p in (gate_up, down)]
    got = triton_moe.moe_experts_triton(x, ids, w, *q)
    want = moe_experts_reference(x, ids, w, *(dequantize(qw.data, qw.scale, bits).to(x.dtype) for qw in q))
    assert got.dtype == x.dtype and got.shape == want.shape
    assert rel_err(got, want) <= RTOL


@pytest.mark.parametrize("D", [64, 37])
def test_rms_norm_kernel_matches_reference(D):
    """Rows read in place from a strided view (the cache's latent split), D not a power of two too."""
    from kimivl.decoder import rms_norm_reference
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 5, D + 9, generator=gen).to(DEVICE) * 3
    x = wide[..., :D]  # row stride D + 9
    weight = (1 + 0.1 * torch.randn(D, generator=gen)).to(DEVICE)
    got = triton_norm.rms_norm_triton(x, weight, 1e-6)
    want = rms_norm_reference(x, weight, 1e-6)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= RTOL


@pytest.mark.parametrize("shape", [(2, 3, 4, 8), (2, 3, 1, 8), (7, 20, 12)], ids=["q_pe", "k_pe", "vision"])
def test_rope_kernel_matches_reference(shape):
    """The decoder's query rope keys (a strided split of q), its one shared key head, and MoonViT's [L, heads, D]
    with 20 heads (two head blocks, the second partial)."""
    from kimivl.rope import apply_rope_reference, rope_1d_angles
    gen = torch.Generator().manual_seed(3)
    *lead, H, D = shape
    full = torch.randn(*lead, H, D + 6, generator=gen).to(DEVICE)
    x = full[..., 6:]  # like q_pe after the nope part
    angles = rope_1d_angles(torch.randint(0, 500, tuple(lead), generator=gen), D, 10000.0).to(DEVICE)
    got = triton_norm.apply_rope_triton(x, angles.cos(), angles.sin())
    want = apply_rope_reference(x, angles.cos(), angles.sin())
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= RTOL


def test_row_blocks_map_every_row_once():
    counts = torch.tensor([0, 17, 3, 0, 16, 1])
    block_expert, block_first = triton_moe.row_blocks(counts, 16, 17 // 16 + 6 + 1)
    assert block_expert.tolist() == [1, 1, 2, 4, 5, 6, 6, 6]  # 6 (= E): past the last block in use
    assert block_first.tolist() == [0, 0, 2, 3, 3, 4]


MLA_CASES = {  # name: (B, T, heads, S, C, rope, mask); BLOCK_S is 64 for float32 C=32 and BLOCK_H 16
    "T1-padding": (2, 1, 4, 70, 32, 8, "causal-padding"),  # S = 64 + 6: a full and a partial slot block
    "T3-causal-padding": (2, 3, 4, 70, 32, 8, "causal-padding"),
    "T3-no-mask": (1, 3, 4, 70, 32, 8, None),  # every cached slot visible
    "only-self": (2, 3, 4, 70, 32, 8, "only-self"),  # a query whose first slot block is wholly masked
    "C24-R6-H20": (1, 2, 20, 37, 24, 6, "causal-padding"),  # 2 head blocks (the second 4/16 full), C, R not 2^k
}


def mla_inputs(B: int, T: int, heads: int, S: int, C: int, R: int, mask: str | None, seed: int = 0):
    """q_nope, q_pe, latent, k_pe, kv_b_weight, mask for T queries at the last T of S slots. latent and k_pe are
    views into longer buffers, as the cache hands them out. Masks: causal with row b's first 10*b slots padding;
    only-self also hides everything but its own slot from row 0's second query."""
    gen = torch.Generator().manual_seed(seed)
    nope, v = 16, 12
    q_nope = torch.randn(B, T, heads, nope, generator=gen)
    q_pe = torch.randn(B, T, heads, R, generator=gen)
    latent = torch.randn(B, S + 5, C, generator=gen)[:, :S]
    k_pe = torch.randn(B, S + 5, R, generator=gen)[:, :S]
    kv_b = torch.randn(heads * (nope + v), C, generator=gen) / C ** 0.5
    m = None
    if mask is not None:
        pos = torch.arange(S)
        query = pos[S - T:, None]
        m = (pos <= query).repeat(B, 1, 1)  # [B, T, S]
        for b in range(B):
            m[b, :, :10 * b] = False
        if mask == "only-self":
            m[0, min(1, T - 1)] = pos == S - T + min(1, T - 1)
        m = m[:, None]
    return q_nope, q_pe, latent, k_pe, kv_b, m


@pytest.fixture(params=["one-pass", "split"])
def mla_splits(request, monkeypatch):
    """The MLA kernel in one pass over the slots, or split into 24-slot ranges (4 of them: over 70 slots the last
    sees nothing, and the 21-slot rows of the kv_lens test leave three empty) merged by the combine kernel."""
    if request.param == "split":
        monkeypatch.setattr(triton_mla, "num_splits", lambda programs, S, block_s: (4, 24))
    else:
        monkeypatch.setattr(triton_mla, "num_splits", lambda programs, S, block_s: (1, S))
    return request.param


@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_kernel_matches_reference(case, mla_splits):
    q_nope, q_pe, latent, k_pe, kv_b, mask = (t.to(DEVICE) if t is not None else None
                                              for t in mla_inputs(*MLA_CASES[case]))
    scale = 0.3
    got = triton_mla.absorbed_attention_triton(q_nope, q_pe, latent, k_pe, kv_b, mask, scale)
    want = absorbed_attention_reference(q_nope, q_pe, latent, k_pe, kv_b, mask, scale)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) <= RTOL


def test_mla_kernel_reads_only_kv_lens_slots(mla_splits):
    """kv_lens (the captured decode step's device-side length): row b attends over its first kv_lens[b] slots only;
    slots past them are never read (NaN there would poison the result)."""
    q_nope, q_pe, latent, k_pe, kv_b, mask = (t.to(DEVICE) for t in mla_inputs(2, 1, 4, 70, 32, 8, "causal-padding"))
    lens = torch.tensor([45, 21], device=DEVICE)
    want = torch.cat([absorbed_attention_reference(q_nope[b:b + 1], q_pe[b:b + 1], latent[b:b + 1, :n],
                                                   k_pe[b:b + 1, :n], kv_b, mask[b:b + 1, ..., :n], 0.3)
                      for b, n in enumerate(lens.tolist())])
    assert rel_err(absorbed_attention_reference(q_nope, q_pe, latent, k_pe, kv_b, mask, 0.3, lens), want) <= RTOL
    poisoned_latent, poisoned_k_pe = latent.clone(), k_pe.clone()
    for b, n in enumerate(lens.tolist()):
        poisoned_latent[b, n:] = float("nan")
        poisoned_k_pe[b, n:] = float("nan")
    got = triton_mla.absorbed_attention_triton(q_nope, q_pe, poisoned_latent, poisoned_k_pe, kv_b, mask, 0.3, lens)
    assert rel_err(got, want) <= RTOL


def test_mla_split_choice():
    """Batch-1 decoding over a long cache is split to fill the GPU; many rows or a short cache are not; ranges are
    whole tiles and cover every slot."""
    assert triton_mla.MIN_SPLIT_SLOTS == 128 and triton_mla.SPLIT_PROGRAMS == 264
    assert triton_mla.num_splits(1, 16384, 32) == (128, 128)
    assert triton_mla.num_splits(1, 1000, 32) == (8, 128)
    assert triton_mla.num_splits(1, 131072, 32) == (256, 512)  # 264 wanted, 512-slot ranges need 256
    assert triton_mla.num_splits(128, 16384, 32)[0] == 2
    assert triton_mla.num_splits(512, 100_000, 32)[0] == 1
    assert triton_mla.num_splits(1, 100, 32) == (1, 128)
    for programs, S in ((1, 70_000), (3, 4097), (16, 131072)):
        n, length = triton_mla.num_splits(programs, S, 32)
        assert length % 32 == 0 and (n - 1) * length < S <= n * length


@pytest.fixture
def spies(monkeypatch):
    """Counts of calls into the Triton entry points through the public ops."""
    calls = {"route": 0, "moe": 0, "mla": 0}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapped(*args):
            calls[key] += 1
            return real(*args)
        monkeypatch.setattr(module, name, wrapped)

    spy(triton_routing, "route_triton", "route")
    spy(triton_moe, "moe_experts_triton", "moe")
    spy(triton_mla, "absorbed_attention_triton", "mla")
    return calls


def test_public_ops_dispatch_to_triton_when_forced(monkeypatch, spies):
    cfg = text_config("tiny")
    x = torch.randn(6, cfg.hidden_size, device=DEVICE)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, device=DEVICE)
    monkeypatch.setenv("KIMIVL_BACKEND", "triton")
    ids, w = route(x, weight, None, cfg)
    moe_experts(x, ids, w, *(t.to(DEVICE) for t in moe_inputs(6, cfg.n_routed_experts, cfg.hidden_size, 32, 3)[3:]))
    q_nope, q_pe, latent, k_pe, kv_b, mask = (t.to(DEVICE) for t in mla_inputs(*MLA_CASES["T1-padding"]))
    absorbed_attention(q_nope, q_pe, latent, k_pe, kv_b, mask, 0.3)
    assert spies == {"route": 1, "moe": 1, "mla": 1}


def test_tiny_model_same_logits_with_triton_backend(monkeypatch, spies, report):
    config = KimiVLConfig.preset("tiny")
    model = KimiVLForConditionalGeneration(config)
    init_weights(model, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(std=0.05)  # let the bias steer the choice
    model.to(DEVICE).eval()
    grids = [(4, 6), (2, 2)]
    pixel_values, grid_hws = image_batch(grids)
    ids = prompt_with_images(config, grids, text_len=5)
    inputs = dict(input_ids=ids.to(DEVICE), pixel_values=pixel_values.to(DEVICE), image_grid_hws=grid_hws.to(DEVICE))
    logits = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            monkeypatch.setenv("KIMIVL_BACKEND", backend)
            logits[backend] = model(**inputs).logits
    moe_layers = sum(config.text_config.is_moe_layer(i) for i in range(config.text_config.num_hidden_layers))
    assert spies == {"route": moe_layers, "moe": moe_layers, "mla": 0}  # the triton run went through the kernels
    err = rel_err(logits["triton"], logits["torch"])
    report("max |logits triton - torch| / max |torch|", f"{err:.1e}")
    assert err <= RTOL and logits["torch"].std() > 0.1


@pytest.fixture(scope="module")
def tiny_loaded(tiny_checkpoint):
    path = tiny_checkpoint("tiny")
    model = KimiVLForConditionalGeneration.from_pretrained(path).to(DEVICE).eval()
    return model, KimiVLProcessor.from_pretrained(path)


TWO_PROMPTS = [[{"role": "user", "content": "hi"}],  # left-padded: the decode masks hide its padding
               [{"role": "user", "content": "Say something long about nothing in particular, please."}]]


def test_tiny_generation_same_tokens_with_triton_backend(monkeypatch, spies, tiny_loaded):
    model, processor = tiny_loaded
    inputs = {k: v.to(DEVICE) for k, v in processor(TWO_PROMPTS).items()}
    monkeypatch.setenv("KIMIVL_CUDA_GRAPHS", "0")  # count the kernel calls of every step (a graph replays unseen)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KIMIVL_BACKEND", backend)
        out[backend] = model.generate(**inputs, max_new_tokens=6, stop_ids=[])
    layers = model.config.text_config.num_hidden_layers
    assert spies["mla"] == 5 * layers  # every decode step after the first token went through the kernel
    assert out["triton"].tolist() == out["torch"].tolist()


def test_fixed_shape_decode_step_same_tokens_with_triton_backend(monkeypatch, tiny_loaded):
    """The decode step CUDA graphs capture (on CPU run without capture) gives eager decoding's tokens and
    log-probabilities through the Triton kernels, left padding included; on a GPU this replays a real graph."""
    model, processor = tiny_loaded
    inputs = {k: v.to(DEVICE) for k, v in processor(TWO_PROMPTS).items()}
    monkeypatch.setenv("KIMIVL_BACKEND", "triton")
    runs = {}
    for graphed in (False, True):
        logprobs = []
        tokens = torch.stack(list(generate_tokens(model, **inputs, config=GenerationConfig(max_new_tokens=6),
                                                  logprobs=logprobs, cuda_graph=graphed)), 1)
        runs[graphed] = tokens, torch.stack(logprobs, 1)
    assert runs[True][0].tolist() == runs[False][0].tolist()
    assert (runs[True][1] - runs[False][1]).abs().max().item() <= 1e-5


def test_tiny_cached_decode_same_logits_with_triton_backend(monkeypatch, spies, tiny_loaded, report):
    """Two left-padded prompts prefilled, then 3 one-token steps and a 3-token chunk after the cached tokens (T > 1,
    causal + padding mask): the same logits through the kernel as through the torch reference."""
    model, processor = tiny_loaded
    lm = model.language_model
    inputs = processor(TWO_PROMPTS)
    forced = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ids, attention = inputs.input_ids.to(DEVICE), inputs.attention_mask.to(DEVICE)
    positions = default_position_ids(ids, attention)
    logits = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            monkeypatch.setenv("KIMIVL_BACKEND", backend)
            cache = MLACache(lm.config, 2, ids.shape[1] + forced.shape[1], device=DEVICE)
            steps = [lm(lm.model.embed_tokens(ids), positions, attention, cache)[:, -1:]]
            done = 0
            for chunk in forced.split([1, 1, 1, 3], dim=1):
                T = chunk.shape[1]
                chunk_positions = positions[:, -1:] + 1 + done + torch.arange(T, device=DEVICE)
                steps.append(lm(lm.model.embed_tokens(chunk), chunk_positions, None, cache))
                done += T
            logits[backend] = torch.cat(steps, 1)  # [2, 1 + 6, vocab]
    assert spies["mla"] == 4 * lm.config.num_hidden_layers
    err = (logits["triton"] - logits["torch"]).abs().max().item()
    report("cached decode logits triton vs torch, max abs diff", f"{err:.1e}")
    assert err <= 1e-4 and logits["torch"].std() > 0.1


COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kimivl.kernels import triton_mla, triton_moe, triton_norm, triton_routing

i64, i32 = "*i64", "i32"
meta = {"block_expert_ptr": i64, "block_first_ptr": i64, "starts_ptr": i64, "ends_ptr": "*i32"}
gemm = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "PRECISION": "ieee"}
QUANT = [(0, "*bf16", 1), (8, "*i8", 1), (4, "*u8", 128)]  # (bits, weight type, group)
kernels = [
    (triton_routing._route_kernel,
     {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": i64, "wout_ptr": "*fp32", "T": i32, "stride_l": i32,
      "scale": "fp32"},
     {"E": 64, "K": 6, "HAS_BIAS": True, "SOFTMAX": False, "N_GROUP": 4, "TOPK_GROUP": 2, "GROUP_TOP2": True,
      "NORM": True, "BLOCK_T": 16, "BLOCK_E": 64, "BLOCK_G": 4, "BLOCK_K": 8}),
    *[(triton_moe._gate_up_kernel,  # float experts, then int8 and int4 dequantized in the inner loop
       {"x_ptr": "*bf16", "order_ptr": i64, "w_ptr": w, "s_ptr": "*bf16", "h_ptr": "*bf16", **meta, "E": i32,
        "H": i32, "I": i32, "stride_x": i32, "stride_we": i32, "stride_wn": i32, "stride_se": i32, "stride_sn": i32,
        "stride_h": i32},
       {"TOP_K": 6, **gemm, "BITS": bits, "GROUP": group}) for bits, w, group in QUANT],
    *[(triton_moe._down_kernel,
       {"h_ptr": "*bf16", "w_ptr": w, "s_ptr": "*bf16", "order_ptr": i64, "slot_w_ptr": "*fp32", "y_ptr": "*fp32",
        **meta, "E": i32, "H": i32, "I": i32, "stride_h": i32, "stride_we": i32, "stride_wn": i32, "stride_se": i32,
        "stride_sn": i32, "stride_y": i32},
       {**gemm, "BITS": bits, "GROUP": group}) for bits, w, group in QUANT],
    (triton_moe._combine_kernel,
     {"y_ptr": "*fp32", "row_of_slot_ptr": i64, "out_ptr": "*bf16", "T": i32, "H": i32, "stride_y": i32,
      "stride_out": i32},
     {"TOP_K": 6, "BLOCK_T": 16, "BLOCK_H": 64}),
    *[(triton_mla._mla_decode_kernel,  # a3b: 16 heads, C = 512, rope 64; one pass, and split with a combine
       {"q_ptr": "*bf16", "q_pe_ptr": "*bf16", "latent_ptr": "*bf16", "k_pe_ptr": "*bf16", "mask_ptr": "*i1",
        "lens_ptr": "*i32", "out_ptr": "*fp32" if split else "*bf16", "lse_ptr": "*fp32" if split else "*bf16",
        **{name: i32 for name in ("T", "S", "H", "C", "R", "split_len", "stride_qb", "stride_qt", "stride_qh",
                                  "stride_pb", "stride_pt", "stride_ph", "stride_lb", "stride_ls", "stride_kb",
                                  "stride_ks", "stride_mb", "stride_mt", "stride_ms", "stride_ob", "stride_ot",
                                  "stride_oh", "stride_os")},
        "scale": "fp32"},
       {"HAS_MASK": True, "HAS_LENS": True, "SPLIT": split, "BLOCK_H": 16, "BLOCK_S": 32, "BLOCK_C": 512,
        "BLOCK_R": 64, "PRECISION": "ieee"}) for split in (False, True)],
    (triton_norm._rms_norm_kernel,
     {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "D": i32, "stride_x": i32, "stride_out": i32,
      "eps": "fp32"},
     {"BLOCK_D": 2048}),
    (triton_norm._rope_kernel,
     {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "H": i32, "P": i32,
      "stride_xn": i32, "stride_xh": i32, "stride_cn": i32, "stride_sn": i32},
     {"BLOCK_H": 16, "BLOCK_P": 32}),
    (triton_mla._mla_combine_kernel,
     {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16",
      **{name: i32 for name in ("T", "H", "C", "SPLITS", "stride_pb", "stride_pt", "stride_ph", "stride_ps",
                                "stride_ob", "stride_ot", "stride_oh")}},
     {"BLOCK_C": 512}),
]
for fn, signature, constants in kernels:
    signature = {**signature, **{name: "constexpr" for name in constants}}
    assert list(signature) == fn.arg_names, (fn.arg_names, list(signature))
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 80, 32))
    print(fn.__name__, len(compiled.asm["cubin"]))
"""


def test_kernels_compile_for_a_real_gpu():
    """Every kernel compiles to a cubin for an A100 (sm_80, bfloat16 operands) without a GPU: nothing in them is
    interpreter-only. Runs in a fresh process, since the interpreter replaces the kernels in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == ["_route_kernel", *["_gate_up_kernel"] * 3, *["_down_kernel"] * 3, "_combine_kernel",
                     "_mla_decode_kernel",
                     "_mla_decode_kernel", "_rms_norm_kernel", "_rope_kernel", "_mla_combine_kernel"]
