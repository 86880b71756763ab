"""The torch fast paths of the kernel ops against their references (values and gradients), and the one dispatch point.

Tolerances: float32 throughout; the fast paths do the same float32 arithmetic as the references in another grouping,
so outputs and gradients agree to rel 1e-5 (max |diff| / max |reference|).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kimivl import KimiVLConfig
from kimivl.kernels import moe
from kimivl.kernels.attention import prefill_attention, varlen_attention
from kimivl.kernels.linear import Linear
from kimivl.kernels.mla import absorbed_attention
from kimivl.kernels import backend
from kimivl.kernels.backend import BackendError, backend_for, flash_attn_usable
from kimivl.kernels.moe import moe_experts, moe_experts_grouped, moe_experts_reference
from kimivl.kernels.routing import route, route_reference
from tests.helpers import rel_err

RTOL = 1e-5

# (tokens, experts, hidden, intermediate, top-k): a single token, top-k equal to the expert count, sizes that are
# not multiples of anything, and enough tokens that some experts get many rows
SHAPES = [(1, 8, 16, 12, 3), (5, 4, 16, 12, 4), (37, 8, 24, 20, 3), (64, 16, 32, 8, 2),
          (9, 4, 18, 10, 2)]  # widths whose float32 rows are not 16-byte aligned: grouped_mm refuses them
shape_id = "T{}-E{}-H{}-I{}-k{}".format


def moe_inputs(T: int, E: int, H: int, I: int, k: int, seed: int = 0):
    """x, ids, weights, gate_up_proj, down_proj; expert 1 receives every token and the last expert none (E > k)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    down = torch.randn(E, H, I, generator=gen) / I ** 0.5
    pool = E - 1 if E > k else E  # the last expert gets no tokens unless every expert is chosen
    ids = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(T)])
    if pool > k:
        has_1 = (ids == 1).any(-1)
        ids[~has_1, 0] = 1
    return x, ids, torch.rand(T, k, generator=gen), gate_up, down


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(*s))
def test_moe_fast_path_matches_reference(shape):
    x, ids, w, gate_up, down = moe_inputs(*shape)
    got = moe_experts(x, ids, w, gate_up, down)
    want = moe_experts_reference(x, ids, w, gate_up, down)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert rel_err(got, want) <= RTOL


def test_no_tokens():
    x, ids, w, gate_up, down = moe_inputs(3, 4, 16, 12, 2)
    for fn in (moe_experts, moe_experts_reference):
        out = fn(x[:0], ids[:0], w[:0], gate_up, down)
        assert out.shape == (0, 16) and out.dtype == x.dtype


@pytest.mark.parametrize("grad", [False, True], ids=["float32-inference", "no-grouped-mm"])
def test_grouped_path_loops_over_used_experts_only(monkeypatch, grad):
    """Float32 inference on CPU, and training where grouped_mm is unavailable, loop over the experts that got rows."""
    x, ids, w, gate_up, down = moe_inputs(37, 8, 24, 20, 3)
    x.requires_grad_(grad)
    used = set(ids.flatten().tolist())
    assert len(used) < 8
    calls = []
    if grad:
        real_linear = F.linear
        monkeypatch.setattr(moe, "grouped_mm_usable", lambda x, w: False)
        monkeypatch.setattr(moe.F, "linear", lambda a, b: calls.append(a.shape[0]) or real_linear(a, b))
    else:
        real_linear = moe.linear
        monkeypatch.setattr(moe, "linear", lambda a, b: calls.append(a.shape[0]) or real_linear(a, b))
    got = moe_experts_grouped(x, ids, w, gate_up, down)
    monkeypatch.undo()
    assert len(calls) == 2 * len(used) and min(calls) > 0  # two GEMMs per used expert, none for the unused
    assert rel_err(got, moe_experts_reference(x, ids, w, gate_up, down)) <= RTOL


