"""Configs: dataclasses with the official `config.json` field names, one reader, one writer, presets.

`KimiVLConfig.from_dict(json.load(...))` accepts an official Kimi-VL config; fields it does not know are kept in
`extra` and written back unchanged by `to_dict()`, so a config survives a round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass
class VisionConfig:
    """MoonViT (`model_type` "moonvit"). LayerNorm eps 1e-5, GELU-tanh and RoPE theta 10000 are fixed by the model."""

    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: list[int] = field(default_factory=lambda: [2, 2])
    model_type: str = "moonvit"
    torch_dtype: str | None = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.model_type != "moonvit":
            raise ConfigError(f"vision_config.model_type is {self.model_type!r}, expected 'moonvit'")
        _positive(self, "patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
                  "num_hidden_layers", "hidden_size", "intermediate_size")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim = hidden_size / num_attention_heads = {self.head_dim} must be a "
                              "multiple of 4 (2D RoPE gives a quarter of it to each of rows and columns, as pairs)")
        if len(self.merge_kernel_size) != 2 or not all(_is_int(k) and k >= 1 for k in self.merge_kernel_size):
            raise ConfigError(f"vision_config.merge_kernel_size must be two positive ints, got {self.merge_kernel_size}")


@dataclass
class TextConfig:
    """The DeepSeek-V3 decoder (`model_type` "deepseek_v3"), official field names and Kimi-VL-A3B values."""

    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 2.446
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    rope_theta: float = 800000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = 163839
    attention_bias: bool = False
    attention_dropout: float = 0.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    ep_size: int = 1
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0
    use_cache: bool = True
    model_type: str = "deepseek_v3"
    torch_dtype: str | None = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (the field may hold one id, several or none)."""
        ids = self.eos_token_id
        return [] if ids is None else list(ids) if isinstance(ids, list) else [ids]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Layer `layer` uses the sparse MoE FFN (the official rule); the others use the dense SwiGLU MLP."""
        return (bool(self.n_routed_experts) and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    def validate(self) -> None:
        if self.model_type != "deepseek_v3":
            raise ConfigError(f"text_config.model_type is {self.model_type!r}, expected 'deepseek_v3'")
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                  "moe_layer_freq")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"text_config.q_lora_rank must be null or positive, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"text_config.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        _positive_float(self, "rms_norm_eps", "rope_theta", "routed_scaling_factor")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(self, name)
            if ids is not None and not all(_is_int(i) for i in (ids if isinstance(ids, list) else [ids])):
                raise ConfigError(f"text_config.{name} must be a token id, a list of them or null, got {ids!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act {self.hidden_act!r} is not supported; Kimi-VL uses 'silu'")
        if self.rope_scaling is not None:
            raise ConfigError("text_config.rope_scaling is set, but Kimi-VL uses none (null) and kimivl does not "
                              f"implement RoPE scaling: got {self.rope_scaling!r}")
        if self.attention_bias:
            raise ConfigError("text_config.attention_bias = true is not supported; Kimi-VL has no attention biases")
        if self.tie_word_embeddings:
            raise ConfigError("text_config.tie_word_embeddings = true is not supported; Kimi-VL has a separate lm_head")
        if not self.n_routed_experts:
            return
        _positive(self, "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group")
        if self.n_shared_experts:
            _positive(self, "n_shared_experts")
        if (self.n_shared_experts or 0) < 0:
            raise ConfigError(f"text_config.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"text_config.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"text_config.topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        e, g = self.n_routed_experts, self.n_group
        if e % g:
            raise ConfigError(f"text_config.n_routed_experts ({e}) must be divisible by n_group ({g})")
        if self.topk_group > g:
            raise ConfigError(f"text_config.topk_group ({self.topk_group}) must be <= n_group ({g})")
        if self.topk_method == "noaux_tc" and g > 1 and e // g < 2:
            raise ConfigError(f"noaux_tc scores each group by its top-2 experts, so each of the {g} groups needs >= 2 "
                              f"experts (n_routed_experts = {e})")
        reachable = e if self.topk_method == "greedy" else self.topk_group * (e // g)
        if self.num_experts_per_tok > reachable:
            raise ConfigError(f"text_config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {reachable} "
                              f"experts that the {self.topk_method!r} router can reach")


@dataclass
class KimiVLConfig:
    """Top-level Kimi-VL config (`model_type` "kimi_vl"): a vision tower, a projector and a decoder."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    media_placeholder_token_id: int = 163605
    ignore_index: int = -100
    pad_token_id: int = 0
    architectures: list[str] = field(default_factory=lambda: ["KimiVLForConditionalGeneration"])
    model_type: str = "kimi_vl"
    torch_dtype: str | None = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- official config.json in and out -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KimiVLConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a Kimi-VL config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "kimi_vl":
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'kimi_vl': this is not a Kimi-VL "
                              "config (the decoder alone would be 'deepseek_v3')")
        missing = [k for k in ("vision_config", "text_config") if k not in d]
        if missing:
            raise ConfigError(f"the config has no {' or '.join(missing)}: a Kimi-VL config.json holds both")
        d = dict(d)
        vision = _from_dict(VisionConfig, d.pop("vision_config"), "vision_config")
        text = _from_dict(TextConfig, d.pop("text_config"), "text_config")
        cfg = _from_dict(cls, d, "config", vision_config=vision, text_config=text)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "KimiVLConfig":
        """Read a `config.json` file (or the one inside a checkpoint directory)."""
        path = os.fspath(path)
        if os.path.isdir(path) and not path.endswith("config.json"):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["vision_config"] = _to_dict(self.vision_config)
        out["text_config"] = _to_dict(self.text_config)
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")

    def validate(self) -> None:
        self.vision_config.validate()
        self.text_config.validate()
        if not 0 <= self.media_placeholder_token_id < self.text_config.vocab_size:
            raise ConfigError(f"media_placeholder_token_id ({self.media_placeholder_token_id}) is outside the "
                              f"vocabulary (text_config.vocab_size = {self.text_config.vocab_size})")

    # ---- presets --------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "KimiVLConfig":
        """A named config: "a3b" (the published Kimi-VL-A3B values) or a tiny test model (see PRESETS)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        vision, text, top = PRESETS[name]
        cfg = cls(vision_config=VisionConfig(**vision), text_config=TextConfig(**text), **top)
        cfg.validate()
        return cfg


# Tiny: a few MB, every structural feature of a3b kept (dense first layer, two MoE layers, shared experts, sigmoid
# routing with a correction bias, routed scaling, q_lora_rank null). Its vocabulary mirrors the official layout at
# a small scale: 1024 BPE ranks followed by 256 special ids, with <|media_pad|> at the same offset (base + 21).
_TINY_VISION = dict(init_pos_emb_height=16, init_pos_emb_width=16, num_attention_heads=2, num_hidden_layers=2,
                    hidden_size=32, intermediate_size=64, torch_dtype="float32")
_TINY_TEXT = dict(vocab_size=1280, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2,
                  num_experts_per_tok=3, max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1024,
                  eos_token_id=1025, pad_token_id=1279, initializer_range=0.05, torch_dtype="float32")
_TINY_TOP = dict(media_placeholder_token_id=1024 + 21, torch_dtype="float32")
PRESETS: dict[str, tuple[dict, dict, dict]] = {
    "a3b": ({}, {}, {}),
    "tiny": (_TINY_VISION, _TINY_TEXT, _TINY_TOP),
    "tiny-qlora": (_TINY_VISION, {**_TINY_TEXT, "q_lora_rank": 24}, _TINY_TOP),
    "tiny-grouped": (_TINY_VISION, {**_TINY_TEXT, "n_group": 4, "topk_group": 2}, _TINY_TOP),
    "tiny-softmax": (_TINY_VISION, {**_TINY_TEXT, "scoring_func": "softmax", "topk_method": "greedy",
                                    "norm_topk_prob": False, "routed_scaling_factor": 1.0}, _TINY_TOP),
}


def _from_dict(cls, d: dict[str, Any], where: str, **fixed):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names and k not in fixed}
    extra = {k: v for k, v in d.items() if k not in names}
    for f in dataclasses.fields(cls):
        if f.name in known and not _type_ok(known[f.name], f.type):
            raise ConfigError(f"{where}.{f.name} = {known[f.name]!r} has the wrong type (expected {f.type})")
    return cls(**known, **fixed, extra=extra)


def _type_ok(value: Any, annotation: str) -> bool:
    """A light check that a JSON value fits a field's annotation (as a string, from `from __future__`)."""
    if value is None:
        return "None" in annotation or annotation == "Any"
    if annotation.startswith(("bool",)):
        return isinstance(value, bool)
    if annotation.startswith("int") and not annotation.startswith("int | list"):
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation.startswith("str"):
        return isinstance(value, str)
    if annotation.startswith("list"):
        return isinstance(value, list)
    if annotation.startswith("dict"):
        return isinstance(value, dict)
    return True


