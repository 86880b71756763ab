"""Config: the official config.json in and out unchanged, validation messages, presets."""

from __future__ import annotations

import json

import pytest

from kimivl import ConfigError, KimiVLConfig
from kimivl.config import PRESETS


def official_config() -> dict:
    """A config.json shaped like the published Kimi-VL-A3B one (spec 1), with a field kimivl does not know."""
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                     "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration"},
        "ignore_index": -100, "media_placeholder_token_id": 163605, "model_type": "kimi_vl", "pad_token_id": 0,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.3",
        "vision_config": {"init_pos_emb_height": 64, "init_pos_emb_width": 64, "hidden_size": 1152,
                          "intermediate_size": 4304, "merge_kernel_size": [2, 2], "model_type": "moonvit",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
                          "torch_dtype": "bfloat16"},
        "text_config": {"vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264,
                        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
                        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1,
                        "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                        "routed_scaling_factor": 2.446, "norm_topk_prob": True, "hidden_act": "silu",
                        "rope_theta": 800000.0, "rope_scaling": None, "max_position_embeddings": 131072,
                        "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "bos_token_id": 163584,
                        "eos_token_id": 163585, "pad_token_id": 163839, "attention_bias": False,
                        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
                        "initializer_range": 0.02, "num_nextn_predict_layers": 0, "use_cache": True,
                        "model_type": "deepseek_v3", "torch_dtype": "bfloat16", "pretraining_tp": 1},
    }


def test_official_config_round_trips_unchanged(tmp_path):
    d = official_config()
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = KimiVLConfig.from_json(tmp_path)
    assert cfg.to_dict() == d
    assert cfg.extra == {"auto_map": d["auto_map"], "transformers_version": "4.50.3"}
    assert cfg.text_config.extra == {"pretraining_tp": 1}
    assert cfg.text_config.qk_head_dim == 192 and cfg.vision_config.head_dim == 72
    cfg.to_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == d


def test_a3b_preset_is_the_published_config():
    a3b = KimiVLConfig.preset("a3b").to_dict()
    want = official_config()
    for key in ("auto_map", "transformers_version"):
        del want[key]
    del want["text_config"]["pretraining_tp"]
    assert a3b == want


def test_moe_layer_rule():
    t = KimiVLConfig.preset("a3b").text_config
    assert [t.is_moe_layer(i) for i in range(3)] == [False, True, True]
    t.moe_layer_freq = 2
    assert [t.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate(preset):
    KimiVLConfig.preset(preset)


def test_tiny_keeps_every_structural_feature():
    t = KimiVLConfig.preset("tiny").text_config
    assert t.first_k_dense_replace == 1 and t.num_hidden_layers - 1 >= 2 and t.n_shared_experts >= 1
    assert (t.scoring_func, t.topk_method, t.q_lora_rank) == ("sigmoid", "noaux_tc", None)
    assert t.routed_scaling_factor != 1.0
    g = KimiVLConfig.preset("tiny-grouped").text_config
    assert g.n_group > 1 and g.topk_group < g.n_group
    assert KimiVLConfig.preset("tiny-qlora").text_config.q_lora_rank
    assert KimiVLConfig.preset("tiny-softmax").text_config.scoring_func == "softmax"


@pytest.mark.parametrize("path, value, message", [
    (("model_type",), "qwen2_vl", "expected 'kimi_vl'"),
    (("text_config", "model_type"), "llama", "text_config.model_type is 'llama', expected 'deepseek_v3'"),
    (("vision_config", "model_type"), "siglip", "expected 'moonvit'"),
    (("text_config", "n_group"), 3, "must be divisible by n_group"),
    (("text_config", "topk_group"), 2, "topk_group .* must be <= n_group"),
    (("text_config", "scoring_func"), "relu", "scoring_func must be one of"),
    (("text_config", "topk_method"), "random", "topk_method must be one of"),
    (("text_config", "num_experts_per_tok"), 65, "exceeds the 64 experts"),
    (("text_config", "hidden_size"), "2048", "hidden_size = '2048' has the wrong type"),
    (("text_config", "kv_lora_rank"), 0, "kv_lora_rank must be a positive integer"),
    (("text_config", "rope_scaling"), {"type": "yarn", "factor": 4}, "rope_scaling is set"),
    (("text_config", "hidden_act"), "gelu", "hidden_act 'gelu' is not supported"),
    (("vision_config", "num_attention_heads"), 7, "divisible by num_attention_heads"),
    (("vision_config", "num_attention_heads"), 64, "head_dim .* = 18 must be a multiple of 4"),
    (("media_placeholder_token_id",), 200000, "outside the vocabulary"),
    (("text_config",), [], "text_config must be a JSON object"),
    (("text_config", "rms_norm_eps"), -1.0, "rms_norm_eps must be a positive finite number"),
    (("text_config", "rope_theta"), 0, "rope_theta must be a positive finite number"),
    (("text_config", "routed_scaling_factor"), float("nan"), "routed_scaling_factor must be a positive finite"),
    (("text_config", "eos_token_id"), "x", "eos_token_id must be a token id, a list of them or null"),
    (("text_config", "eos_token_id"), [1, "2"], "eos_token_id must be a token id"),
    (("vision_config", "merge_kernel_size"), ["a", 2], "merge_kernel_size must be two positive ints"),
    (("vision_config", "merge_kernel_size"), [True, 2], "merge_kernel_size must be two positive ints"),
])
def test_validation_messages(path, value, message):
    d = official_config()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        KimiVLConfig.from_dict(d)


@pytest.mark.parametrize("part", ["text_config", "vision_config"])
def test_missing_sub_config(part):
    d = official_config()
    del d[part]
    with pytest.raises(ConfigError, match=f"the config has no {part}"):
        KimiVLConfig.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        KimiVLConfig.preset("huge")
