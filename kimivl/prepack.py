"""Decoder weights prepacked in oneDNN's blocked layout, for inference on CPU (float32, or bfloat16 on a CPU whose
oneDNN runs it: AVX-512).

For the few rows a decode step multiplies, torch's own CPU products read a row-major weight well under the memory's
rate; oneDNN, given the weight reordered once into its blocked layout, reads it much faster (`kernels.linear.
prepack_weight` has the figures). `prepack(model)` reorders, in place, every decoder linear weight (attention
projections except `kv_b_proj`, which the absorbed decode multiplies by directly; dense and shared MLPs; `lm_head`
unless tied to the embedding) and every routed expert (one tensor per expert, `kernels.moe.PrepackedStack`). What it
leaves: embeddings, routers, norms, the vision tower and projector (run once per image). Memory: the same, plus one
MoE layer's experts while that layer is reordered (oneDNN's products use a little more scratch memory in a long
prefill: 1.90 against 1.66 GiB at 8,192 tokens, bfloat16); time: 0.6-0.8 GB/s of weights on 2 threads.

A prepacked model computes the same products, summed in another order (bfloat16: oneDNN multiplies both layouts, and
gave the same numbers on the AVX-512 EPYC measured; float32: within 1e-5 of the plain model's logits; tests hold
logits and greedy tokens to the plain model's), but its weights are opaque oneDNN tensors: it is for inference only.
Its parameters ask for no gradient; training, `save_pretrained`, quantizing and `.to()` refuse it; `unprepack(model)`
gives every weight and flag back bit for bit. The CLI's generate, chat, eval and serve prepack a CPU model by
themselves (`prepack_for_inference`; KIMIVL_PREPACK=0 turns it off).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .decoder import Experts
from .errors import InputError
from .kernels.linear import Linear, prepack_weight, prepackable
from .kernels.moe import PrepackedStack

ENV = "KIMIVL_PREPACK"


def can_prepack(model: nn.Module) -> bool:
    """The model's float decoder is on CPU in float32, or in bfloat16 where oneDNN runs bfloat16 (an AVX-512 CPU),
    torch has oneDNN, and the model is neither quantized nor prepacked already."""
    return (not getattr(model, "prepacked", False) and getattr(model, "quantization", None) is None
            and prepackable(model.device, model.dtype))


class PrepackedExperts(nn.Module):
    """The routed experts of one MoE layer, one prepacked tensor per expert and projection (buffers
    `gate_up_{e}`, `down_{e}`), seen by the MoE as `decoder.Experts` is: `gate_up_proj`, `down_proj` stacks."""

    def __init__(self, experts: Experts):
        super().__init__()
        for part, stack in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            for e in range(stack.shape[0]):
                self.register_buffer(f"{part}_{e}", prepack_weight(stack[e]))
        # the same tensors as stacks, gathered once, not in every forward (buffers are never replaced: a prepacked
        # model refuses .to())
        n = experts.gate_up_proj.shape[0]
        self.gate_up_proj = PrepackedStack(getattr(self, f"gate_up_{e}") for e in range(n))
        self.down_proj = PrepackedStack(getattr(self, f"down_{e}") for e in range(n))

    def dense(self) -> Experts:
        """The plain `decoder.Experts` holding these weights (exactly)."""
        experts = Experts.__new__(Experts)
        nn.Module.__init__(experts)
        experts.gate_up_proj = nn.Parameter(torch.stack([t.to_dense() for t in self.gate_up_proj]))
        experts.down_proj = nn.Parameter(torch.stack([t.to_dense() for t in self.down_proj]))
        return experts


def _targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every decoder linear layer and expert stack that prepacking covers. Names,
    not the modules: a list holding the modules would keep each replaced weight alive until the end."""
    lm = model.language_model
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight
    targets = []
    for name, module in lm.named_modules():
        if name.endswith("kv_b_proj") or (tied and name == "lm_head"):
            continue
        if isinstance(module, (Linear, Experts, PrepackedExperts)):
            parent, _, attr = name.rpartition(".")
            targets.append((lm.get_submodule(parent) if parent else lm, attr))
    return targets


@torch.no_grad()
def prepack(model: nn.Module) -> bool:
    """Prepack the decoder's weights in place for CPU inference when `can_prepack(model)`; returns whether it did.
    Each weight is replaced by its reordered copy, one at a time. Interrupted (Ctrl-C, out of memory), the model is
    put back as it was before the error is raised."""
    if not can_prepack(model):
        return False
    # an inference model: no parameter asks for a gradient, so a forward run outside no_grad builds no graph (and
    # never unpacks a weight for it); unprepack gives the flags back
    model.trainable_before_prepack = {name for name, p in model.named_parameters() if p.requires_grad}
    model.requires_grad_(False)
    model.prepacked = True  # from the first reordered weight on: saving and training refuse a half-prepacked model
    try:
        for parent, attr in _targets(model):
            module = getattr(parent, attr)
            if isinstance(module, Experts):
                setattr(parent, attr, PrepackedExperts(module))
            elif not module.weight.is_mkldnn:
                module.weight = nn.Parameter(prepack_weight(module.weight), requires_grad=False)
            del module
    except BaseException:
        unprepack(model)
        raise
    return True


@torch.no_grad()
def unprepack(model: nn.Module) -> nn.Module:
    """Undo `prepack` (or what an interrupted one did): every weight back in its plain layout and every
    `requires_grad` flag as before, exactly (trainable, savable)."""
    for parent, attr in _targets(model):
        module = getattr(parent, attr)
        if isinstance(module, PrepackedExperts):
            setattr(parent, attr, module.dense())
        elif isinstance(module, Linear) and module.weight.is_mkldnn:
            module.weight = nn.Parameter(module.weight.to_dense())
        del module
    trainable = getattr(model, "trainable_before_prepack", None)
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
    model.prepacked, model.trainable_before_prepack = False, None
    return model


def prepack_for_inference(model: nn.Module) -> bool:
    """What the CLI's generate, chat, eval and serve do after loading: `prepack(model)`, unless the environment says
    KIMIVL_PREPACK=0 (to compare against the plain layout)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no") and prepack(model)


def refuse_prepacked(model: nn.Module, action: str) -> None:
    """InputError when `model` is prepacked: `action` (training, saving, quantizing, moving) needs plain weights."""
    if getattr(model, "prepacked", False):
        raise InputError(f"this model's weights are prepacked for CPU inference (kimivl.prepack); {action} needs "
                         "them plain: call model.unprepack() first")
