"""The full model: image splice, loss, padding, dtypes, and the a3b layout built on the meta device."""

from __future__ import annotations

import pytest
import torch

from kimivl import InputError, KimiVLConfig, KimiVLForConditionalGeneration, decoder
from kimivl.checkpoint import expected_tensors
from kimivl.kernels.routing import route
from kimivl.model import parameter_counts
from tests.helpers import image_batch, prompt_with_images, rel_err


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))


def test_image_features_land_on_placeholders_in_order(model):
    grids = [(4, 6), (2, 4)]
    pixel_values, grid_hws = image_batch(grids)
    ids = prompt_with_images(model.config, grids)
    with torch.no_grad():
        embeds = model.embed(ids, pixel_values, grid_hws)[0]
        feats = model.image_features(pixel_values, grid_hws)
        text = model.language_model.model.embed_tokens(ids)[0]
    slots = (ids[0] == model.config.media_placeholder_token_id).nonzero()[:, 0]
    assert len(slots) == feats.shape[0] == 6 + 2
    assert torch.equal(embeds[slots], feats)  # in order: image 0's tokens first, row-major
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(embeds[others], text[others])


def test_placeholder_count_mismatch_is_a_clear_error(model):
    pixel_values, grid_hws = image_batch([(4, 4)])  # 4 feature tokens
    ids = prompt_with_images(model.config, [(4, 2)])  # 2 placeholders
    with pytest.raises(InputError, match="4 feature tokens .* 2 <\\|media_pad\\|> tokens"):
        model(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
    with pytest.raises(InputError, match="no pixel_values"):
        model(ids)


def test_loss_is_next_token_cross_entropy_ignoring_minus_100(model):
    grids = [(2, 4)]
    pixel_values, grid_hws = image_batch(grids)
    ids = prompt_with_images(model.config, grids)
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, pixel_values=pixel_values, image_grid_hws=grid_hws, labels=labels)
    logp = out.logits[0].double().log_softmax(-1)
    terms = [-logp[t - 1, labels[0, t]] for t in range(1, ids.shape[1]) if labels[0, t] != -100]
    assert len(terms) == ids.shape[1] - 5
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    out.loss.backward()  # differentiable end to end, the vision tower included
    assert model.vision_tower.patch_embed.proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_single_rows(model, side):
    lengths = [9, 14, 5]
    T = max(lengths)
    rows = [torch.randint(0, 1000, (n,)) for n in lengths]
    ids = torch.full((len(rows), T), model.config.text_config.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, span], mask[i, span] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            got = batched[i, :len(r)] if side == "right" else batched[i, T - len(r):]
            assert rel_err(got, alone) <= 1e-5, f"row {i}"
            assert torch.isfinite(batched[i]).all()


def test_bfloat16_forward_stays_close_to_float32(tiny_checkpoint, monkeypatch):
    grids = [(4, 6)]
    pixel_values, grid_hws = image_batch(grids)
    ids = prompt_with_images(KimiVLConfig.preset("tiny"), grids, text_len=16)
    routes = []  # expert ids of every MoE layer, in call order: float32 run first, then bfloat16

    def recording_route(*args):
        out = route(*args)
        routes.append(out[0].sort(-1).values)
        return out

    monkeypatch.setattr(decoder, "route", recording_route)
    with torch.no_grad():
        f32 = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))(
            ids, pixel_values=pixel_values, image_grid_hws=grid_hws).logits[0]
        bf16_model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"), dtype=torch.bfloat16)
        assert bf16_model.dtype == torch.bfloat16
        bf16 = bf16_model(ids, pixel_values=pixel_values, image_grid_hws=grid_hws).logits[0]
    assert bf16.dtype == torch.float32  # logits are upcast, as in the official model
    n = len(routes) // 2
    flipped = torch.stack([(routes[i] != routes[n + i]).any(-1) for i in range(n)]).any(0)  # [T]
    # bfloat16 rounds every product to 8 mantissa bits; on tokens whose experts are the same in both runs the
    # logits stay within 3% of their range. A near-tie in the router may pick another expert in bfloat16 (rare),
    # which moves that token's logits by more: those tokens are excluded, and must stay rare.
    per_token = (bf16 - f32).abs().amax(-1) / f32.abs().amax(-1)
    assert flipped.float().mean() <= 0.1
    assert per_token[~flipped].max() <= 0.03
    assert (bf16.argmax(-1) == f32.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("preset", ["tiny-qlora", "tiny-grouped", "tiny-softmax"])
def test_variant_presets_run(tiny_checkpoint, preset):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint(preset))
    grids = [(2, 2), (4, 2)]
    pixel_values, grid_hws = image_batch(grids)
    ids = prompt_with_images(model.config, grids)
    out = model(ids, pixel_values=pixel_values, image_grid_hws=grid_hws, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)


