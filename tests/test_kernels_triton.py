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

from kimivl import KimiVLConfig, KimiVLForConditionalGeneration  # noqa: E402
from kimivl.config import TextConfig  # noqa: E402
from kimivl.kernels import triton_moe, triton_routing  # noqa: E402
from kimivl.kernels.moe import moe_experts, moe_experts_reference  # noqa: E402
from kimivl.kernels.routing import route, route_reference  # noqa: E402
from kimivl.model import init_weights  # noqa: E402
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


def test_row_blocks_map_every_row_once():
    counts = torch.tensor([0, 17, 3, 0, 16, 1])
    block_expert, block_first = triton_moe.row_blocks(counts, 16, 17 // 16 + 6 + 1)
    assert block_expert.tolist() == [1, 1, 2, 4, 5, 6, 6, 6]  # 6 (= E): past the last block in use
    assert block_first.tolist() == [0, 0, 2, 3, 3, 4]


@pytest.fixture
def spies(monkeypatch):
    """Counts of calls into the Triton entry points through the public ops."""
    calls = {"route": 0, "moe": 0}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapped(*args):
            calls[key] += 1
            return real(*args)
        monkeypatch.setattr(module, name, wrapped)

    spy(triton_routing, "route_triton", "route")
    spy(triton_moe, "moe_experts_triton", "moe")
    return calls


def test_public_ops_dispatch_to_triton_when_forced(monkeypatch, spies):
    cfg = text_config("tiny")
    x = torch.randn(6, cfg.hidden_size, device=DEVICE)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, device=DEVICE)
    monkeypatch.setenv("KIMIVL_BACKEND", "triton")
    ids, w = route(x, weight, None, cfg)
    moe_experts(x, ids, w, *(t.to(DEVICE) for t in moe_inputs(6, cfg.n_routed_experts, cfg.hidden_size, 32, 3)[3:]))
    assert spies == {"route": 1, "moe": 1}


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
    assert spies == {"route": moe_layers, "moe": moe_layers}  # the triton run went through the kernels
    err = rel_err(logits["triton"], logits["torch"])
    report("max |logits triton - torch| / max |torch|", f"{err:.1e}")
    assert err <= RTOL and logits["torch"].std() > 0.1


COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kimivl.kernels import triton_moe, triton_routing

i64, i32 = "*i64", "i32"
meta = {"block_expert_ptr": i64, "block_first_ptr": i64, "starts_ptr": i64, "ends_ptr": "*i32"}
gemm = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "PRECISION": "ieee"}
kernels = [
    (triton_routing._route_kernel,
     {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*fp32", "ids_ptr": i64, "wout_ptr": "*fp32", "T": i32, "H": i32,
      "stride_x": i32, "stride_w": i32, "scale": "fp32"},
     {"E": 64, "K": 6, "HAS_BIAS": True, "SOFTMAX": False, "N_GROUP": 4, "TOPK_GROUP": 2, "GROUP_TOP2": True,
      "NORM": True, "BLOCK_T": 16, "BLOCK_E": 64, "BLOCK_G": 4, "BLOCK_K": 8, "BLOCK_H": 64, "PRECISION": "ieee"}),
    (triton_moe._gate_up_kernel,
     {"x_ptr": "*bf16", "order_ptr": i64, "w_ptr": "*bf16", "h_ptr": "*bf16", **meta, "E": i32, "H": i32, "I": i32,
      "stride_x": i32, "stride_we": i32, "stride_wn": i32, "stride_h": i32},
     {"TOP_K": 6, **gemm}),
    (triton_moe._down_kernel,
     {"h_ptr": "*bf16", "w_ptr": "*bf16", "order_ptr": i64, "slot_w_ptr": "*fp32", "y_ptr": "*fp32", **meta,
      "E": i32, "H": i32, "I": i32, "stride_h": i32, "stride_we": i32, "stride_wn": i32, "stride_y": i32},
     gemm),
    (triton_moe._combine_kernel,
     {"y_ptr": "*fp32", "row_of_slot_ptr": i64, "out_ptr": "*bf16", "T": i32, "H": i32, "stride_y": i32,
      "stride_out": i32},
     {"TOP_K": 6, "BLOCK_T": 16, "BLOCK_H": 64}),
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
    assert names == ["_route_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel"]
