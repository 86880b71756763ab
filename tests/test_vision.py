"""MoonViT and the projector against a reference written here from the spec's formulas (spec 3, 4), in float64:
hand-rolled bicubic (Keys a = -0.75, align_corners=False, clamped taps), complex-number 2D RoPE with the column
angle in even pairs, explicit per-image softmax attention, and the 2x2 merge by index."""

from __future__ import annotations

import math

import pytest
import torch

from kimivl import InputError, KimiVLForConditionalGeneration
from kimivl.vision import patch_merge
from tests.helpers import image_batch, rel_err


def cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] resampling weights: source = (dst + 0.5) * n_in / n_out - 0.5, 4 taps clamped to the border."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        src = (d + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        t = src - i0
        for tap, wgt in zip(range(i0 - 1, i0 + 3), (cubic(t + 1), cubic(t), cubic(1 - t), cubic(2 - t))):
            m[d, min(max(tap, 0), n_in - 1)] += wgt
    return m


def ref_layer_norm(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def ref_rope(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """x [h*w, heads, D] -> rotated: pair p = x[2p] + i x[2p+1] times e^(i angle); angle(2i) = col f_i,
    angle(2i+1) = row f_i, f_i = 10000^(-4i/D)."""
    D = x.shape[-1]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
    angle = torch.zeros(h * w, D // 2, dtype=torch.float64)
    for n in range(h * w):
        r, c = divmod(n, w)
        for i in range(D // 4):
            f = 1.0 / 10000 ** (4 * i / D)
            angle[n, 2 * i], angle[n, 2 * i + 1] = c * f, r * f
    rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.view_as_real(z * rot).reshape(x.shape)


def ref_tower(model, pixel_values, grids):
    """The vision tower + projector from spec 3-4, one image at a time, float64."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config.vision_config
    C, nh = cfg.hidden_size, cfg.num_attention_heads
    out, start = [], 0
    for h, w in grids:
        px = pixel_values[start:start + h * w].double()
        start += h * w
        x = px.flatten(1) @ p["vision_tower.patch_embed.proj.weight"].flatten(1).T + p["vision_tower.patch_embed.proj.bias"]
        table = p["vision_tower.patch_embed.pos_emb.weight"]  # [H0, W0, C]
        pos = torch.einsum("ya,xb,abc->yxc", bicubic_matrix(table.shape[0], h), bicubic_matrix(table.shape[1], w), table)
        x = x + pos.reshape(h * w, C)
        for i in range(cfg.num_hidden_layers):
            b = f"vision_tower.encoder.blocks.{i}."
            a = ref_layer_norm(x, p[b + "norm0.weight"], p[b + "norm0.bias"])
            qkv = a @ p[b + "wqkv.weight"].T + p[b + "wqkv.bias"]
            q, k, v = (qkv[:, j * C:(j + 1) * C].reshape(h * w, nh, C // nh) for j in range(3))
            q, k = ref_rope(q, h, w), ref_rope(k, h, w)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(C // nh)
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(h * w, C)
            x = x + attn @ p[b + "wo.weight"].T + p[b + "wo.bias"]
            a = ref_layer_norm(x, p[b + "norm1.weight"], p[b + "norm1.bias"])
            u = a @ p[b + "mlp.fc0.weight"].T + p[b + "mlp.fc0.bias"]
            u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            x = x + u @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"]
        x = ref_layer_norm(x, p["vision_tower.encoder.final_layernorm.weight"], p["vision_tower.encoder.final_layernorm.bias"])
        grid = x.reshape(h, w, C)
        merged = torch.stack([torch.stack([grid[2 * R, 2 * Cc], grid[2 * R, 2 * Cc + 1], grid[2 * R + 1, 2 * Cc],
                                           grid[2 * R + 1, 2 * Cc + 1]])
                              for R in range(h // 2) for Cc in range(w // 2)])  # [(h/2)(w/2), 4, C]
        m = ref_layer_norm(merged, p["multi_modal_projector.pre_norm.weight"], p["multi_modal_projector.pre_norm.bias"])
        u = m.reshape(m.shape[0], -1) @ p["multi_modal_projector.linear_1.weight"].T + p["multi_modal_projector.linear_1.bias"]
        u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        out.append(u @ p["multi_modal_projector.linear_2.weight"].T + p["multi_modal_projector.linear_2.bias"])
    return torch.cat(out)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))


def test_bicubic_reference_is_identity_at_native_size():
    assert torch.allclose(bicubic_matrix(16, 16), torch.eye(16, dtype=torch.float64))


# grids: smaller, equal to and larger than the 16x16 table, non-square, and a 2x2 minimum
@pytest.mark.parametrize("grids", [[(4, 6)], [(16, 16)], [(2, 2), (6, 4), (20, 18)]])
def test_tower_and_projector_match_spec_reference(model, grids, report):
    pixel_values, grid_hws = image_batch(grids)
    with torch.no_grad():
        got = model.image_features(pixel_values, grid_hws)
    want = ref_tower(model, pixel_values, grids)
    assert got.shape == want.shape == (sum(h * w for h, w in grids) // 4, model.config.text_config.hidden_size)
    report("max |features - float64 spec reference| / max |reference|", f"{rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-5


def test_packing_is_invariant(model):
    grids = [(4, 6), (8, 2), (2, 2)]
    pixel_values, grid_hws = image_batch(grids)
    with torch.no_grad():
        packed = model.vision_tower(pixel_values, grid_hws)
        start = 0
        for (h, w), feats in zip(grids, packed):
            alone = model.vision_tower(pixel_values[start:start + h * w], torch.tensor([[h, w]]))[0]
            start += h * w
            torch.testing.assert_close(feats, alone, rtol=1e-6, atol=1e-6)


def test_patch_merge_order():
    h, w = 4, 6
    x = torch.arange(h * w, dtype=torch.float32)[:, None]  # patch (r, c) holds r*w + c
    merged = patch_merge(x, [(h, w)], (2, 2))[0][..., 0]
    assert merged[0].tolist() == [0, 1, 6, 7]          # (R, C) = (0, 0): (0,0) (0,1) (1,0) (1,1)
    assert merged[1].tolist() == [2, 3, 8, 9]          # (0, 1)
    assert merged[3].tolist() == [12, 13, 18, 19]      # (1, 0): row-major over the 2 x 3 coarse grid


@pytest.mark.parametrize("grids, pixels, message", [
    ([(3, 4)], 12, "multiple of the merge kernel"),
    ([(4, 4)], 15, "describes 16 patches"),
    ([(514, 2)], 1028, "outside 1..512"),
])
def test_bad_grids_raise_input_error(model, grids, pixels, message):
    with pytest.raises(InputError, match=message):
        model.vision_tower(torch.zeros(pixels, 3, 14, 14), torch.tensor(grids))
