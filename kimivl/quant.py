"""Quantized models: which weights are quantized, the modules that hold them, and the compressed-tensors format.

`from_pretrained(path, quantize="int8" | "int4", group_size=...)` (checkpoint.load) builds the model on the meta
device, swaps these modules in (`quantize_modules`), and fills them one official tensor at a time: a float source
is read in blocks of rows and quantized (`kernels.quant.quantize`), a compressed-tensors source is unpacked. So
memory holds the quantized model plus one block.

What is quantized, in the decoder only:
- every attention projection and dense / shared / routed expert weight: int8 per output channel, or int4 in groups
  (the scheme); in a compressed-tensors checkpoint these are the `pack-quantized` tensors;
- `kv_b_proj` is held dequantized (in the model's float dtype), because the absorbed decode path multiplies by its
  halves directly: the weight is quantized and dequantized at load, so quantizing while loading and loading a
  compressed checkpoint give the same numbers. Cost: 2.1M weights a layer, 226 MB in float32 for the 27-layer A3B
  (28 MB in int4);
- `lm_head` and the token embedding: int8 per row, whatever the scheme (the file keeps them dense, as llm-compressor
  leaves lm_head; vLLM reads them as they are);
- float: routers, correction biases (float32), norms, and the whole vision tower and projector (0.4B of the A3B's
  16.4B weights, run once per image, and its LayerNorm-heavy blocks are the part most hurt by rounding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError, InputError
from .kernels.quant import (QuantWeight, dequantize, held_layout, quant_matmul, quantize, quantize_in_layout,
                            scheme_bits)

# decoder weights quantized with the scheme (official names; the routed experts per expert)
TARGET = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn|mlp(\.shared_experts|\.experts\.\d+)?)"
                    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
                    r"\.weight")
HELD_FLOAT = ".kv_b_proj.weight"  # quantized in files, held dequantized in memory
INT8_ROWS = ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight")
PACKED = ("_packed", "_scale", "_shape")  # a compressed target X.weight is stored as X.weight_packed / _scale / _shape


@dataclass(frozen=True)
class Scheme:
    bits: int
    group: int | None  # None: one scale per output channel

    @classmethod
    def named(cls, name: str, group_size: int | None = None) -> "Scheme":
        return cls(*scheme_bits(name, group_size))

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def __str__(self) -> str:
        return self.name + (f" (groups of {self.group})" if self.group else " (per channel)")


# ---- modules ----------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A bias-free linear layer with a quantized weight [N, K] (or a stack [E, N, K]: `QuantExperts`)."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.register_buffer("data", weight.data)
        self.register_buffer("scale", weight.scale)
        self.bits, self.group, self.shape, self.layout = weight.bits, weight.group, weight.shape, weight.layout
        self.out_features, self.in_features = weight.shape[-2:]

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.data, self.scale, self.bits, self.group, self.shape, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.qweight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group}, {self.layout}"


class QuantExperts(nn.Module):
    """The routed experts, stacked as in `decoder.Experts`: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]."""

    def __init__(self, gate_up: QuantWeight, down: QuantWeight):
        super().__init__()
        self.gate_up = QuantLinear(gate_up)
        self.down = QuantLinear(down)

    @property
    def gate_up_proj(self) -> QuantWeight:
        return self.gate_up.qweight

    @property
    def down_proj(self) -> QuantWeight:
        return self.down.qweight


class QuantEmbedding(nn.Module):
    """Token embeddings held as int8 rows with one scale each; looked-up rows are dequantized to `dtype`."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("data", weight.data)
        self.register_buffer("scale", weight.scale)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.data[ids].float() * self.scale[ids].float()[..., None]).to(self.dtype)


