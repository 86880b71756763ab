"""What a checkpoint holds, from config.json and the safetensors headers alone (no tensor data is read)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Any

from kimivl.checkpoint import DTYPE_NAMES, read_layout

COMPONENTS = {"vision_tower.": "vision", "multi_modal_projector.": "projector", "language_model.": "decoder"}
EMBEDDINGS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
EXPERT = re.compile(r"language_model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready summary: config, parameters per component (stored, and activated per token), dtypes, shards,
    routed experts found per MoE layer, and how many problems `verify` would list.

    Parameters are counted from the headers, so they describe the files; for a sound checkpoint they equal
    kimivl.model.parameter_counts(config). Activated per token: all but the routed experts a token does not use
    (num_experts_per_tok of n_routed_experts per MoE layer); embeddings count fully, as published figures do.
    """
    layout = read_layout(path, check_dtypes=True)
    cfg, v, t = layout.config, layout.config.vision_config, layout.config.text_config
    params: dict[str, int] = defaultdict(int)
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    experts: dict[int, set[int]] = defaultdict(set)
    routed = 0
    ignored = set(layout.ignored)
    for tensors in layout.headers.values():
        for name, info in tensors.items():
            if name in ignored:
                continue
            params[next((c for p, c in COMPONENTS.items() if name.startswith(p)), "other")] += info.numel
            params["embeddings"] += info.numel if name in EMBEDDINGS else 0
            d = dtypes[DTYPE_NAMES[info.dtype]]
            d["tensors"] += 1
            d["parameters"] += info.numel
            d["bytes"] += info.nbytes
            if m := EXPERT.match(name):
                experts[int(m.group(1))].add(int(m.group(2)))
                routed += info.numel
    unused = routed - routed * (t.num_experts_per_tok or 0) // (t.n_routed_experts or 1)
    parts = ["vision", "projector", "decoder", "embeddings", *(["other"] if "other" in params else [])]
    parameters = {c: {"total": params[c], "activated": params[c] - (unused if c == "decoder" else 0)} for c in parts}
    parameters["total"] = {k: sum(parameters[c][k] for c in parts if c != "embeddings") for k in ("total", "activated")}
    moe_layers = [i for i in range(t.num_hidden_layers) if t.is_moe_layer(i)]
    return {
        "path": str(layout.path),
        "config": {
            "model_type": cfg.model_type, "torch_dtype": cfg.torch_dtype,
            "vision": {"layers": v.num_hidden_layers, "hidden_size": v.hidden_size, "heads": v.num_attention_heads,
                       "intermediate_size": v.intermediate_size, "patch_size": v.patch_size,
                       "merge_kernel_size": v.merge_kernel_size},
            "text": {"layers": t.num_hidden_layers, "dense_layers": t.num_hidden_layers - len(moe_layers),
                     "moe_layers": len(moe_layers), "hidden_size": t.hidden_size, "heads": t.num_attention_heads,
                     "vocab_size": t.vocab_size, "q_lora_rank": t.q_lora_rank, "kv_lora_rank": t.kv_lora_rank,
                     "max_position_embeddings": t.max_position_embeddings},
        },
        "experts": {"routed": t.n_routed_experts, "per_token": t.num_experts_per_tok, "shared": t.n_shared_experts,
                    "moe_layers": moe_layers, "routed_found": {i: len(experts[i]) for i in sorted(experts)}},
        "parameters": parameters,
        "dtypes": dict(dtypes),
        "shards": [{"file": f, "tensors": len(tensors), "bytes": (layout.path / f).stat().st_size}
                   for f, tensors in layout.headers.items()],
        "ignored": len(ignored),  # stored buffers that are no parameter (the published rotary frequencies)
        "problems": len(layout.problems),
    }
