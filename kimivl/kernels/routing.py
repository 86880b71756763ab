"""MoE routing: router scores -> (expert ids, combine weights), the semantics of the published MoEGate (spec 8.2)
but for one deliberate difference: group-limited routing masks the experts of dropped groups with -inf, as
DeepSeek-V3's reference code and transformers' DeepseekV3 do, where the published Kimi-VL remote code fills them
with 0.0 (so a dropped group's expert could still win when every kept score plus bias is negative). That only
matters with n_group > 1, and every Kimi-VL checkpoint has n_group = 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TextConfig
from .backend import backend_for


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: TextConfig
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `num_experts_per_tok` experts per token: ids [T, k] (int64), weights [T, k] (float32).

    x [T, H], weight [E, H], bias [E] or None. Dispatches to the Triton kernel (one pass per token block) or to
    `route_reference`; the two agree on the chosen set (except among exactly tied scores, where each picks its own),
    not on its order within a token.
    """
    if backend_for(x, weight) == "triton":
        from .triton_routing import route_triton
        return route_triton(x, weight, bias, cfg)
    return route_reference(x, weight, bias, cfg)


def route_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: TextConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `num_experts_per_tok` experts per token. x [T, H], weight [E, H], bias [E] or None.

    Returns ids [T, k] (int64) and weights [T, k] (float32). Scores are sigmoid or softmax of float32 logits; the
    correction bias only steers the choice (noaux_tc), the weights are the unbiased scores, renormalised when
    k > 1 and norm_topk_prob, then multiplied by routed_scaling_factor. With n_group > 1 only the topk_group best
    groups are eligible (group score = sum of its top-2 biased scores for noaux_tc, its max otherwise); the others'
    experts are masked with -inf (the module docstring says how this differs from the published remote code).
    """
    logits = F.linear(x.float(), weight.float())  # [T, E]
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    n_group = cfg.n_group
    if cfg.topk_method != "greedy" and n_group > 1:
        grouped = choice.unflatten(-1, (n_group, -1))  # [T, groups, E/groups]
        group_scores = (grouped.topk(2, dim=-1).values.sum(-1) if cfg.topk_method == "noaux_tc"
                        else grouped.amax(-1))  # [T, groups]
        keep = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices  # [T, k]
    weights = scores.gather(1, ids)
    if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * cfg.routed_scaling_factor