# ---- building a quantized model ---------------------------------------------------------------------------------
def empty_weight(shape: tuple[int, ...], bits: int, group: int | None, device: torch.device) -> QuantWeight:
    """An unfilled QuantWeight of float shape [..., N, K], in the layout `held_layout` picks for this device."""
    *lead, N, K = shape
    layout = held_layout(bits, device, N)
    if bits == 8:
        data, scale = (*lead, N, K), (*lead, N)
    else:
        data, scale = (*lead, N, K // 2), (*lead, K // group, N, 2) if layout == "cpu-int4" else (*lead, N, K // group)
    return QuantWeight(torch.empty(data, dtype=torch.int8 if bits == 8 else torch.uint8, device=device),
                       torch.empty(scale, dtype=torch.bfloat16, device=device), bits, group, tuple(shape), layout)


def quantize_modules(model: nn.Module, scheme: Scheme, dtype: torch.dtype, device: torch.device
                     ) -> dict[str, tuple[QuantWeight, Scheme]]:
    """Swap the decoder's targets of `model` (built on meta) for quantized modules with empty storage on `device`.
    Returns model parameter name -> (its QuantWeight, its scheme): what the loader fills."""
    from .decoder import MoE
    from .kernels.linear import Linear

    lm = model.language_model
    int8 = Scheme(8, None)
    plan: dict[str, tuple[tuple[int, ...], Scheme]] = {}  # module name in lm -> (float weight shape, scheme)
    for name, module in lm.named_modules():
        if isinstance(module, MoE):
            plan[f"{name}.experts"] = (tuple(module.experts.gate_up_proj.shape), scheme)
        elif isinstance(module, Linear) and not name.endswith("kv_b_proj"):
            plan[name] = (tuple(module.weight.shape), int8 if name == "lm_head" else scheme)
    if scheme.group:
        widths = {shape[-1] for shape, s in plan.values() if s == scheme}
        widths |= {m.experts.down_proj.shape[-1] for m in lm.modules() if isinstance(m, MoE)}
        widths |= {m.weight.shape[-1] for n, m in lm.named_modules() if n.endswith("kv_b_proj")}  # round-tripped
        bad = sorted(w for w in widths if w % scheme.group)
        if bad:
            fits = [g for g in (128, 64, 32) if all(w % g == 0 for w in widths)]
            raise InputError(f"int4 groups of {scheme.group} do not divide the decoder's input widths {bad}; "
                             + (f"use a group size of {fits[0]}" if fits else "this model cannot be int4-grouped; "
                                "use int8"))
    targets: dict[str, tuple[QuantWeight, Scheme]] = {}
    for name, (shape, s) in plan.items():
        if name.endswith(".experts"):
            down = tuple(lm.get_submodule(name).down_proj.shape)
            qs = [empty_weight(shape, s.bits, s.group, device), empty_weight(down, s.bits, s.group, device)]
            _set(lm, name, QuantExperts(*qs))
            targets[f"language_model.{name}.gate_up_proj"] = (qs[0], s)
            targets[f"language_model.{name}.down_proj"] = (qs[1], s)
        else:
            q = empty_weight(shape, s.bits, s.group, device)
            _set(lm, name, QuantLinear(q))
            targets[f"language_model.{name}.weight"] = (q, s)
    emb = lm.model.embed_tokens
    q = empty_weight(tuple(emb.weight.shape), 8, None, device)
    lm.model.embed_tokens = QuantEmbedding(q, dtype)
    targets["language_model.model.embed_tokens.weight"] = (q, int8)
    return targets


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Quantize a float model in memory, in place (as loading with quantize= does; for a model just trained or
    built). Returns the model."""
    if getattr(model, "quantization", None) is not None:
        raise InputError(f"the model is already quantized ({model.quantization})")
    from .prepack import refuse_prepacked
    refuse_prepacked(model, "quantizing")
    floats = dict(model.state_dict())
    device = model.language_model.model.norm.weight.device
    targets = quantize_modules(model, scheme, model.language_model.model.norm.weight.dtype, device)
    for name, (target, _) in targets.items():
        w = floats[name]
        for e in range(w.shape[0]) if w.dim() == 3 else [None]:
            dst, src = (target, w) if e is None else (target[e], w[e])
            for a in range(0, src.shape[0], 4096):  # 4,096-row blocks: a multiple of the int4 kernel's 64
                fill_rows(dst, slice(a, a + 4096), src[a:a + 4096].float().cpu())
    for name, p in model.named_parameters():
        if name.endswith(HELD_FLOAT):
            p.copy_(round_trip(p, scheme))
    model.quantization = scheme
    return model


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def fill_rows(target: QuantWeight, rows: slice, w: torch.Tensor) -> None:
    """Quantize float rows w [n, K] of a 2-D target into target rows `rows` (in its layout)."""
    put_rows(target, rows, *quantize_in_layout(w, target.bits, target.group, target.layout))


def put_rows(target: QuantWeight, rows: slice, data: torch.Tensor, scale: torch.Tensor) -> None:
    """Copy rows held in the target's layout into it (cpu-int4 scales are [K/group, N, 2]: rows on dim 1)."""
    target.data[rows].copy_(data)
    if target.layout == "cpu-int4":
        target.scale[:, rows].copy_(scale)
    else:
        target.scale[rows].copy_(scale)


def round_trip(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """w as the scheme stores it, dequantized (float32): kv_b_proj's value in a quantized model."""
    return dequantize(*quantize(w, scheme.bits, scheme.group), scheme.bits)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the model holds in memory)."""
    return sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))


# ---- the compressed-tensors format ------------------------------------------------------------------------------
def compressed_config(scheme: Scheme) -> dict:
    """config.json's `quantization_config` for a checkpoint `kimivl-weights quantize` writes."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": True, "dynamic": False, "observer": "minmax",
               "actorder": None, "strategy": "group" if scheme.group else "channel", "group_size": scheme.group,
               "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*mlp\\.gate$"],
            "kv_cache_scheme": None}