# ---- a3b: built on the meta device, compared with the spec's tables (spec 2) --------------------------------------
def a3b_spec_tensors() -> dict[str, tuple[int, ...]]:
    """Spec section 2, table by table."""
    t: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embed.proj.weight": (1152, 3, 14, 14),
        "vision_tower.patch_embed.proj.bias": (1152,),
        "vision_tower.patch_embed.pos_emb.weight": (64, 64, 1152),
    }
    for i in range(27):
        b = f"vision_tower.encoder.blocks.{i}."
        t |= {b + "norm0.weight": (1152,), b + "norm0.bias": (1152,), b + "wqkv.weight": (3456, 1152),
              b + "wqkv.bias": (3456,), b + "wo.weight": (1152, 1152), b + "wo.bias": (1152,),
              b + "norm1.weight": (1152,), b + "norm1.bias": (1152,), b + "mlp.fc0.weight": (4304, 1152),
              b + "mlp.fc0.bias": (4304,), b + "mlp.fc1.weight": (1152, 4304), b + "mlp.fc1.bias": (1152,)}
    t |= {"vision_tower.encoder.final_layernorm.weight": (1152,), "vision_tower.encoder.final_layernorm.bias": (1152,),
          "multi_modal_projector.pre_norm.weight": (1152,), "multi_modal_projector.pre_norm.bias": (1152,),
          "multi_modal_projector.linear_1.weight": (4608, 4608), "multi_modal_projector.linear_1.bias": (4608,),
          "multi_modal_projector.linear_2.weight": (2048, 4608), "multi_modal_projector.linear_2.bias": (2048,),
          "language_model.model.embed_tokens.weight": (163840, 2048)}
    for L in range(27):
        b = f"language_model.model.layers.{L}."
        t |= {b + "input_layernorm.weight": (2048,), b + "post_attention_layernorm.weight": (2048,),
              b + "self_attn.q_proj.weight": (3072, 2048), b + "self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
              b + "self_attn.kv_a_layernorm.weight": (512,), b + "self_attn.kv_b_proj.weight": (4096, 512),
              b + "self_attn.o_proj.weight": (2048, 2048)}
        if L == 0:
            t |= {b + "mlp.gate_proj.weight": (11264, 2048), b + "mlp.up_proj.weight": (11264, 2048),
                  b + "mlp.down_proj.weight": (2048, 11264)}
            continue
        t |= {b + "mlp.gate.weight": (64, 2048), b + "mlp.gate.e_score_correction_bias": (64,),
              b + "mlp.shared_experts.gate_proj.weight": (2816, 2048), b + "mlp.shared_experts.up_proj.weight": (2816, 2048),
              b + "mlp.shared_experts.down_proj.weight": (2048, 2816)}
        for e in range(64):
            t |= {b + f"mlp.experts.{e}.gate_proj.weight": (1408, 2048), b + f"mlp.experts.{e}.up_proj.weight": (1408, 2048),
                  b + f"mlp.experts.{e}.down_proj.weight": (2048, 1408)}
    t |= {"language_model.model.norm.weight": (2048,), "language_model.lm_head.weight": (163840, 2048)}
    return t


def test_a3b_names_shapes_and_parameter_counts():
    config = KimiVLConfig.preset("a3b")
    assert expected_tensors(config) == a3b_spec_tensors()
    counts = parameter_counts(config)
    assert counts["vision"] == 416_866_032
    assert counts["projector"] == 30_679_808
    assert counts["decoder"] == 15_960_110_208
    # Activated per token: all but the 58 routed experts each MoE layer leaves unused (26 layers x 58 x 3 x 1408 x 2048).
    assert counts["decoder_activated"] == 15_960_110_208 - 26 * 58 * 3 * 1408 * 2048 == 2_914_776_192
    assert counts["decoder_activated"] - counts["embeddings"] == 2_243_687_552  # without embedding and head