def grads(fn, x, ids, w, gate_up, down, cotangent):
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, gate_up, down)]
    out = fn(inputs[0], ids, inputs[1], inputs[2], inputs[3])
    (out.sum() if cotangent is None else (out * cotangent).sum()).backward()
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("cotangent", ["sum", "random"])  # y.sum() hands backward a stride-0 gradient
@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: shape_id(*s))
def test_moe_fast_path_gradients_match_reference(monkeypatch, path, shape, cotangent):
    x, ids, w, gate_up, down = moe_inputs(*shape)
    g = None if cotangent == "sum" else torch.randn(x.shape[0], x.shape[1])
    if path == "loop":
        monkeypatch.setattr(moe, "grouped_mm_usable", lambda x, w: False)
    out, got = grads(moe_experts_grouped, x, ids, w, gate_up, down, g)
    ref_out, want = grads(moe_experts_reference, x, ids, w, gate_up, down, g)
    assert rel_err(out, ref_out) <= RTOL
    for name, a, b in zip(["x", "weights", "gate_up_proj", "down_proj"], got, want):
        assert rel_err(a, b) <= RTOL, name
    assert got[2][-1].abs().sum() == 0 or shape[1] == shape[4]  # the unused expert gets a zero gradient


@pytest.mark.parametrize("tokens", [1, 64])
def test_grouped_mm_is_used_on_cpu_for_training_only(monkeypatch, tokens):
    """The torch path runs torch's grouped GEMM when gradients are wanted, for decode and prefill sizes alike; float32
    inference loops over the used experts instead (faster on CPU), with the same result."""
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(moe.F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, ids, weights, gate_up, down = moe_inputs(tokens, 16, 32, 8, 2)
    trained = moe_experts(x.requires_grad_(), ids, weights, gate_up, down)
    assert len(calls) == 2
    with torch.no_grad():
        inferred = moe_experts(x, ids, weights, gate_up, down)
    assert len(calls) == 2 and rel_err(inferred, trained.detach()) <= RTOL


def test_route_dispatch_is_the_reference_on_cpu():
    cfg = KimiVLConfig.preset("tiny-grouped").text_config
    x, weight, bias = torch.randn(9, cfg.hidden_size), torch.randn(cfg.n_routed_experts, cfg.hidden_size), \
        torch.randn(cfg.n_routed_experts) * 0.1
    for got, want in zip(route(x, weight, bias, cfg), route_reference(x, weight, bias, cfg)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_matches_reference(causal):
    """The CPU path (fused SDPA kernel on 4-D views) against a written-out softmax(q k^T / sqrt(D)) v per sequence
    in float64; sequences of 1, 7, 40 and 70 rows."""
    q, k, v = (torch.randn(118, 3, 72, dtype=torch.float64).float() for _ in range(3))
    cu = torch.tensor([0, 1, 8, 48, 118], dtype=torch.int32)
    got = varlen_attention(q, k, v, cu, causal)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k[s:e].double()) / 72 ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e].double())
        assert rel_err(got[s:e], want) <= RTOL


