"""KimiVLForConditionalGeneration: MoonViT -> projector -> image features spliced into the decoder's input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import KimiVLConfig
from .decoder import DeepseekV3ForCausalLM, MoE
from .errors import InputError
from .vision import LN_EPS, MoonViT

if TYPE_CHECKING:
    from .generation import CheckpointGeneration


class KimiVLMultiModalProjector(nn.Module):
    """LayerNorm on each 2x2 sub-patch, then Linear -> GELU (erf) -> Linear into the decoder width."""

    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        v = cfg.vision_config
        merged = v.hidden_size * v.merge_kernel_size[0] * v.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(v.hidden_size, eps=LN_EPS)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, cfg.text_config.hidden_size)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """merged [N, kh*kw, C] -> [N, text hidden]."""
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(merged).flatten(1))))


@dataclass
class KimiVLOutput:
    logits: torch.Tensor  # [B, T, vocab] float32
    loss: torch.Tensor | None = None


class KimiVLForConditionalGeneration(nn.Module):
    def __init__(self, config: KimiVLConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vision_tower = MoonViT(config.vision_config)
        self.multi_modal_projector = KimiVLMultiModalProjector(config)
        self.language_model = DeepseekV3ForCausalLM(config.text_config)
        self.generation_config: CheckpointGeneration | None = None  # the checkpoint's generation_config.json
        self.quantization = None  # the kimivl.quant.Scheme the decoder was loaded with, or None (float)
        self.prepacked = False  # decoder weights in oneDNN's layout for CPU inference (kimivl.prepack)

    @property
    def device(self) -> torch.device:
        return self.language_model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.norm.weight.dtype

    def image_features(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """Packed patches -> one decoder-width row per merged token, images in order: [N_tokens, hidden]."""
        merged = self.vision_tower(pixel_values, image_grid_hws)
        return self.multi_modal_projector(torch.cat(merged))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_hws: torch.Tensor | None = None, image_features: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Token embeddings with image features written over the `<|media_pad|>` positions, in order. The features
        come from the images, or are given already computed (`image_features` [N_tokens, hidden], e.g. one image's
        features repeated for several rows)."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # [B, T, H]
        is_media = input_ids == self.config.media_placeholder_token_id
        n_slots = int(is_media.sum())
        if image_features is not None:
            feats = image_features
        elif pixel_values is None or pixel_values.numel() == 0:
            if n_slots:
                raise InputError(f"input_ids hold {n_slots} <|media_pad|> tokens "
                                 f"(id {self.config.media_placeholder_token_id}) but no pixel_values were given")
            return embeds
        elif image_grid_hws is None:
            raise InputError("pixel_values were given without image_grid_hws")
        else:
            feats = self.image_features(pixel_values, image_grid_hws)
        if feats.shape[0] != n_slots:
            raise InputError(f"the images give {feats.shape[0]} feature tokens (sum of h*w/4 over image_grid_hws) "
                             f"but input_ids hold {n_slots} <|media_pad|> tokens: expand each image's placeholder "
                             "to (h*w)/4 tokens")
        return embeds.to(feats.dtype).masked_scatter(is_media[..., None], feats)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_hws: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> KimiVLOutput:
        """input_ids [B, T]; pixel_values [L, 3, 14, 14]; image_grid_hws [N, 2]; attention_mask [B, T] (1 = real);
        labels [B, T] (-100 = ignored) -> logits [B, T, vocab] in float32 and the next-token loss."""
        self.check_ids(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        embeds = self.embed(input_ids, pixel_values, image_grid_hws)
        logits = self.language_model(embeds, position_ids, attention_mask)
        loss = None if labels is None else next_token_loss(logits, labels, self.config.ignore_index)
        return KimiVLOutput(logits=logits, loss=loss)

    def check_ids(self, input_ids: torch.Tensor, **same_shape: torch.Tensor | None) -> None:
        """Token ids must be a [batch, seq] integer tensor inside the vocabulary; masks, positions and labels
        must have its shape."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        vocab = self.config.text_config.vocab_size
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            raise InputError(f"input_ids hold ids outside the vocabulary 0..{vocab - 1}: "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        for name, t in same_shape.items():
            if t is not None and t.shape != input_ids.shape:
                raise InputError(f"{name} shape {list(t.shape)} != input_ids shape {list(input_ids.shape)}")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None, *,
                 stop_ids: list[int] | None = None, pad_id: int | None = None, **settings) -> torch.Tensor:
        """New token ids [B, n] for left-padded prompts, with the latent cache; settings are GenerationConfig fields
        (max_new_tokens, temperature, top_k, top_p, seed), the sampling ones defaulting to the checkpoint's
        generation_config.json when it ships one (else greedy). Rows stop at a stop id (default: the checkpoint's
        end ids, generation_config.json's eos_token_id or else config.json's; pass
        `processor.tokenizer.stop_ids` to stop at `<|im_end|>` too) and are then padded with pad_id (default:
        generation_config.json's pad_token_id, else config.json's)."""
        from .generation import checkpoint_settings, end_ids, generate_tokens

        gen, t = self.generation_config, self.config.text_config
        if pad_id is None:
            pad_id = gen.pad_token_id if gen and gen.pad_token_id is not None else (t.pad_token_id or 0)
        steps = generate_tokens(self, input_ids, attention_mask, pixel_values, image_grid_hws,
                                checkpoint_settings(self, settings), end_ids(self) if stop_ids is None else stop_ids,
                                pad_id)
        return torch.stack(list(steps), dim=1)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", progress: bool | None = None,
                        quantize: str | None = None, group_size: int | None = None
                        ) -> "KimiVLForConditionalGeneration":
        """Load an official-format checkpoint directory (see `kimivl.checkpoint.load`); quantize "int8" | "int4"
        (int4 in groups of group_size, default 128) quantizes the decoder weights while reading them."""
        from .checkpoint import load
        return load(path, dtype=dtype, device=device, progress=progress, quantize=quantize, group_size=group_size)

    def prepack(self) -> bool:
        """CPU inference: hold the decoder's weights in oneDNN's blocked layout, for faster products (see
        `kimivl.prepack`); returns whether it did (False off CPU, for a quantized model, or for bfloat16 on a CPU
        without AVX-512)."""
        from .prepack import prepack
        return prepack(self)

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ... would fail halfway on opaque oneDNN weights
        if getattr(self, "prepacked", False):
            from .prepack import refuse_prepacked
            refuse_prepacked(self, "moving or converting it (.to, .float, .cuda)")
        return super()._apply(fn, recurse)

    def unprepack(self) -> "KimiVLForConditionalGeneration":
        """Undo `prepack` exactly (needed before training or saving)."""
        from .prepack import unprepack
        return unprepack(self)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write the official layout: config.json, safetensors shard(s) and an index when sharded."""
        from .checkpoint import save
        save(self, path, max_shard_size=max_shard_size)


def default_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """0..T-1 per row, counted over real tokens only when a mask is given (so left padding does not shift them)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
                    ) -> torch.Tensor:
    """Cross entropy (mean, or sum) of predicting labels[:, t+1] from logits[:, t], positions labelled
    ignore_index skipped."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=ignore_index,
                           reduction=reduction)


@torch.no_grad()
def init_weights(model: KimiVLForConditionalGeneration, seed: int | None = None) -> None:
    """Random initialisation for new models: N(0, initializer_range) matrices and tables; zero biases (router
    correction biases included), unit norm weights."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    std = model.config.text_config.initializer_range
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            values = torch.randn(p.shape, generator=gen) * std
        elif "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
            values = torch.ones(p.shape)
        else:
            values = torch.zeros(p.shape)
        p.copy_(values)


def parameter_counts(config: KimiVLConfig) -> dict[str, int]:
    """Parameters per component, counted on a meta-device model (no memory), and those one token activates.

    Activated per token: everything except the routed experts a token does not use (it uses num_experts_per_tok
    of n_routed_experts in every MoE layer); the embedding table counts fully, as published figures do.
    """
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    lm = model.language_model
    counts = {"vision": count(model.vision_tower), "projector": count(model.multi_modal_projector),
              "decoder": count(lm), "embeddings": lm.model.embed_tokens.weight.numel() + lm.lm_head.weight.numel()}
    counts["total"] = counts["vision"] + counts["projector"] + counts["decoder"]
    t = config.text_config
    routed = sum(count(layer.mlp.experts) for layer in lm.model.layers if isinstance(layer.mlp, MoE))
    unused = routed - routed * (t.num_experts_per_tok or 0) // (t.n_routed_experts or 1)
    counts["decoder_activated"] = counts["decoder"] - unused
    return counts