def _to_dict(obj) -> dict[str, Any]:
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
           if f.name not in ("extra", "vision_config", "text_config")}
    out.update(obj.extra)
    return json.loads(json.dumps(out))  # deep copy, JSON types only


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Sane upper bounds on sizes (far above any published model: A3B has 27 layers and 64 experts), so that a config
# cannot make a loader build a billion layers before the weights are even looked at.
SIZE_LIMITS = {"num_hidden_layers": 1024, "n_routed_experts": 4096, "n_shared_experts": 4096,
               "num_experts_per_tok": 4096, "vocab_size": 2**24, "max_position_embeddings": 2**24}
DEFAULT_SIZE_LIMIT = 2**20


def _positive(obj, *names: str) -> None:
    where = "vision_config" if isinstance(obj, VisionConfig) else "text_config"
    for n in names:
        v = getattr(obj, n)
        if not _is_int(v) or v <= 0:
            raise ConfigError(f"{where}.{n} must be a positive integer, got {v!r}")
        if v > SIZE_LIMITS.get(n, DEFAULT_SIZE_LIMIT):
            raise ConfigError(f"{where}.{n} = {v} is beyond any real model (limit {SIZE_LIMITS.get(n, DEFAULT_SIZE_LIMIT)})")


def _positive_float(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"text_config.{n} must be a positive finite number, got {v!r}")