def written_out_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale) v in float64, per head: q, k [B, heads, T, Dqk], v [B, heads, S, Dv], mask bool
    [B, 1, T, S] or None."""
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "mask"])
def test_prefill_attention_with_narrower_values(padded):
    """Values narrower than queries and keys (MLA's 128 against 192) are zero-padded to select the fused kernel; the
    result is the written-out attention, causal or under a padding mask."""
    q, k = torch.randn(2, 3, 11, 24), torch.randn(2, 3, 11, 24)
    v = torch.randn(2, 3, 11, 16)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, :4] = False  # row 1 left-padded by four tokens
    mask = (causal & keep[:, None, None]) | torch.eye(11, dtype=torch.bool) if padded else None
    got = prefill_attention(q, k, v, mask, 0.3)
    assert got.shape == (2, 3, 11, 16)
    assert rel_err(got, written_out_attention(q, k, v, causal if mask is None else mask, 0.3)) <= RTOL


@pytest.mark.parametrize("T, lens", [(1, None), (1, [5, 9]), (3, None)], ids=["decode", "kv-lens", "chunk"])
def test_absorbed_attention_equals_expanded_keys_and_values(T, lens):
    """The absorbed path (queries taken into the latent space, heads folded into one matrix multiply over the shared
    latent) against keys and values expanded per head from the latent and attended in float64."""
    B, S, heads, nope, rope, dv, C = 2, 9, 4, 8, 4, 6, 12
    gen = torch.Generator().manual_seed(0)
    q_nope, q_pe = torch.randn(B, T, heads, nope, generator=gen), torch.randn(B, T, heads, rope, generator=gen)
    latent, k_pe = torch.randn(B, S, C, generator=gen), torch.randn(B, S, rope, generator=gen)
    kv_b = torch.randn(heads * (nope + dv), C, generator=gen) / C ** 0.5
    mask = torch.ones(S, S, dtype=torch.bool).tril()[S - T:].expand(B, 1, T, S).clone() if T > 1 else None
    got = absorbed_attention(q_nope, q_pe, latent, k_pe, kv_b, mask, 0.25,
                             None if lens is None else torch.tensor(lens))
    k_nope, v = (latent @ kv_b.T).unflatten(-1, (heads, nope + dv)).split([nope, dv], -1)  # [B, S, heads, *]
    q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
    k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, heads, rope)], -1).transpose(1, 2)
    if lens is not None:
        mask = (torch.arange(S) < torch.tensor(lens)[:, None])[:, None, None]
    want = written_out_attention(q, k, v.transpose(1, 2), mask, 0.25).transpose(1, 2)
    assert rel_err(got, want) <= RTOL


def test_backend_choice(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv("KIMIVL_BACKEND", raising=False)
    assert backend_for(t) == "torch"  # CPU tensors: the torch paths
    monkeypatch.setenv("KIMIVL_BACKEND", "torch")
    assert backend_for(t) == "torch"
    monkeypatch.setenv("KIMIVL_BACKEND", "cuda")
    with pytest.raises(BackendError, match="KIMIVL_BACKEND='cuda' is not a backend"):
        backend_for(t)
    monkeypatch.setenv("KIMIVL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        backend_for(t)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(t) == "triton"
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(BackendError, match="forward-only"):
        backend_for(t, p)
    with torch.no_grad():
        assert backend_for(t, p) == "triton"


def test_flash_attn_rule(monkeypatch):
    """flash-attn needs CUDA half-precision tensors and an install, not the triton backend; KIMIVL_BACKEND=torch
    turns it off. (Without a GPU only the refusals can be checked here.)"""
    monkeypatch.setattr(backend, "has_module", lambda name: True)
    monkeypatch.delenv("KIMIVL_BACKEND", raising=False)
    assert not flash_attn_usable(torch.zeros(2, dtype=torch.bfloat16))  # CPU
    cuda_bf16 = torch.zeros(2, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "meta"))
    assert flash_attn_usable(cuda_bf16)
    assert not flash_attn_usable(cuda_bf16.float())
    monkeypatch.setenv("KIMIVL_BACKEND", "torch")
    assert not flash_attn_usable(cuda_bf16)


def test_import_and_forward_without_triton_or_flash_attn():
    """`import kimivl` and a CPU forward pass work when triton and flash-attn cannot be imported."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\nsys.modules['flash_attn'] = None\n"  # None in sys.modules: ImportError
        "import torch, kimivl\n"
        "from kimivl.model import init_weights\n"
        "m = kimivl.KimiVLForConditionalGeneration(kimivl.KimiVLConfig.preset('tiny'))\n"
        "init_weights(m, seed=0)\n"
        "print(tuple(m(torch.arange(12)[None]).logits.shape))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "KIMIVL_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 12, 1280)"


@pytest.mark.parametrize("shape", [(1, 40), (2, 3, 40), (8, 40), (513, 40)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear_values_and_gradients(shape, bias):
    """The decoder's Linear (weight @ x^T on CPU for several rows) against F.linear in float64."""
    layer = Linear(40, 24, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    got = layer(x)
    want = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert got.shape == want.shape and got.is_contiguous() and rel_err(got, want) <= RTOL
    cotangent = torch.randn(got.shape)
    grads = torch.autograd.grad(got, [x, layer.weight], cotangent)
    wants = torch.autograd.grad(F.linear(x, layer.weight, layer.bias), [x, layer.weight], cotangent)
    assert all(rel_err(g, w) <= RTOL for g, w in zip(grads, wants))
