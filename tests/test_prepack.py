"""Prepacked weights for CPU inference (kimivl.prepack), float32 and bfloat16: products against float64 / float32
references, the model's logits and greedy tokens against the plain layout, the serving engine, an exact round trip
(also after an interrupted prepack), and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kimivl import InputError, KimiVLForConditionalGeneration, KimiVLProcessor, generate
from kimivl.engine import Engine
from kimivl.kernels import quant as K
from kimivl.kernels.linear import Linear, linear, prepack_weight
from kimivl.kernels.moe import PrepackedStack, moe_experts, moe_experts_reference
from kimivl.model import default_position_ids
from kimivl.prepack import PrepackedExperts, can_prepack, prepack_for_inference
from kimivl.quant import Scheme, quantize_model
from kimivl.train import SFTConfig
from kimivl.train.run import prepare

needs_onednn_bf16 = pytest.mark.skipif(not K.cpu_bf16_fast(), reason="oneDNN's bfloat16 kernels need an AVX-512 CPU")


def within_bf16(y: torch.Tensor, ref: torch.Tensor, k: int) -> bool:
    """y (bfloat16 products over k terms of bfloat16 inputs, accumulated in float32 and rounded once) against the
    float32 reference: within half a bfloat16 step of the result (at most 2^-8 of it) plus float32 summation error."""
    return bool(((y.float() - ref).abs() <= 2 ** -8 * ref.abs() + k * 2 ** -23 * ref.abs().max() + 1e-30).all())


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_prepacked_bf16_linear_matches_float32_reference(rows):
    w = (torch.randn(300, 96) * 0.05).bfloat16()
    bias = torch.randn(300).bfloat16()
    x = torch.randn(2, rows, 96).bfloat16()
    packed = prepack_weight(w)
    assert packed.is_mkldnn and packed.shape == w.shape and torch.equal(packed.to_dense(), w)
    ref = x.float() @ w.float().T
    assert within_bf16(linear(x, packed), ref, 96)
    y = linear(x, packed, bias)
    assert y.shape == (2, rows, 300) and within_bf16(y, ref + bias.float(), 96 + 1)  # the bias added before rounding
    # the plain layout's product in the same dtype (oneDNN too, through F.linear): the same numbers
    assert (linear(x, packed) - F.linear(x, w)).abs().max() <= 2 ** -8 * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_prepacked_f32_linear_matches_float64_reference(rows):
    w, bias, x = torch.randn(300, 96) * 0.05, torch.randn(300), torch.randn(2, rows, 96)
    packed = prepack_weight(w)
    assert packed.is_mkldnn and torch.equal(packed.to_dense(), w)
    ref = (x.double() @ w.double().T + bias.double()).float()
    err = (linear(x, packed, bias) - ref).abs().max() / ref.abs().max()
    assert err <= 96 * 2 ** -24  # float32 summation over 96 terms, worst case


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bf16)])
def test_prepacked_product_of_few_rows(dtype):
    """1-7 rows, 2-D and 3-D: fewer than `prepacked_min_rows` (6 on AVX-512) are padded with zero rows whose outputs
    are dropped; every row is still its own product, against the float64 reference."""
    w, x = (torch.randn(300, 96) * 0.05).to(dtype), torch.randn(7, 96).to(dtype)
    packed = prepack_weight(w)
    ref = (x.double() @ w.double().T).float()
    for n in range(1, 8):
        for rows in (x[:n], x[:n].view(n, 1, 96)):
            y = linear(rows, packed)
            assert y.shape == (*rows.shape[:-1], 300) and y.dtype == dtype
            if dtype == torch.float32:
                assert (y.reshape(n, 300) - ref[:n]).abs().max() <= 96 * 2 ** -24 * ref[:n].abs().max()
            else:
                assert within_bf16(y.reshape(n, 300), ref[:n], 96)


E, H, I, T, k = 6, 64, 40, 9, 2  # the expert cases: experts, hidden, intermediate, tokens, experts per token


def experts_case(dtype: torch.dtype):
    """x, ids, weights, gate_up, down in `dtype`, and the routed experts' output with the weights prepacked."""
    gate_up, down = (torch.randn(E, 2 * I, H) * 0.05).to(dtype), (torch.randn(E, H, I) * 0.05).to(dtype)
    x = torch.randn(T, H).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[:, 0] = torch.where(ids[:, 1] == 0, 1, 0)  # expert 0 gets most tokens, some experts none
    weights = torch.rand(T, k)
    stack = lambda w: PrepackedStack(prepack_weight(w[e]) for e in range(E))  # noqa: E731
    assert stack(gate_up).shape == gate_up.shape
    with torch.no_grad():
        got = moe_experts(x, ids, weights, stack(gate_up), stack(down))
    return x, ids, weights, gate_up, down, got


