"""The DeepSeek-V3 decoder of Kimi-VL (Moonlight): MLA attention and a sparse MoE with shared experts.

Module and attribute names are the checkpoint's (`language_model.model.layers.N.self_attn.kv_b_proj`, ...). The one
re-layout: each MoE layer holds its routed experts stacked (`experts.gate_up_proj` [E, 2I, H], gate rows first,
`experts.down_proj` [E, H, I]); `checkpoint.py` maps them to and from the official per-expert names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MLACache
from .config import TextConfig
from .kernels.attention import prefill_attention
from .kernels.backend import backend_for
from .kernels.linear import Linear
from .kernels.mla import absorbed_attention
from .kernels.moe import moe_experts
from .kernels.routing import route
from .rope import apply_rope, rope_1d_angles

LATENT_NORM_EPS = 1e-6  # kv_a_layernorm / q_a_layernorm are built without an eps argument: the class default


def normal_parameter(*shape: int, std: float) -> nn.Parameter:
    """A N(0, std) parameter; left unfilled on the meta device, where filling costs seconds (it imports
    torch._dynamo) and is thrown away when a checkpoint is loaded."""
    t = torch.empty(shape)
    return nn.Parameter(t if t.is_meta else t.normal_(std=std))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if backend_for(x, self.weight) == "triton":  # CUDA inference: one kernel
            from .kernels.triton_norm import rms_norm_triton
            return rms_norm_triton(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalised x: statistics in float32, the normalised value rounded to x's dtype before the scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layer-0 FFN and the shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router weights; the correction bias exists for `noaux_tc` routing only."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.weight = normal_parameter(cfg.n_routed_experts, cfg.hidden_size, std=cfg.initializer_range)
        if cfg.topk_method == "noaux_tc":  # steers the choice only; loaded and kept in float32 (checkpoint.py)
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, i, h, std = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.initializer_range
        self.gate_up_proj = normal_parameter(e, 2 * i, h, std=std)
        self.down_proj = normal_parameter(e, h, i, std=std)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [tokens, H]
        ids, weights = route(flat, self.gate.weight, self.gate.e_score_correction_bias, self.config)
        y = moe_experts(flat, ids, weights, self.experts.gate_up_proj, self.experts.down_proj).view_as(x)
        return y if self.shared_experts is None else y + self.shared_experts(x)


class MLAttention(nn.Module):
    """Multi-head latent attention. Keys and values come from one compressed latent (kv_lora_rank) per token plus a
    single rope key (qk_rope_head_dim) shared by all heads."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        nh, h = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(nh * cfg.v_head_dim, h, bias=False)
        self.softmax_scale = cfg.qk_head_dim ** -0.5

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q_nope [B, T, heads, nope], rotated q_pe [B, T, heads, rope]."""
        cfg = self.config
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.unflatten(-1, (cfg.num_attention_heads, -1)).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> normalised latent [B, T, kv_lora_rank], rotated rope key [B, T, rope]: what a cache keeps."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.config.kv_lora_rank, self.config.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(latent), apply_rope(k_pe[..., None, :], cos, sin)[..., 0, :]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: MLACache | None = None, layer: int = 0, slot: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. mask: bool [B, 1, T, keys] (True = attend) or None for plain causal.

        With a cache the chunk's latents are stored; a chunk that follows cached tokens attends over all of them
        through the absorbed path (per-head keys and values never built), while the first chunk (prefill) expands
        its own keys and values, which is cheaper for many queries. With `slot` (a one-token decode step at that
        cache slot, given as a device tensor) the token is stored there and attends over the whole cache buffer up
        to and including it, mask [B, 1, 1, max_len]: no host-side length, so a CUDA graph can capture the step.
        """
        cfg = self.config
        q_nope, q_pe = self.project_q(x, cos, sin)
        latent, k_pe = self.project_latent(x, cos, sin)
        if slot is not None:
            cached_latent, cached_k_pe = cache.write_at(layer, slot, latent, k_pe)
            out = absorbed_attention(q_nope, q_pe, cached_latent, cached_k_pe, self.kv_b_proj.weight, mask,
                                     self.softmax_scale, kv_lens=(slot + 1).expand(x.shape[0]))
            return self.o_proj(out.flatten(2))
        if cache is not None:
            cached_latent, cached_k_pe = cache.write(layer, latent, k_pe)  # everything cached so far, this chunk too
            if cache.length > 0:  # a chunk after cached tokens
                out = absorbed_attention(q_nope, q_pe, cached_latent, cached_k_pe, self.kv_b_proj.weight, mask,
                                         self.softmax_scale)
                return self.o_proj(out.flatten(2))
        k_nope, v = self.kv_b_proj(latent).unflatten(-1, (cfg.num_attention_heads, -1)).split(
            [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)  # [B, T, heads, nope], [B, T, heads, v]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, heads, T, qk_head_dim]
        k = torch.cat([k_nope, k_pe[:, :, None].expand_as(q_pe)], dim=-1).transpose(1, 2)
        out = prefill_attention(q, k, v.transpose(1, 2), mask, self.softmax_scale)  # [B, heads, T, v]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: MLACache | None = None, layer: int = 0, slot: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=normal_parameter(
            cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: MLACache | None = None) -> torch.Tensor:
        """-> logits [B, T, vocab] in float32 (as the official model returns them)."""
        return self.lm_head(self.hidden_states(inputs_embeds, position_ids, attention_mask, cache)).float()

    def hidden_states(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, cache: MLACache | None = None) -> torch.Tensor:
        """inputs_embeds [B, T, H], position_ids [B, T], attention_mask [B, T] (1 = real token) -> hidden [B, T, H]
        after the final norm. With a cache the tokens continue what it holds (attention_mask covers the new tokens
        only) and are appended to it."""
        cfg = self.config
        T = inputs_embeds.shape[1]
        angles = rope_1d_angles(position_ids, cfg.qk_rope_head_dim, cfg.rope_theta)  # [B, T, rope/2]
        cos, sin = angles.cos(), angles.sin()
        mask = causal_mask(attention_mask, T) if cache is None else cache.attention_mask(attention_mask, T)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)


    def decode_step(self, token: torch.Tensor, position_ids: torch.Tensor, cache: MLACache, slot: torch.Tensor
                    ) -> torch.Tensor:
        """One new token per row stored at cache slot `slot` -> logits [B, vocab] float32. token, position_ids
        [B, 1]; slot: int64 tensor on the device, one element (every row writes the same slot: batches are
        left-padded) or [B] (a slot per row: a continuous batch, `kimivl.engine`). The same result as
        `hidden_states` with the cache for one token, but with fixed shapes and no host synchronisation: the step
        `kimivl.cuda_graphs` captures once and replays. `cache.length` is left to the caller."""
        cfg = self.config
        cache.valid[torch.arange(token.shape[0], device=slot.device), slot] = True
        mask = cache.valid[:, None, None, :]  # [B, 1, 1, max_len]: padding hidden; slots past `slot` via kv_lens
        angles = rope_1d_angles(position_ids, cfg.qk_rope_head_dim, cfg.rope_theta)
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(token)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, slot)
        return self.lm_head(self.model.norm(x)[:, -1]).float()


def causal_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Bool [B, 1, T, T] (True = may attend): causal and only to real keys; None when nothing is padded.

    Every query may attend to itself, so rows of padding never become all-masked (which would give NaN that then
    leaks into real rows through the values).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)
