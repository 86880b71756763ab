"""The decoder against independent references: transformers' DeepseekV3ForCausalLM (same weights, loaded from a
directory this project wrote) for whole-model logits, and hand-written loops for routing and the MoE layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl import KimiVLConfig, KimiVLForConditionalGeneration
from kimivl.decoder import MoE
from kimivl.kernels.moe import moe_experts
from kimivl.kernels.routing import route
from tests.helpers import rel_err
from weights_tools.export import export_text

HF_PRESETS = ["tiny", "tiny-qlora", "tiny-grouped"]  # transformers' router is sigmoid + bias (noaux_tc) only


@pytest.fixture(scope="module")
def hf_pair(tiny_checkpoint, tmp_path_factory):
    """preset -> (kimivl model, transformers model) holding the same weights, float32."""
    from transformers import DeepseekV3ForCausalLM
    cache = {}

    def get(preset):
        if preset not in cache:
            ours = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint(preset))
            hf_dir = export_text(tiny_checkpoint(preset), tmp_path_factory.mktemp(f"hf-{preset}") / "hf")
            ref, info = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                              output_loading_info=True)
            assert not any(info.values()), info  # every weight loaded, none missing, unexpected or mismatched
            cache[preset] = ours, ref.eval()
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", HF_PRESETS)
def test_logits_match_transformers(hf_pair, preset, report):
    ours, ref = hf_pair(preset)
    assert ref.config.rope_interleave and ref.config.n_group == ours.config.text_config.n_group
    ids = torch.randint(0, 1024, (2, 37))  # text ids (the placeholder id needs images)
    with torch.no_grad():
        got = ours(ids).logits
        want = ref(ids).logits.float()
    diff = (got - want).abs().max().item()
    report("max |logit - transformers|", f"{diff:.2e} (relative {rel_err(got, want):.2e})")
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e}"
    assert rel_err(got, want) <= 1e-5
    assert want.std() > 0.1  # the weights are not degenerate: the comparison can fail


@pytest.mark.parametrize("preset", HF_PRESETS)
def test_router_picks_the_same_experts_as_transformers(hf_pair, preset):
    ours, ref = hf_pair(preset)
    layer = 1  # first MoE layer
    x = torch.randn(64, ours.config.text_config.hidden_size)
    gate = ours.language_model.model.layers[layer].mlp.gate
    ids, w = route(x, gate.weight, gate.e_score_correction_bias, ours.config.text_config)
    _, ref_w, ref_ids = ref.model.layers[layer].mlp.gate(x)
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices), rtol=1e-6, atol=0)


def reference_route(x: torch.Tensor, weight: torch.Tensor, bias, cfg) -> list[dict[int, float]]:
    """Spec 8.2 written out token by token in float64: {expert: weight} per token."""
    out = []
    E, G = cfg.n_routed_experts, cfg.n_group
    for row in x.double():
        logits = [float(weight[e].double() @ row) for e in range(E)]
        if cfg.scoring_func == "sigmoid":
            s = [1 / (1 + torch.exp(torch.tensor(-v, dtype=torch.float64)).item()) for v in logits]
        else:
            m = max(logits)
            z = sum(torch.exp(torch.tensor(v - m, dtype=torch.float64)).item() for v in logits)
            s = [torch.exp(torch.tensor(v - m, dtype=torch.float64)).item() / z for v in logits]
        choice = [s[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        eligible = list(range(E))
        if cfg.topk_method != "greedy" and G > 1:
            size = E // G
            groups = [choice[g * size:(g + 1) * size] for g in range(G)]
            gscore = [sum(sorted(gr)[-2:]) if bias is not None else max(gr) for gr in groups]
            keep = sorted(range(G), key=lambda g: -gscore[g])[: cfg.topk_group]
            eligible = [e for e in range(E) if e // size in keep]
        chosen = sorted(eligible, key=lambda e: -choice[e])[: cfg.num_experts_per_tok]
        w = {e: s[e] for e in chosen}
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            total = sum(w.values())
            w = {e: v / (total + 1e-20) for e, v in w.items()}
        out.append({e: v * cfg.routed_scaling_factor for e, v in w.items()})
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-grouped", "tiny-softmax"])
def test_route_matches_written_out_spec(preset):
    cfg = KimiVLConfig.preset(preset).text_config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, cfg.hidden_size, generator=gen)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen) * 0.3
    bias = torch.randn(cfg.n_routed_experts, generator=gen) * 0.1 if cfg.topk_method == "noaux_tc" else None
    ids, w = route(x, weight, bias, cfg)
    for t, want in enumerate(reference_route(x, weight, bias, cfg)):
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert set(got) == set(want), f"token {t}"
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5)


def test_correction_bias_steers_choice_but_not_weights():
    cfg = KimiVLConfig.preset("tiny").text_config
    x = torch.randn(8, cfg.hidden_size)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size)
    bias = torch.zeros(cfg.n_routed_experts)
    bias[5] = 10.0  # expert 5 always chosen, but weighted by its unbiased score
    ids, w = route(x, weight, bias, cfg)
    assert (ids == 5).any(-1).all()
    s = torch.sigmoid(x @ weight.T)
    chosen = s.gather(1, ids)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_moe_experts_match_per_token_loop(tokens):
    E, H, I, k = 8, 16, 12, 3
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen)
    down = torch.randn(E, H, I, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)])
    ids[:, 0] = 2  # one expert receives every token; some experts receive none
    w = torch.rand(tokens, k, generator=gen)
    want = torch.zeros(tokens, H, dtype=torch.float64)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            gu = gate_up[e].double() @ x[t].double()
            h = F.silu(gu[:I]) * gu[I:]
            want[t] += w[t, j].double() * (down[e].double() @ h)
    got = moe_experts(x, ids, w, gate_up, down)
    assert rel_err(got, want) <= 1e-6


def test_moe_layer_has_shared_experts_and_bias(tiny_checkpoint):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    layers = model.language_model.model.layers
    assert not isinstance(layers[0].mlp, MoE) and all(isinstance(l.mlp, MoE) for l in layers[1:])
    moe = layers[1].mlp
    assert moe.shared_experts.gate_proj.weight.shape[0] == 2 * model.config.text_config.moe_intermediate_size
    assert moe.gate.e_score_correction_bias.abs().sum() > 0