@needs_onednn_bf16
def test_prepacked_bf16_experts_match_reference():
    x, ids, weights, gate_up, down, got = experts_case(torch.bfloat16)
    with torch.no_grad():
        ref = moe_experts_reference(x, ids, weights, gate_up, down)
        ref32 = moe_experts_reference(x.float(), ids, weights, gate_up.float(), down.float())
    assert got.dtype == torch.bfloat16
    # the same bfloat16 roundings as the reference's (between the GEMMs, at the end): equal up to one step
    assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert (got.float() - ref32).abs().max() <= 2 ** -6 * ref32.abs().max()


def test_prepacked_f32_experts_match_reference():
    x, ids, weights, gate_up, down, got = experts_case(torch.float32)
    ref = torch.zeros(T, H, dtype=torch.float64)  # token by token, in float64
    for t in range(T):
        for j in range(k):
            gate, up = (gate_up[ids[t, j]].double() @ x[t].double()).chunk(2)
            ref[t] += weights[t, j].double() * (down[ids[t, j]].double() @ (F.silu(gate) * up))
    # float32 worst case of the two sums (H and I terms) after the float64 reference's: (64 + 40) * 2^-24 = 6.2e-6
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= (H + I) * 2 ** -24


@pytest.fixture(params=["float32", pytest.param("bfloat16", marks=needs_onednn_bf16)])
def model_and_processor(request, tiny_checkpoint):
    path = tiny_checkpoint("tiny")
    return (KimiVLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, request.param)).eval(),
            KimiVLProcessor.from_pretrained(path))


def test_prepacked_model_decodes_like_the_plain_one(model_and_processor, report):
    model, processor = model_and_processor
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    conv = [{"role": "user", "content": [{"type": "text", "text": "Tell me something"}]}]
    inputs = processor(conv)
    with torch.no_grad():
        logits = model(**inputs).logits
    text = generate(model, processor, conv, max_new_tokens=12, temperature=0.0)

    model.language_model.model.norm.weight.requires_grad_(False)  # frozen before: frozen after the round trip
    assert model.prepack() and model.prepacked and not can_prepack(model)
    assert not any(p.requires_grad for p in model.parameters())
    lm = model.language_model
    packed = [n for n, p in lm.named_parameters() if p.is_mkldnn] + [n for n, b in lm.named_buffers() if b.is_mkldnn]
    linears = [n for n, m in lm.named_modules() if isinstance(m, Linear) and not n.endswith("kv_b_proj")]
    n_experts = sum(isinstance(m, PrepackedExperts) for m in lm.modules())
    assert n_experts == sum(lm.config.is_moe_layer(i) for i in range(lm.config.num_hidden_layers)) > 0
    assert len(packed) == len(linears) + n_experts * 2 * lm.config.n_routed_experts
    assert not lm.model.layers[0].self_attn.kv_b_proj.weight.is_mkldnn  # the absorbed decode reads it plainly
    with torch.no_grad():
        logits_packed = model(**inputs).logits
    diff = ((logits_packed - logits).abs().max() / logits.abs().max()).item()
    report(f"prefill logits, prepacked vs plain {model.dtype}, max relative diff", f"{diff:.2e}")
    # float32: the same products summed in another order; bfloat16: oneDNN multiplies both layouts (0 on the AVX-512
    # EPYC measured; another CPU may pick another kernel for one of them: one bfloat16 rounding of the logits)
    assert diff <= (2 ** -8 if model.dtype == torch.bfloat16 else 1e-5)
    assert generate(model, processor, conv, max_new_tokens=12, temperature=0.0) == text

    model.unprepack()
    assert not model.prepacked
    back = model.state_dict()
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k]) for k in plain)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["language_model.model.norm.weight"]  # the experts (new parameters) and the rest trainable again