def scheme_of(config) -> Scheme | None:
    """The scheme of a compressed-tensors checkpoint's config (KimiVLConfig), None for a float one; CheckpointError
    for a quantization this project does not read."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return None
    try:
        if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
            raise ValueError(f"quant_method {qc.get('quant_method')!r}, format {qc.get('format')!r}")
        (group,) = qc["config_groups"].values()
        w = group["weights"]
        if group.get("input_activations") or w.get("type") != "int" or not w.get("symmetric", True):
            raise ValueError("only symmetric int weights without activation quantization are read")
        bits, strategy = w["num_bits"], w["strategy"]
        if (bits, strategy) == (8, "channel"):
            return Scheme(8, None)
        if (bits, strategy) == (4, "group"):
            return Scheme.named("int4", w["group_size"])
        raise ValueError(f"{bits} bits with strategy {strategy!r}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json quantization_config: not a quantization kimivl reads ({e}); it reads "
                              "compressed-tensors pack-quantized int8 per channel and int4 in groups (written by "
                              "`kimivl-weights quantize` or llm-compressor's W8A16 / W4A16)") from None


def compressed_shapes(name: str, shape: tuple[int, ...], scheme: Scheme) -> dict[str, tuple[tuple[int, ...],
                                                                                       torch.dtype]]:
    """The tensors a compressed checkpoint stores for target weight `name` of float shape [N, K]."""
    N, K = shape
    return {name + "_packed": ((N, K * scheme.bits // 32), torch.int32),
            name + "_scale": ((N, K // scheme.group if scheme.group else 1), torch.bfloat16),
            name + "_shape": ((2,), torch.int64)}


def pack_int32(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical data (int8 [N, K] or packed uint8 [N, K/2]) -> compressed-tensors' int32 words [N, K * bits / 32]
    (values + 2^(bits-1), element i at bit i * bits, little-endian)."""
    u = (data.to(torch.int16) + 128).to(torch.uint8) if bits == 8 else data
    return u.contiguous().view(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_int32` inverted: int32 words -> canonical data."""
    u = packed.contiguous().view(torch.uint8)
    return (u.to(torch.int16) - 128).to(torch.int8) if bits == 8 else u

