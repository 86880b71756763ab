"""Expert load during training: per-layer counts, the auxiliary-loss-free bias update and the sequence-level
auxiliary loss of DeepSeek-V3, attached to a model from outside (forward pre-hooks on its MoE layers).

Training routes exactly as inference does: the MoE layers run their own `route` (sigmoid scores plus the correction
bias choose the experts, the unbiased scores weigh them), nothing here changes the choice. The hooks recompute the
router's scores from each MoE layer's input (one [tokens, hidden] x [hidden, experts] product) to count loads and,
for the auxiliary loss, to keep a differentiable path to the router weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..decoder import MoE
from ..kernels.routing import route_reference


def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """Decoder layer index -> its MoE module."""
    return {i: layer.mlp for i, layer in enumerate(model.language_model.model.layers) if isinstance(layer.mlp, MoE)}


class ExpertBalance:
    """Counts expert loads over the real tokens of each step and, when `aux_alpha` > 0, accumulates the
    sequence-level balance loss of every MoE layer (DeepSeek-V3 eq. 17-20):
    L = alpha * sum_i f_i * P_i per sequence, f_i = E / (K * T) * #tokens routed to i, P_i = mean_t s_i / sum_j s_j,
    averaged over sequences.

    Use: `observe(attention_mask)` before a forward, `take_aux_loss()` after it, `step_loads()` after the step.
    Hooks act only while observing, so the recomputation of gradient checkpointing (during backward) is not counted
    twice, and the loss is built from the recorded layer inputs after the forward, outside checkpointed blocks.
    """

    def __init__(self, model: nn.Module, aux_alpha: float = 0.0):
        self.layers = moe_layers(model)
        self.aux_alpha = aux_alpha
        self.mask: torch.Tensor | None = None
        self.loads = {i: torch.zeros(m.config.n_routed_experts, dtype=torch.float64) for i, m in self.layers.items()}
        self.aux: list[tuple[MoE, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in self.layers.items()]

    def observe(self, attention_mask: torch.Tensor | None) -> None:
        self.mask = torch.ones(1, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    def _hook(self, layer: int):
        def hook(module: MoE, args) -> None:
            if self.mask is None:
                return
            x = args[0]  # [B, T, H]
            real = self.mask.expand(x.shape[:2]).to(x.device)  # [B, T]
            cfg = module.config
            with torch.no_grad():  # the choice the layer itself makes (route_reference is what route dispatches to)
                ids, _ = route_reference(x.flatten(0, 1), module.gate.weight, module.gate.e_score_correction_bias,
                                         cfg)
            self.loads[layer] += torch.bincount(ids.view(*x.shape[:2], -1)[real].flatten(),
                                                minlength=cfg.n_routed_experts).double().cpu()
            if self.aux_alpha > 0:  # the loss is built after the forward, outside any checkpointed block
                self.aux.append((module, x, ids.view(*x.shape[:2], -1), real))
        return hook

    def _sequence_loss(self, module: MoE, x: torch.Tensor, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """[B] losses; x [B, T, H], ids [B, T, k] (the experts chosen), real [B, T] (False at padding)."""
        cfg = module.config
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        logits = F.linear(x.float(), module.gate.weight.float())  # [B, T, E]: the router's, with gradients
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        chosen = torch.zeros_like(scores).scatter_(-1, ids, 1.0)  # [B, T, E]
        w = real.float()[..., None]
        n = real.sum(-1).clamp(min=1).float()[:, None]  # [B, 1] real tokens per sequence
        f = (chosen * w).sum(1) * E / (K * n)  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True) * w).sum(1) / n  # [B, E]
        return self.aux_alpha * (f * p).sum(-1)

    def take_aux_loss(self) -> torch.Tensor | None:
        """The summed per-layer balance losses of the last forward, per sequence [B] (None without the loss)."""
        self.mask = None
        if not self.aux:
            return None
        total = torch.stack([self._sequence_loss(*seen) for seen in self.aux]).sum(0)
        self.aux = []
        return total

    def step_loads(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert per layer since the last call (then reset)."""
        loads = {i: t.clone() for i, t in self.loads.items()}
        for t in self.loads.values():
            t.zero_()
        return loads

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def update_bias(model: nn.Module, loads: dict[int, torch.Tensor], gamma: float) -> None:
    """The auxiliary-loss-free balance step of DeepSeek-V3: each expert's correction bias moves by `gamma` towards
    balance, down when its load is above the layer's mean, up when below (b_i += gamma * sign(mean - load_i))."""
    for i, module in moe_layers(model).items():
        bias = module.gate.e_score_correction_bias
        if bias is None or i not in loads:
            continue
        step = gamma * torch.sign(loads[i].mean() - loads[i]).to(bias.device, bias.dtype)
        if isinstance(bias, DTensor):  # sharded by FSDP: every process holds the same loads, so each takes its shard
            step = distribute_tensor(step, bias.device_mesh, bias.placements, src_data_rank=None)
        bias += step


def load_summary(loads: dict[int, torch.Tensor]) -> dict[str, list[float]]:
    """Per layer: each expert's share of the routed tokens (sums to 1), for the metrics log."""
    return {str(i): [round(float(v), 5) for v in t / t.sum().clamp(min=1)] for i, t in loads.items()}