def test_prepacked_model_refuses_training_and_saving(model_and_processor, tmp_path):
    model, _ = model_and_processor
    model.prepack()
    with pytest.raises(InputError, match="unprepack"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="unprepack"):
        prepare(model, SFTConfig(steps=1, out=str(tmp_path / "run")))


def test_prepacked_model_still_gives_input_gradients(model_and_processor):
    """Outside no_grad (a forward anyone may run), the products stay differentiable in their input: the oneDNN op has
    no backward, so such calls unpack the weight; the weights themselves take no gradient."""
    model, processor = model_and_processor
    inputs = processor([{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = model.language_model.model.embed_tokens(ids).detach().requires_grad_()

    def grad_of_embeds():
        embeds.grad = None
        model.language_model(embeds, default_position_ids(ids, mask), mask)[0, -1].logsumexp(-1).backward()
        return embeds.grad.clone()

    plain = grad_of_embeds()
    assert model.prepack()
    packed = grad_of_embeds()
    # the fallback multiplies by the unpacked weight with F.linear; the plain float32 model's `linear` sums the same
    # products in another order ((W @ x^T)^T): within float32 rounding of the largest gradient
    assert ((packed - plain).abs().max() / plain.abs().max()).item() <= (0 if model.dtype == torch.bfloat16 else 1e-5)
    lm_head = model.language_model.lm_head
    lm_head.weight.requires_grad_(True)  # a prepacked weight asked for a gradient: refused, not silently skipped
    with pytest.raises(InputError, match="unprepack"):
        lm_head(embeds)


def test_prepack_leaves_other_models_alone(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("tiny")
    quantized = KimiVLForConditionalGeneration.from_pretrained(path, quantize="int8")
    assert not quantized.prepack() and not quantized.prepacked
    bf16 = KimiVLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    monkeypatch.setattr("kimivl.kernels.linear.cpu_bf16_fast", lambda: False)  # an AVX2 CPU: bfloat16 stays as it is
    assert not bf16.prepack() and not bf16.prepacked
    assert all(torch.equal(v, before[k]) for k, v in bf16.state_dict().items())
    f32 = KimiVLForConditionalGeneration.from_pretrained(path)
    monkeypatch.setenv("KIMIVL_PREPACK", "0")
    assert not prepack_for_inference(f32) and not f32.prepacked
    monkeypatch.delenv("KIMIVL_PREPACK")
    assert prepack_for_inference(f32) and f32.prepacked


def test_engine_serves_a_prepacked_model_like_the_plain_one(model_and_processor):
    """What `kimivl serve` and `chat` run: continuous batching over the prepacked model, three requests (two with
    images) through two rows, each answer equal to the plain model's."""
    model, processor = model_and_processor
    red = Image.new("RGB", (56, 42), "red")
    requests = [[{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "Describe"}]}],
                [{"role": "user", "content": "hello there"}],
                [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "Colour?"}]}]]

    def answers() -> list[str]:
        engine = Engine(model, processor, max_batch=2)
        seqs = [engine.submit(engine.prepare(m), engine.settings(temperature=0, max_new_tokens=10))[0]
                for m in requests]
        while engine.step():
            pass
        return [s.text.text for s in seqs]

    plain = answers()
    assert all(plain) and len(set(plain)) > 1
    assert model.prepack()
    assert answers() == plain


def test_interrupted_prepack_leaves_the_model_as_it_was(tiny_checkpoint, monkeypatch):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    model.language_model.model.norm.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def interrupted(weight):  # Ctrl-C at the fifth weight
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return prepack_weight(weight)

    monkeypatch.setattr("kimivl.prepack.prepack_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.prepack()
    assert not model.prepacked and len(calls) == 5
    assert not any(p.is_mkldnn for p in model.parameters()) and not any(b.is_mkldnn for b in model.buffers())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["language_model.model.norm.weight"]
    monkeypatch.undo()
    assert model.prepack() and model.prepacked  # and it can be prepacked after all


def test_prepacked_model_refuses_quantizing_and_moving(tiny_checkpoint):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    assert model.prepack()
    with pytest.raises(InputError, match="unprepack"):
        quantize_model(model, Scheme.named("int8"))
    with pytest.raises(InputError, match="unprepack"):
        model.to(torch.bfloat16)
    assert model.quantization is None and model.prepacked  # untouched
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.unprepack().to(torch.bfloat16)  # plain again: it converts
    assert model.dtype == torch.bfloat16
