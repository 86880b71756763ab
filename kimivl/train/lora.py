"""LoRA through peft, applied from outside the model: adapters on chosen linear layers, merged weights for saving
in the official format, and merging in place."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

ADAPTER = "default"

# Target groups -> regexes over module names (peft matches a string target against the whole name). kv_b_proj is
# left out: cached decoding multiplies by `kv_b_proj.weight` directly (the absorbed MLA path), which would skip an
# unmerged adapter there, so a LoRA model would generate differently from its merged checkpoint.
LORA_TARGETS = {
    "attention": r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                 r"|o_proj)",
    "mlp": r"language_model\.model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",  # the dense layers
    "shared_experts": r"language_model\.model\.layers\.\d+\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
    "projector": r"multi_modal_projector\.(linear_1|linear_2)",
    "vision": r"vision_tower\.encoder\.blocks\.\d+\.(wqkv|wo|mlp\.fc0|mlp\.fc1)",
}


def _peft():
    try:
        import peft
    except ImportError:
        raise InputError("LoRA needs the peft library: pip install 'kimivl[train]' (or pip install peft)") from None
    return peft


def apply_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0
               ) -> nn.Module:
    """Wrap the linear layers of the `targets` groups (keys of LORA_TARGETS) with rank-`rank` adapters, in place.
    B starts at zero, so the model's outputs are unchanged until training moves it."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise InputError(f"unknown LoRA target {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(LORA_TARGETS)}")
    if rank < 1:
        raise InputError(f"the LoRA rank must be at least 1, got {rank}")
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules="|".join(f"({LORA_TARGETS[t]})" for t in targets))
    return peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under its own (un-wrapped) names with each adapter folded into its weight:
    W + (alpha / r) * B @ A. The model itself is unchanged, so training can go on."""
    state = {k: v for k, v in model.state_dict().items() if not is_lora_parameter(k)}
    for name, layer in lora_layers(model).items():
        weight = state.pop(f"{name}.base_layer.weight")
        state[f"{name}.weight"] = weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back, in place: a plain model again."""
    for name, layer in lora_layers(model).items():
        layer.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return model
